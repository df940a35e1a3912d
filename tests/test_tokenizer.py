"""The tokenizer wrapper on a real-vocabulary Qwen2.5 tokenizer.json, against tiktoken on the same ranks."""

import pytest

import points
import tokenizer_fixture
from points.io.tokenizer import Tokenizer

TEXTS = {
    "english": "Hello world, it's 2026! The quick brown fox jumps over the lazy dog.",
    "chinese": "你好，世界。这是一个多模态模型的测试：请描述这张图片。",
    "code": "def f(x: int) -> int:\n    return x ** 2  # square\n\nprint([f(i) for i in range(10)])\n",
    "emoji": "Great job 👍🏽🎉 — naïve café, Ünïcödé, 🇨🇭 flags and 👨‍👩‍👧 families",
    "whitespace": "  leading\n\n\n\ttabs   and    runs  \r\n",
}


@pytest.fixture(scope="module")
def tok(tokenizer_json):
    return Tokenizer(tokenizer_json)


@pytest.fixture(scope="module")
def tiktoken_enc():
    return tokenizer_fixture.tiktoken_encoding()


@pytest.mark.parametrize("name", TEXTS)
def test_encode_matches_tiktoken(tok, tiktoken_enc, name):
    assert tok.encode(TEXTS[name]) == tiktoken_enc.encode(TEXTS[name])
    assert tok.decode(tok.encode(TEXTS[name])) == TEXTS[name]


def test_special_tokens_looked_up_by_string(tok):
    assert tok.ids == {"<|im_start|>": 151644, "<|im_end|>": 151645, "<|endoftext|>": 151643,
                       "<|vision_start|>": 151652, "<|vision_end|>": 151653, "<|image_pad|>": 151655}
    assert tok.encode("<|im_start|>user\n") == [151644, 872, 198]


def test_decode_drops_only_special_tokens(tok):
    """<tool_call> (151657) is added but not special: it stays, as in the reference."""
    ids = tok.encode("<|im_start|>a<tool_call>b<|im_end|><|endoftext|>")
    assert 151657 in ids
    assert tok.decode(ids) == "a<tool_call>b"


@pytest.mark.parametrize("name", ["chinese", "emoji", "english"])
def test_stream_decoder_never_splits_characters(tok, name):
    ids = tok.encode(TEXTS[name])
    stream = tok.stream()
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert not any("\ufffd" in p for p in pieces)
    assert "".join(pieces) == TEXTS[name]
    if name == "emoji":  # multi-token characters exist here, so some pushes must have held text back
        assert "" in pieces[:-1]


def test_missing_or_foreign_tokenizer(tmp_path):
    with pytest.raises(points.CheckpointError, match="tokenizer.json: not found"):
        Tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "WordLevel", "vocab": {"a": 0}, "unk_token": "a"}}')
    with pytest.raises(points.CheckpointError, match=r"has no token\(s\) <\|im_start\|>"):
        Tokenizer(tmp_path)
