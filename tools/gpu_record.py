#!/usr/bin/env python3
"""The record of one `tools/gpu_check.sh --record` run: `<dir>/<card>-<date>.json` with the device, torch,
the `points bench --preset 7b --compile` JSON (attn auto; and the prefill/vision rows with attn triton) and
the Triton kernel's speed against SDPA on the issue's five shapes (SDPA time / Triton time, autotuned tiles),
and the weight-only int8 figures (the products, and the compiled int8 decode step against transformers).

    python tools/gpu_record.py OUT_DIR --write docs/gpu     # OUT_DIR: where gpu_check.sh left its JSON
"""

import argparse
import datetime
import json
import re
import shutil
import sys
from pathlib import Path

SHAPES = {  # record key -> (kind, segments or None, length)
    "triton_vs_sdpa_4x4096": ("vision", 4, 4096),
    "triton_vs_sdpa_64x256": ("vision", 64, 256),
    "triton_vs_sdpa_1x16384": ("vision", 1, 16384),
    "triton_vs_sdpa_causal_2048": ("causal", None, 2048),
    "triton_vs_sdpa_causal_8192": ("causal", None, 8192),
}


def kernel_ratios(tune: dict) -> dict:
    ratios = {}
    for key, (kind, segments, length) in SHAPES.items():
        for r in tune["rows"]:
            if r["kind"] == kind and r["length"] == length and r.get("segments", None) == segments:
                ratios[key] = r["sdpa_s"] / r["triton_auto_s"]  # as the model calls them
                if "sdpa_kernel_s" in r:
                    ratios[key + "_kernels_alone"] = r["sdpa_kernel_s"] / r["triton_kernel_s"]
    return ratios


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--write", type=Path, required=True, help="the folder the record goes to")
    args = p.parse_args(argv)
    def read(name):  # a step that failed or ran over its time leaves no JSON: recorded as missing
        path = args.out / name
        return json.loads(path.read_text()) if path.exists() else None

    bench, tune, triton_rows = read("bench.json"), read("tune.json"), read("bench_triton.json")
    if tune is None and bench is None:
        print(f"gpu_record: neither {args.out / 'tune.json'} nor {args.out / 'bench.json'} exists", file=sys.stderr)
        return 1
    device = tune["device"] if tune else bench["machine"].get("gpu", bench["device"])
    date = datetime.date.today().isoformat()
    record = {"device": device, "torch": (tune or bench["machine"])["torch"], "date": date, "bench": bench,
              "bench_attn_triton": triton_rows, "kernels": kernel_ratios(tune) if tune else None,
              "int8_products": read("int8_products.json"), "bench_int8": read("bench_int8.json"),
              "bench_int4": read("bench_int4.json"),
              "serve": read("serve.json"),
              "missing": [n for n, v in (("bench.json", bench), ("tune.json", tune)) if v is None]}
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")
    args.write.mkdir(parents=True, exist_ok=True)
    path = args.write / f"{slug}-{date}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    if path.parent.resolve() != args.out.resolve():
        shutil.copy(path, args.out / "record.json")
    print(f"recorded {path}: " + ", ".join(f"{k} {v:.2f}x" for k, v in (record["kernels"] or {}).items())
          + (f" (missing: {', '.join(record['missing'])})" if record["missing"] else ""))
    return 1 if record["missing"] else 0


if __name__ == "__main__":
    sys.exit(main())
