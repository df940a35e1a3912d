"""The tokenizer: a thin wrapper over `tokenizers.Tokenizer` reading the checkpoint's tokenizer.json.

Special tokens are looked up by their strings, never by hard-coded ids. Text is text: `encode(text)` gives a
special token's string (`<|im_end|>`, `<|image_pad|>`, ...) the ids of its characters, so that what a user
writes can never forge a chat turn or an image slot; only the chat template's own markers
(`encode(marker, special=True)`, points.io.chat) become special tokens. The reference code parses them in
user text too (a deliberate difference, see README). Tokens that tokenizer.json adds without marking them
`special` (in Qwen2.5 <tool_call> .. <|file_sep|>) are ordinary vocabulary and stay whole either way.
Decoding drops only the tokens marked `special` (as the reference's skip_special_tokens does), so those
added ones stay in the text.
"""

from __future__ import annotations

import threading
from pathlib import Path

from tokenizers import Tokenizer as _Tokenizer

from points.errors import CheckpointError

IM_START, IM_END, END_OF_TEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
VISION_START, VISION_END, IMAGE_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"
REQUIRED = (IM_START, IM_END, END_OF_TEXT, VISION_START, VISION_END, IMAGE_PAD)


def _byte_alphabet() -> dict[str, int]:
    """Byte-level BPE's alphabet (GPT-2's): each byte as the printable character its vocabulary writes it with."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTE_OF = _byte_alphabet()


class Tokenizer:
    def __init__(self, path: str | Path):
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise CheckpointError(f"{path}: not found; the checkpoint directory must hold tokenizer.json")
        try:
            self._tok = _Tokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers library raises its own exception types
            raise CheckpointError(f"{path}: not a readable tokenizer.json ({e})") from None
        missing = [s for s in REQUIRED if self._tok.token_to_id(s) is None]
        if missing:
            raise CheckpointError(f"{path}: has no token(s) {', '.join(missing)}; not a Qwen2.5 tokenizer")
        # user text reads special-token strings as plain characters (encode_special_tokens), the chat template's
        # markers as their ids: one tokenizer, the flag set under a lock for each call (a second parsed copy
        # doubled the load time: 0.4 s of the real vocabulary's)
        self._lock = threading.Lock()
        self.ids = {s: self._tok.token_to_id(s) for s in REQUIRED}
        self.im_end_id, self.eos_id = self.ids[IM_END], self.ids[END_OF_TEXT]
        self.image_pad_id = self.ids[IMAGE_PAD]
        self._added = None  # ids of the added tokens (token_bytes), read once when first asked

    def encode(self, text: str, *, special: bool = False) -> list[int]:
        """Text -> ids, no BOS added. special=False (user text): special-token strings are plain characters;
        special=True (the chat template's markers): they become their ids."""
        with self._lock:
            self._tok.encode_special_tokens = not special
            return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special)

    def stream(self) -> "StreamDecoder":
        return StreamDecoder(self)

    def to_json(self) -> str:
        """tokenizer.json's text (for libraries that read a tokenizer themselves: points.runtime.grammar)."""
        return self._tok.to_str()

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (byte-level BPE: its vocabulary string read back through the byte
        alphabet; an added token: its text): what OpenAI's logprobs call a token's `bytes`."""
        if self._added is None:
            self._added = {i for i in self._tok.get_added_tokens_decoder()}
        text = self._tok.id_to_token(int(token_id))
        if text is None:
            return b""
        if token_id in self._added or any(c not in _BYTE_OF for c in text):
            return text.encode("utf-8")
        return bytes(_BYTE_OF[c] for c in text)


class StreamDecoder:
    """Incremental decoding: `push(id)` returns the newly completed text. A multi-byte character split over
    several tokens is held back until it is whole (never a replacement character), so the pieces concatenate
    to `decode(all ids)`."""

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = self.read = 0  # ids[prefix:read] is the context already emitted

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        done = self.tok.decode(self.ids[self.prefix:self.read])
        text = self.tok.decode(self.ids[self.prefix:])
        if len(text) > len(done) and not text.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return text[len(done):]
        return ""

    def flush(self) -> str:
        """Whatever is left (an incomplete character at the very end decodes as the reference would)."""
        done = self.tok.decode(self.ids[self.prefix:self.read])
        text = self.tok.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return text[len(done):]
