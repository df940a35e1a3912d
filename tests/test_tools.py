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
    vision = json.loads((tmp_path / "vision.json").read_text())
    assert vision["patches"] == 1024 and vision["time_min_s"] > 0 and vision["floor_s"] > 0
    kernels = json.loads((tmp_path / "kernels.json").read_text())
    assert set(kernels["decode_s_per_token"]) == {"points eager", "points compiled", "transformers"}
    assert kernels["vision"]["triton"]["min_s"] > 0
