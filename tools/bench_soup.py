#!/usr/bin/env python3
"""`points soup` against the official `model_soup`'s way, same inputs, same sitting: time, peak memory and
how far each lands from the exact mean.

    python tools/bench_soup.py                       # 3 random `small` checkpoints (bf16), 2 rounds
    python tools/bench_soup.py --preset tiny --rounds 1 --quick      # a quick look

The official way (WePOINTS `wepoints/utils/models/model_soup.py`) loads every model whole, then for each
tensor sums the N state dicts in the model dtype (bf16) and divides by N, then saves. Here it is done with the
same steps and no transformers: every input read into memory (`safetensors.torch.load_file`, as
from_pretrained materializes a model), summed and divided in the stored dtype, saved (`save_file`). Each side
runs in its own interpreter (peak RSS growth from /proc/self/status VmHWM); the inputs are read once before
the first round so that both read them from the page cache. The floor is the slower of the bytes moved in
memory (N inputs read, one output written, over the copy bandwidth measured in the run) and the output
written to disk with its fsync (a 1 GiB write probed in the run; the official way's save does not fsync).
"Differ" counts the elements that are not the float64 mean rounded once to the stored dtype, with the largest
such difference relative to its tensor's RMS.
"""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from points.io.tensors import TensorFiles
from points.tooling.measure import BURSTS, copy_bandwidth, machine
from points.tooling.synthetic import SHAPES, write_checkpoint

PROBE = """
import json, sys, time
import torch, safetensors.torch, points.tooling.soup  # (imports before the measure: the same for both)
def rss(field):
    for line in open('/proc/self/status'):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
before = rss('VmRSS:')
t0 = time.perf_counter()
{code}
print(json.dumps({{"s": time.perf_counter() - t0, "peak_growth_bytes": rss('VmHWM:') - before}}))
"""

OURS = """
from points.tooling.soup import soup
soup({inputs!r}, {out!r}, progress=False)
"""

OFFICIAL = """
import torch
from pathlib import Path
from safetensors.torch import load_file, save_file
state_dicts = []
for d in {inputs!r}:
    sd = {{}}
    for f in sorted(Path(d).glob('*.safetensors')):
        sd.update(load_file(str(f)))
    state_dicts.append(sd)
average = {{}}
for key in state_dicts[0]:
    total = 0
    for sd in state_dicts:
        total = total + sd[key]
    average[key] = total / len(state_dicts)
Path({out!r}).mkdir()
save_file(average, str(Path({out!r}) / 'model.safetensors'), metadata={{'format': 'pt'}})
"""


def probe(code: str) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE.format(code=code)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def differing(inputs: list[Path], outs: list[Path]) -> list[tuple[float, float]]:
    """For each of `outs`: (the fraction of elements that differ from the float64 mean rounded once to the
    stored dtype, the largest difference relative to the tensor's RMS), over every tensor. The exact mean is
    computed once per tensor for all of them."""
    opened, results = [TensorFiles(p) for p in inputs], [TensorFiles(p) for p in outs]
    bad, worst, count = [0] * len(outs), [0.0] * len(outs), 0
    for name in opened[0].names:
        mean = sum(f.get(name).double() for f in opened) / len(opened)
        count += mean.numel()
        for i, result in enumerate(results):
            got = result.get(name)
            exact = mean.to(got.dtype).double()
            diff = got.double() - exact
            bad[i] += int((diff != 0).sum())
            rms = float(exact.pow(2).mean().sqrt()) or 1.0
            worst[i] = max(worst[i], float(diff.abs().max()) / rms)
    return [(b / count, w) for b, w in zip(bad, worst)]


def disk_write_rate(folder: Path, nbytes: int = 1 << 30) -> float:
    """Bytes per second of one large write into `folder`, fsync included (the soup's output pays it)."""
    import os
    import time

    path, block = folder / ".disk-probe", b"\0" * (64 << 20)
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(nbytes // len(block)):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    rate = nbytes / (time.perf_counter() - t0)
    path.unlink()
    return rate


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(SHAPES), default="small")
    p.add_argument("--inputs", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--quick", action="store_true", help="one copy-bandwidth burst of 256 MiB copies and a 128 MiB disk "
                   "probe (to see that it runs; the floor means little)")
    args = p.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-soup-"))
    inputs = []
    for i in range(args.inputs):
        d = work / f"{args.preset}-seed{i}"
        if not d.exists():
            print(f"writing {d} ...", file=sys.stderr)
            write_checkpoint(d, args.preset, seed=i, tokenizer="bytes")
        inputs.append(d)
    size = sum(f.stat().st_size for f in inputs[0].glob("*.safetensors"))
    for d in inputs:  # into the page cache, for both sides alike
        for f in d.glob("*.safetensors"):
            f.read_bytes()
    bandwidth = copy_bandwidth(torch.device("cpu"), (256 << 20) if args.quick else None, 1 if args.quick else BURSTS)
    disk = disk_write_rate(work, (128 << 20) if args.quick else (1 << 30))
    floor = max((args.inputs + 1) * size / bandwidth, size / disk)  # bytes moved in memory; the output to disk
    rows = {"points soup": OURS, "official way": OFFICIAL}
    results = {name: [] for name in rows}
    for r in range(args.rounds):
        for name, code in rows.items():
            out = work / f"out-{name.split()[0]}"
            shutil.rmtree(out, ignore_errors=True)
            results[name].append(probe(code.format(inputs=[str(d) for d in inputs], out=str(out))))
    info = machine(torch.device("cpu"))
    print(f"# {info['cpu']} ({info['cpu_flags']}), {info['threads']} threads, torch {info['torch']}; "
          f"{args.inputs} x {args.preset} ({size / 1e9:.2f} GB each, bf16); copy bandwidth {bandwidth / 1e9:.1f} GB/s, "
          f"disk write with fsync {disk / 1e9:.2f} GB/s")
    print("| way | time (best of rounds) | peak RSS growth | differ from the mean rounded once | largest / RMS |")
    print("|---|---|---|---|---|")
    measured = differing(inputs, [work / f"out-{name.split()[0]}" for name in rows])
    for name, (frac, worst) in zip(rows, measured):
        best = min(results[name], key=lambda x: x["s"])
        peak = max(x["peak_growth_bytes"] for x in results[name])
        rounds = ", ".join(f"{x['s']:.2f}" for x in results[name])
        print(f"| {name} | {best['s']:.2f} s (rounds: {rounds}) | "
              f"{peak / 1e9:.2f} GB | {frac:.4%} | {worst:.2e} |")
    t_ours = min(x["s"] for x in results["points soup"])
    t_off = min(x["s"] for x in results["official way"])
    print(f"\nofficial / ours time: {t_off / t_ours:.2f}x; floor (the inputs and output through memory, or the "
          f"output to disk, whichever is slower): {floor:.2f} s (ours {floor / t_ours:.0%} of it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
