#!/usr/bin/env bash
# One run on a lent GPU machine: the test suite on CUDA, then the measurements; a short table last.
#   bash tools/gpu_check.sh             # on the GPU machine (under 8 minutes on an H200)
#   bash tools/gpu_check.sh --record    # the same, and writes docs/gpu/<card>-<date>.json (+ a copy in $OUT)
#   bash tools/gpu_check.sh --dry-run   # anywhere: the same steps, small and on the CPU (tested in CI)
# Logs and JSON go to $OUT (the device tool's folder) or /tmp/points-gpu-check.
# Steps: pytest on CUDA; tools/precision.py (7B widths, 2 layers); tools/tune_attention.py (SDPA vs the Triton
# kernel per tile configuration, the data behind CONFIGS and attn="auto"); `points bench --preset 7b --compile`
# (decode, prefill, vision against transformers on the same weights) with attn auto and with attn triton;
# weight-only int8 and int4: the products (tools/bench_int8.py, this project's Triton kernels among them) and
# the compiled int8 and int4 decode steps (`--quantize int8`, `--quantize int4`); `points serve` under 1 / 8 /
# 16 clients (tools/bench_serve.py).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/points-gpu-check}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=python3
command -v "$py" >/dev/null || py=python
mode="${1:-}"

if [ "$mode" = "--dry-run" ]; then
    export TRITON_INTERPRET=1  # the CPU steps run Triton in its interpreter, a CUDA machine included
    device=cpu preset=tiny tune_args=(--dry-run)
    pytest_args=(--collect-only -q tests/test_kernels.py)  # the step's plumbing; CI runs the whole suite
    bench_args=(--preset tiny --device cpu --dtype float32 --repeat 1 --quick)
    compile_args=(--compile --compile-backend eager)  # dynamo traces the step; inductor's CPU build is not the GPU's
    # (and so in the int8 products' compiled row: --compile-backend eager below)
    limits=(600 600 600 600 600 600 600 600 600)
else
    device=cuda preset=7b-width tune_args=()
    pytest_args=(-q -rs --continue-on-collection-errors tests)
    "$py" -c "import xdist" 2>/dev/null && pytest_args+=(-n 8)
    bench_args=(--preset 7b --device cuda --dtype bfloat16 --repeat 2)
    compile_args=(--compile)
    limits=(170 40 55 200 40 45 80 70 90)  # seconds: pytest, precision, tune, bench, bench_triton, int8/int4 products, int8 decode, int4 decode, serve
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
    # the machine has its own torch, Triton and transformers and no network: install the project alone
    # (points.kernels exists only once installed: the package maps kernels/ to it)
    "$py" -m pip install -q --no-deps --no-build-isolation -e . > "$out/install.log" 2>&1 || { cat "$out/install.log"; exit 1; }
fi
"$py" -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__, '| cuda', torch.cuda.is_available())"

status=0
step() {  # name, time limit, then the command; its output to $out/<name>.log, its time to the summary
    local name=$1 limit=$2; shift 2
    local start=$(date +%s)
    timeout "$limit" "$@" > "$out/$name.log" 2>&1 || { echo "!! $name failed or ran over ${limit}s" | tee -a "$out/$name.log"; status=1; }
    echo "[$name $(( $(date +%s) - start ))s]" >> "$out/times.txt"
}
: > "$out/times.txt"
step pytest "${limits[0]}" "$py" -m pytest "${pytest_args[@]}"
step precision "${limits[1]}" "$py" tools/precision.py --preset "$preset" --device "$device" --json "$out/precision.json"
step tune "${limits[2]}" "$py" tools/tune_attention.py --device "$device" "${tune_args[@]}" --json "$out/tune.json"
step bench "${limits[3]}" "$py" -m points bench "${bench_args[@]}" --rows decode prefill vision "${compile_args[@]}" --json "$out/bench.json"
[ "$mode" = "--dry-run" ] || step bench_triton "${limits[4]}" "$py" -m points bench "${bench_args[@]}" --rows prefill vision --attn triton --json "$out/bench_triton.json"
step int8_products "${limits[5]}" "$py" tools/bench_int8.py --preset "$( [ "$device" = cuda ] && echo 7b || echo tiny )" --device "$device" --dtype "$( [ "$device" = cuda ] && echo bfloat16 || echo float32 )" --rows 1 4 --repeat 2 $( [ "$mode" = "--dry-run" ] && echo --bursts 1 --compile-backend eager ) --json "$out/int8_products.json"
step int8_decode "${limits[6]}" "$py" -m points bench "${bench_args[@]}" --rows decode "${compile_args[@]}" --quantize int8 --json "$out/bench_int8.json"
step int4_decode "${limits[7]}" "$py" -m points bench "${bench_args[@]}" --rows decode "${compile_args[@]}" --quantize int4 --json "$out/bench_int4.json"
# points serve under 1 / 8 / 16 clients, the small preset as in the CPU rows (a 7B checkpoint would be written
# to disk first); not in the dry run (two servers' start-up), run by hand on the CPU with --preset tiny
[ "$mode" = "--dry-run" ] || step serve "${limits[8]}" "$py" tools/bench_serve.py --preset small --device cuda --dtype bfloat16 --clients 1 8 16 --requests 2 --workdir /tmp/points-serve-work --json "$out/serve.json"

echo
echo "== points gpu_check ($device) =="
echo "tests: $(tail -n 1 "$out/pytest.log")"
for name in precision tune bench bench_triton int8_products int8_decode int4_decode serve; do [ -f "$out/$name.log" ] && cat "$out/$name.log"; done
cat "$out/times.txt"
if [ "$mode" = "--record" ] || [ "$mode" = "--dry-run" ]; then
    "$py" tools/gpu_record.py "$out" --write "$( [ "$mode" = "--record" ] && echo docs/gpu || echo "$out" )" || status=1
fi
exit $status
