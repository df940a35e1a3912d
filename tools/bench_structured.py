#!/usr/bin/env python3
"""Structured output's cost: the two grammar libraries on this CPU, then constrained against free decoding.

    python tools/bench_structured.py                      # small preset, bfloat16, 1 and 8 rows
    python tools/bench_structured.py --preset tiny --new 32   # a quick look

1. llguidance (what points uses) and xgrammar (when installed: it needs transformers and Triton at run time)
   on the real Qwen2.5 vocabulary: the tokenizer's preparation, a nested JSON schema's compile (first, then
   the same schema again), and the mask of one step along a valid reply (median over its tokens).
2. The scheduler (points.runtime.scheduler) on one random checkpoint: tokens/s of 1 and of 8 rows at once,
   every row constrained by the nested schema against every row free, in one sitting (the same prompts,
   greedy, --new tokens at most; a constrained reply may close early, so tokens/s is per token generated).
A benchmark, not a test: compare within one run.
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import points
from points.io.checkpoint import DTYPES
from points.runtime.grammar import JSON_LAYOUT
from points.tooling.measure import machine
from points.tooling.synthetic import SHAPES, checkpoint_in

SCHEMA = {"type": "object", "properties": {
    "vendor": {"type": "string", "maxLength": 24}, "date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
    "total": {"type": "number"}, "currency": {"enum": ["EUR", "USD", "CNY"]},
    "lines": {"type": "array", "maxItems": 6, "items": {"type": "object", "properties": {
        "item": {"type": "string", "maxLength": 16}, "qty": {"type": "integer"}, "price": {"type": "number"}},
        "required": ["item", "qty", "price"], "additionalProperties": False}}},
    "required": ["vendor", "date", "total", "currency", "lines"], "additionalProperties": False}
REPLY = ('{"vendor": "ACME Paper", "date": "2026-12-07", "total": 41.5, "currency": "EUR", "lines": '
         '[{"item": "paper", "qty": 3, "price": 9.5}, {"item": "pens", "qty": 2, "price": 6.5}]}')
FORMAT = {"type": "json_schema", "json_schema": {"name": "invoice", "schema": SCHEMA}}


def _libraries(tokenizer_path: Path, tokenizer) -> list[dict]:
    rows = []
    ids = tokenizer.encode(REPLY)
    from llguidance import LLMatcher, LLTokenizer

    t = time.perf_counter()
    llt = LLTokenizer(tokenizer_path.read_text(), eos_token=tokenizer.im_end_id)
    prep = time.perf_counter() - t
    compiles = []
    for _ in range(2):
        t = time.perf_counter()
        grammar = LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA), defaults=JSON_LAYOUT)
        matcher = LLMatcher(llt, grammar)
        compiles.append(time.perf_counter() - t)
    words = np.zeros((llt.vocab_size + 31) // 32, dtype=np.int32)
    steps = []
    for token in ids:
        t = time.perf_counter()
        matcher.unsafe_compute_mask_ptr(words.ctypes.data, words.nbytes)
        steps.append(time.perf_counter() - t)
        matcher.consume_token(token)
    rows.append(dict(library="llguidance", prepare_s=prep, compile_s=compiles[0], compile_again_s=compiles[1],
                     mask_ms=1e3 * statistics.median(steps)))
    try:
        import xgrammar as xgr
        from transformers import PreTrainedTokenizerFast
    except ImportError as e:
        rows.append(dict(library="xgrammar", missing=str(e)))
        return rows
    hf = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_path))
    t = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(hf, stop_token_ids=[tokenizer.im_end_id])
    compiler = xgr.GrammarCompiler(info)
    prep = time.perf_counter() - t
    compiles = []
    for _ in range(2):  # (its compiler caches a schema it has seen)
        t = time.perf_counter()
        compiled = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False)
        compiles.append(time.perf_counter() - t)
    matcher = xgr.GrammarMatcher(compiled)
    mask = xgr.allocate_token_bitmask(1, info.vocab_size)
    steps = []
    for token in ids:
        t = time.perf_counter()
        matcher.fill_next_token_bitmask(mask)
        steps.append(time.perf_counter() - t)
        matcher.accept_token(token)
    rows.append(dict(library="xgrammar", prepare_s=prep, compile_s=compiles[0], compile_again_s=compiles[1],
                     mask_ms=1e3 * statistics.median(steps)))
    return rows


def _decode(pipe, rows: int, new: int, response_format) -> tuple[float, int]:
    questions = [[{"role": "user", "content": f"Read invoice number {i} and give its fields."}] for i in range(rows)]
    t = time.perf_counter()
    requests = [pipe.submit(q, max_new_tokens=new, response_format=response_format) for q in questions]
    for r in requests:
        r.text()
    seconds = time.perf_counter() - t
    return seconds, sum(r.completion_tokens for r in requests)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(SHAPES), default="small")
    p.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    p.add_argument("--new", type=int, default=64, help="new tokens per reply at most")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="points-structured-"))
    ckpt = checkpoint_in(work, args.preset, DTYPES[args.dtype], tokenizer="qwen")
    pipe = points.load(ckpt, max_batch=8)
    print(f"bench_structured: {args.preset} {args.dtype}, {machine(torch.device('cpu'))}, torch {torch.__version__}", file=sys.stderr)
    result = {"libraries": _libraries(ckpt / "tokenizer.json", pipe.tokenizer), "decode": []}
    for row in result["libraries"]:
        print(json.dumps(row))
    pipe.chat([{"role": "user", "content": "warm up"}], max_new_tokens=4, response_format=FORMAT)
    for rows in (1, 8):
        for name, fmt in (("free", None), ("constrained", FORMAT)):
            best = None
            for _ in range(args.repeat):
                seconds, tokens = _decode(pipe, rows, args.new, fmt)
                rate = tokens / seconds
                best = max(best or 0, rate)
            result["decode"].append(dict(rows=rows, kind=name, tokens_per_s=best, tokens=tokens))
            print(f"{rows} row(s), {name:11s}: {best:8.1f} tok/s ({tokens} tokens)")
        free, constrained = result["decode"][-2]["tokens_per_s"], result["decode"][-1]["tokens_per_s"]
        print(f"{rows} row(s): constrained costs {100 * (free / constrained - 1):+.1f}% per token")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
