"""The GPU check script's CPU dry run and the precision tool keep working without a GPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run(tmp_path):
    run = subprocess.run(["bash", str(ROOT / "tools/gpu_check.sh"), "--dry-run"], capture_output=True, text=True,
                         env={**os.environ, "OUT": str(tmp_path),
                              "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")})
    assert run.returncode == 0, run.stdout + run.stderr
    assert "== points gpu_check (cpu) ==" in run.stdout and "tests collected" in run.stdout
    rows = json.loads((tmp_path / "precision.json").read_text())["rows"]
    assert [r["dtype"] for r in rows] == ["float32", "bfloat16", "float16"]
    assert rows[0]["max_abs"] < 1e-4 and rows[1]["transformers_own"] > 0
    tune = json.loads((tmp_path / "tune.json").read_text())
    assert {r["kind"] for r in tune["rows"]} == {"vision", "causal", "cached"}
    assert all(r["sdpa_s"] > 0 and r["triton_auto_s"] > 0 for r in tune["rows"])
    record = json.loads(next(tmp_path.glob("cpu-*.json")).read_text())
    labels = [r["row"] for r in record["bench"]["rows"]]
    assert "decode batch 4 (ragged), 64 tokens, compiled" in labels and "prefill 2048 tokens" in labels
    assert {r["kernel"] for r in record["int8_products"]["rows"]} >= {"F.linear", "int8, _weight_int8pack_mm"}
    int8_labels = [r["row"] for r in record["bench_int8"]["rows"]]
    assert "decode batch 1, 64 tokens, compiled" in int8_labels and record["bench_int8"]["quantize"]["scheme"] == "int8"


def test_points_bench_tiny_writes_every_row(tmp_path):
    """`points bench` end to end on the tiny preset (one timed run per row): every row is measured on both
    sides with a ratio and a floor, and the JSON carries the machine's description."""
    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, "-m", "points", "bench", "--preset", "tiny", "--device", "cpu", "--repeat", "1",
                          "--workdir", str(tmp_path / "work"), "--json", str(out)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(out.read_text())
    labels = [r["row"] for r in result["rows"]]
    assert [lab.split(" (")[0] for lab in labels[:3]] == ["vision 448x448", "vision 1008x756", "vision 4 mixed, packed"]
    assert labels[3:] == ["prefill 512 tokens", "prefill 2048 tokens", "decode batch 1, 64 tokens",
                          "decode batch 4 (ragged), 64 tokens", "load, released layout", "load, converted layout"]
    for row in result["rows"]:
        assert row["points"]["min_s"] > 0 and row["transformers"]["min_s"] > 0 and row["floor_s"] > 0, row
        assert row["ratio"] == row["transformers"]["min_s"] / row["points"]["min_s"]
    assert all(row["points"]["peak_bytes"] > 0 for row in result["rows"][-2:])
    assert {"cpu", "threads", "torch", "transformers"} <= set(result["machine"])
    assert "ratio" in run.stdout and "of floor" in run.stdout


def test_points_bench_rejects_bad_arguments():
    run = subprocess.run([sys.executable, "-m", "points", "bench", "--repeat", "0"], capture_output=True, text=True)
    assert run.returncode == 2 and "--repeat must be >= 1" in run.stderr


def test_bench_run_tool_tiny(tmp_path):
    """tools/bench_run.py end to end on the tiny preset: both mixes measured, the batched replies identical to
    the one-at-a-time loop (float32)."""
    out = tmp_path / "run.json"
    done = subprocess.run([sys.executable, str(ROOT / "tools/bench_run.py"), "--preset", "tiny", "--dtype", "float32",
                           "--items", "6", "--new", "4", "--batch-size", "3", "--workdir", str(tmp_path / "w"),
                           "--json", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [r["mix"] for r in rows] == ["text", "images"] and [r["images"] for r in rows] == [0, 2]
    assert all(r["identical_replies"] == 6 and r["ratio"] > 0 and r["prefill_vision_floor_s"] > 0 for r in rows)


def test_bench_prefix_tool_tiny(tmp_path):
    """tools/bench_prefix.py on the tiny preset: the cached second turn reuses turn 1 (all of its prompt)."""
    out = tmp_path / "prefix.json"
    done = subprocess.run([sys.executable, str(ROOT / "tools/bench_prefix.py"), "--preset", "tiny", "--history", "100",
                           "--repeat", "1", "--workdir", str(tmp_path / "w"), "--json", str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(out.read_text())
    cache, plain = result["rows"]
    assert cache["reused_tokens"] >= result["turn1_tokens"] and plain["reused_tokens"] == 0
    assert cache["prefilled_tokens"] + cache["reused_tokens"] == result["turn2_tokens"] == plain["prefilled_tokens"]
