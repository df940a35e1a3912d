"""`points eval`: a benchmark in VLMEvalKit's TSV format, asked as VLMEvalKit's POINTS-1.5 wrapper asks it, its
predictions written in the file VLMEvalKit's evaluator reads, and scored here where no judge model is needed.

    points eval --model POINTS-1-5-Qwen-2-5-7B-Chat --data MMStar.tsv --output results/
    points eval --model DIR --data my_set.tsv --benchmark MyBench --kind MCQ --output results/ --quantize int8
    torchrun --nproc-per-node 2 -m points eval --model DIR --data MMBench_DEV_EN_V11.tsv --output results/
    points eval --compare results/A_MMStar_score.json results/B_MMStar_score.json

--data: one of VLMEvalKit's benchmark TSVs (base64 images, images shared by reference, lists of images,
absent answers for test splits; points/io/benchmark_tsv.py). --benchmark: its VLMEvalKit name (default: the
file's stem), which chooses the prompt, the image's pixel bounds and the scorer
(points/tooling/vlmeval.py has the table, each line with its source in the wrapper); a name the table lacks
needs --kind MCQ | Y/N | VQA. Greedy, 2,048 new tokens (the wrapper's), on the scheduler as `points run`
runs: journaled per row, resumable after kill -9, one share per process under torchrun, --quantize,
--compile, --batch-size (the rules are `points run --help`'s).

Out, in the --output folder (made if missing), for --model-name M (default POINTSV15-Qwen-2.5-7B-Chat,
VLMEvalKit's name for this model) and benchmark B:
- `M_B.tsv`: the benchmark's columns but the image, then `prediction` (VLMEvalKit's PRED_FORMAT=tsv file);
- `M_B.jsonl`: a line per row, {"id": index, "reply"} or {"id", "error"} (a row that cannot be asked);
- `M_B_score.json` and `M_B_score.md`: the scores (points/tooling/scorers.py: multiple choice with MMBench's
  circular rule, yes/no with HallusionBench's, POPE's and MME's, OCRBench's), n, the model, dtype,
  quantization and the command; for a benchmark that needs a judge model (MMVet, MathVista) no score, and the
  report says to run VLMEvalKit's evaluator on M_B.tsv. A row that failed counts as a wrong answer.
--compare A.json B.json: the two reports side by side (score, n, each shared figure, the difference).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from points.tooling.jobs import Item, Job, drive, generating_pipeline
from points.tooling.options import (add_job_options, add_prefill_option, check_weight_options, exit_code,
                                    quantize_record)

MODEL_NAME = "POINTSV15-Qwen-2.5-7B-Chat"  # vlmeval/config.py: points_series
RESULTS = ("reply",)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="points eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--compare", nargs=2, type=Path, metavar=("A.json", "B.json"),
                   help="two score reports of `points eval` side by side (nothing else is needed)")
    p.add_argument("--model", help="checkpoint directory (released layout or ours)")
    p.add_argument("--data", type=Path, help="a VLMEvalKit benchmark TSV")
    p.add_argument("--benchmark", help="its VLMEvalKit name (default: the file's stem)")
    p.add_argument("--kind", choices=["MCQ", "Y/N", "VQA"], help="for a benchmark the table lacks")
    p.add_argument("--output", type=Path, help="a folder for the predictions and the scores")
    p.add_argument("--model-name", default=MODEL_NAME,
                   help="the model's name in the files' names, VLMEvalKit's (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: 2048 (the wrapper's)")
    p.add_argument("--batch-size", type=int, default=8, help="rows decoded at once (default: %(default)s)")
    add_prefill_option(p)
    add_job_options(p)
    return p


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.compare:
        return exit_code(lambda: compare(*args.compare))
    for flag in ("model", "data", "output"):
        if getattr(args, flag) is None:
            p.error(f"--{flag} is required (or --compare A.json B.json)")
    for flag, value in (("--batch-size", args.batch_size), ("--max-prefill-tokens", args.max_prefill_tokens),
                        ("--max-new-tokens", args.max_new_tokens or 1)):
        if value < 1:
            p.error(f"{flag} {value}: expected an integer >= 1")
    check_weight_options(p, args)
    return exit_code(lambda: _evaluate(args, argv))


def _evaluate(args, argv) -> int:
    from points.tooling import vlmeval

    name = args.data.stem if args.benchmark is None else args.benchmark
    bench = vlmeval.benchmark(name, args.kind)
    if not args.model_name or "/" in args.model_name:
        raise ValueError(f"--model-name {args.model_name!r}: expected a name (VLMEvalKit's, e.g. {MODEL_NAME})")
    stem = f"{args.model_name}_{name}"
    out_dir = args.output
    job_args = argparse.Namespace(**vars(args))
    job_args.output, job_args.input = out_dir / f"{stem}.jsonl", args.data
    tsv, report_json, report_md = out_dir / f"{stem}.tsv", out_dir / f"{stem}_score.json", out_dir / f"{stem}_score.md"
    gen = {"max_new_tokens": args.max_new_tokens or vlmeval.MAX_NEW_TOKENS, "temperature": 0.0}
    state: dict = {}

    def read() -> list[Item]:
        from points.io.benchmark_tsv import header_of, read_tsv
        from points.io.config import read_config
        from points.io.outputs import check_output_dir
        from points.pipeline import resolve_device
        from points.tooling.scorers import check_rows

        rows = read_tsv(args.data)
        header = header_of(args.data)
        for column in ("image", "question"):
            if column not in header:
                raise ValueError(f"--data {args.data}: no \"{column}\" column (VLMEvalKit's benchmark files have "
                                 "index, image, question, ...)")
        asked = [r for r in rows if r.image_data]  # (VLMEvalKit drops the rows without an image: skip_noimg)
        if not asked:
            raise ValueError(f"--data {args.data}: no row has an image")
        try:
            check_rows(name, bench.kind, asked)
        except ValueError as e:
            raise ValueError(f"--data {args.data}, {e}" if str(e).startswith("line") else f"--data {args.data}: {e}") \
                from None
        check_output_dir(out_dir, sources={"--data": args.data})
        read_config(args.model)
        resolve_device(args.device)
        out_dir.mkdir(parents=True, exist_ok=True)
        if len(asked) < len(rows):
            print(f"points eval: {len(rows) - len(asked)} row(s) without an image left out, as VLMEvalKit leaves "
                  "them", file=sys.stderr)
        state["rows"], state["header"] = {r.index: r for r in asked}, header
        return [Item(k, r.index, [], r.line) for k, r in enumerate(asked)]

    def key(items: list[Item]) -> dict:
        import hashlib

        digest = hashlib.sha256()
        with open(args.data, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return {"model": str(Path(args.model).resolve()), "data_sha256": digest.hexdigest(), "benchmark": name,
                "kind": bench.kind, "dtype": args.dtype, **quantize_record(args),
                "gen": gen}

    load = generating_pipeline(args)

    def work(pipe, share, journal, progress):
        from points.tooling.run import process

        process(pipe, share, gen, journal, progress, build=lambda it: vlmeval.messages(state["rows"][it.id], bench))

    def before(items: list[Item], records: list[dict]) -> None:
        from points.io.atomic import write_text_atomically
        from points.io.benchmark_tsv import write_predictions
        from points.tooling.scorers import score

        rows = list(state["rows"].values())
        predictions = {r["id"]: r.get("reply", "") for r in records}
        write_text_atomically(tsv, write_predictions(tsv, state["header"], rows, predictions))
        result = score(name, bench.kind, rows, predictions)
        report = {"benchmark": name, "kind": bench.kind, "score": None if result is None else result.get("score"),
                  "scores": result, "rows": len(rows), "failed": sum("error" in r for r in records),
                  "model": str(Path(args.model).resolve()), "model_name": args.model_name, "dtype": args.dtype,
                  **quantize_record(args),
                  "predictions": str(tsv), "command": " ".join(["points", "eval", *(argv or sys.argv[2:])])}
        if result is None:
            report["note"] = (f"{name} is scored by a judge model in VLMEvalKit: run its evaluator on {tsv.name} "
                              "(README, Evaluate)")
        write_text_atomically(report_json, json.dumps(report, indent=1, ensure_ascii=False) + "\n")
        write_text_atomically(report_md, markdown(report))
        print(markdown(report), file=sys.stderr)

    return drive(Job("points eval", job_args, read, key, load, work, RESULTS, before=before, unit="rows",
                     outputs=(("--output", tsv), ("--output", report_json), ("--output", report_md)),
                     sources={"--data": args.data}))


def _flat(scores: dict, prefix: str = "") -> dict[str, float]:
    """{"Overall/none": 61.1, "category/coarse perception/none": ...}: every number of a score dict."""
    out = {}
    for k, v in (scores or {}).items():
        if isinstance(v, dict):
            out |= _flat(v, f"{prefix}{k}/")
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = float(v)
    return out


def markdown(report: dict) -> str:
    quant = report["quantize"] or "none"
    overall = (report["scores"] or {}).get("Overall")
    splits = ", ".join(overall) if report["kind"] == "MCQ" and isinstance(overall, dict) else "-"
    head = (f"| benchmark | split | score | n | model | dtype | quantization |\n|---|---|---|---|---|---|---|\n"
            f"| {report['benchmark']} ({report['kind']}) | {splits} | "
            f"{'-' if report['score'] is None else format(report['score'], '.2f')} | "
            f"{(report['scores'] or {}).get('n', report['rows'])} | {report['model_name']} ({os.path.basename(report['model'])}) | "
            f"{report['dtype'] or 'checkpoint'} | {quant} |\n")
    lines = [f"| {k} | {v:.2f} |" for k, v in _flat(report["scores"]).items() if k not in ("score", "n", "unscored")]
    detail = "\n| figure | value |\n|---|---|\n" + "\n".join(lines) + "\n" if lines else ""
    note = f"\n{report['note']}\n" if report.get("note") else ""
    return f"{head}{detail}{note}\n`{report['command']}`\n"


def compare(a: Path, b: Path) -> int:
    """Two reports side by side on stdout (a ValueError names an unreadable one)."""
    reports = []
    for path in (a, b):
        try:
            reports.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"--compare {path}: not a points eval report ({e})") from None
        r = reports[-1]
        if not isinstance(r, dict) or "benchmark" not in r or not isinstance(r.get("scores") or {}, dict) \
                or not isinstance(r.get("score"), (int, float, type(None))):
            raise ValueError(f"--compare {path}: not a points eval report (expected its \"benchmark\", \"score\" "
                             "and \"scores\")")
    ra, rb = reports
    label = lambda r, p: f"{p.stem} ({r.get('dtype') or 'checkpoint'}, {r.get('quantize') or 'no quantization'})"  # noqa: E731
    out = [f"| figure | {label(ra, a)} | {label(rb, b)} | B - A |", "|---|---|---|---|"]
    fa, fb = _flat(ra.get("scores")), _flat(rb.get("scores"))
    nan = float("nan")
    fa["score"], fb["score"] = [nan if r.get("score") is None else float(r["score"]) for r in (ra, rb)]
    for k in ["score"] + [k for k in fa if k in fb and k != "score"]:
        out.append(f"| {k} | {fa[k]:.2f} | {fb[k]:.2f} | {fb[k] - fa[k]:+.2f} |")
    if ra.get("benchmark") != rb.get("benchmark"):
        out.insert(0, f"(different benchmarks: {ra.get('benchmark')} and {rb.get('benchmark')})")
    print("\n".join(out))
    return 0
