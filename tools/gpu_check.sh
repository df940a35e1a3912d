#!/usr/bin/env bash
# One run on a lent GPU machine: the test suite on CUDA, then the measurements; a short table last.
#   bash tools/gpu_check.sh            # on the GPU machine (well under 8 minutes)
#   bash tools/gpu_check.sh --dry-run  # anywhere: the same steps, small and on the CPU (tested in CI)
# Logs and JSON go to $OUT (the device tool's folder) or /tmp/points-gpu-check.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/points-gpu-check}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=python3
command -v "$py" >/dev/null || py=python

if [ "${1:-}" = "--dry-run" ]; then
    device=cpu preset=tiny pytest_args=(--collect-only -q) vision_args=(--images 448x448 --depth 2) kernel_args=(--preset tiny)
else
    device=cuda preset=7b-width pytest_args=(-q -rs --continue-on-collection-errors) vision_args=(--dtype bfloat16 --repeat 5) kernel_args=(--preset 7b)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
    # the machine has its own torch, Triton and transformers and no network: install the project alone
    # (points.kernels exists only once installed: the package maps kernels/ to it)
    "$py" -m pip install -q --no-deps --no-build-isolation -e . > "$out/install.log" 2>&1 || { cat "$out/install.log"; exit 1; }
fi
"$py" -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__, '| cuda', torch.cuda.is_available())"

status=0
start=$(date +%s)
"$py" -m pytest "${pytest_args[@]}" tests > "$out/pytest.log" 2>&1 || status=1
tests_s=$(( $(date +%s) - start ))
tail -n 25 "$out/pytest.log"

start=$(date +%s)
"$py" tools/precision.py --preset "$preset" --device "$device" --json "$out/precision.json" > "$out/precision.log" 2>&1 || status=1
precision_s=$(( $(date +%s) - start ))

start=$(date +%s)
"$py" tools/bench_vision.py --device "$device" "${vision_args[@]}" --json "$out/vision.json" > "$out/vision.log" 2>&1 || status=1
vision_s=$(( $(date +%s) - start ))

start=$(date +%s)
"$py" tools/bench_kernels.py --device "$device" "${kernel_args[@]}" --json "$out/kernels.json" > "$out/kernels.log" 2>&1 || status=1
kernels_s=$(( $(date +%s) - start ))

echo
echo "== points gpu_check ($device) =="
echo "tests: $(tail -n 1 "$out/pytest.log") [${tests_s}s]"
cat "$out/precision.log"
echo "[precision ${precision_s}s]"
cat "$out/vision.log"
echo "[vision ${vision_s}s]"
tail -n 6 "$out/kernels.log"
echo "[kernels ${kernels_s}s]"
exit $status
