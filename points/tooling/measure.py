"""Measuring, for `points bench` and tools/: timings, the machine's floors (copy bandwidth, matmul rate), the
work of each row (FLOPs, bytes), and both sides' decode loops timed the same way (ours: the scheduler, the loop
chat, run and serve use). Importing it runs nothing.

`engine_generate` / `engine_decode` drive the engine alone (prefill, then one step per token, no scheduler):
for tests of the engine's math and for baselines that are not the product (tools/bench_run.py's fixed batches,
tools/quantization_quality.py's greedy agreement between two decoders).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

import torch

from points.kernels import cpu_build
from points.io.chat import Prompt
from points.runtime.engine import Engine
from points.runtime.generation import GenerationConfig
from points.runtime.sampling import Picker
from points.runtime.scheduler import Scheduler


# --------------------------------------------------------------------------- measuring

@dataclass
class Timing:
    min_s: float
    median_s: float
    runs: list[float]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeat: int = 5, warmup: int = 1) -> Timing:
    """Wall time of fn() (synchronised on CUDA): `warmup` untimed calls, then `repeat` timed ones. If fn
    returns a number, that is taken as the time of the part it measured itself."""
    for _ in range(warmup):
        fn()
    runs = []
    for _ in range(repeat):
        sync(device)
        t0 = time.perf_counter()
        inner = fn()
        sync(device)
        runs.append(inner if isinstance(inner, float) else time.perf_counter() - t0)
    return Timing(min(runs), statistics.median(runs), runs)


@dataclass
class Bandwidth:
    best: float  # bytes read + written per second, the best copy
    median: float  # of every timed copy
    spread: float  # (best - slowest) / best over the timed copies
    bursts: list[float] = field(default_factory=list)  # the best copy of each burst

    def __str__(self) -> str:
        return f"{self.best / 1e9:.1f} GB/s (median {self.median / 1e9:.1f}, spread {self.spread:.0%})"


# The memory a shared VM gives one guest moves from one second to the next (23-37 GB/s between bursts a second
# apart on this project's CPU machine, 2026-12-02, while each burst's own copies agreed within 10%): a floor
# taken from one burst moved 50% between runs. The best of 8 bursts a second apart held within 6% over four
# trials there (34.8, 34.9, 35.0, 36.8 GB/s) and within 14% over four `points bench` runs of one hour (34.0-38.9);
# hence 12, about 15 s a probe.
BURSTS, BURST_COPIES, BURST_PAUSE_S = 12, 3, 1.0


def copy_stats(device: torch.device, nbytes: int = 1 << 30, bursts: int = BURSTS, copies: int = BURST_COPIES,
               pause_s: float = BURST_PAUSE_S) -> Bandwidth:
    """Bytes read + written per second by copies of `nbytes` (1 GiB: far beyond any CPU's last-level cache,
    which a 256 MiB copy was not), in `bursts` bursts `pause_s` apart, each one untimed copy (pages faulted
    in, clocks up) and then `copies` timed ones. The best copy is the machine's bandwidth. A GPU's memory is
    not shared that way: one burst of 10 copies there."""
    if device.type == "cuda":
        bursts, copies = 1, 10
    x = torch.ones(nbytes, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    rates, best = [], []
    for i in range(bursts):
        if i:
            time.sleep(pause_s)
        t = timed(lambda: y.copy_(x), device, repeat=copies, warmup=1)
        burst = sorted(2 * nbytes / s for s in t.runs)
        rates += burst
        best.append(burst[-1])
    rates.sort()
    return Bandwidth(rates[-1], statistics.median(rates), (rates[-1] - rates[0]) / rates[-1], best)


def copy_bandwidth(device: torch.device, nbytes: int | None = None, bursts: int = BURSTS) -> float:
    """The floors' bandwidth: the best of `copy_stats` (bytes read + written per second)."""
    return copy_stats(device, nbytes or (1 << 30), bursts).best


def matmul_rate(n: int, k: int, m: int, dtype: torch.dtype, device: torch.device) -> float:
    """FLOP/s of one [n, k] x [k, m] product in `dtype` (best of 3)."""
    a = torch.randn(n, k, device=device).to(dtype)
    b = torch.randn(m, k, device=device).to(dtype)
    with torch.inference_mode():
        best = timed(lambda: torch.nn.functional.linear(a, b), device, repeat=5).min_s
    return 2 * n * k * m / best


VECTOR_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "amx_tile",
                "amx_bf16", "amx_int8")


def cpu_flags() -> str:
    """The vector units /proc/cpuinfo reports that decide which kernels win (space-separated, in VECTOR_FLAGS'
    order; "" where it cannot be read)."""
    have = cpu_build.cpu_flags()
    return " ".join(f for f in VECTOR_FLAGS if f in have)


def machine(device: torch.device) -> dict:
    cpu = cpu_build.cpu_model()
    info = {"cpu": cpu, "cpu_flags": cpu_flags(), "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:  # the installed version, read without importing transformers (1-4 s)
        info["transformers"] = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        pass
    return info


# --------------------------------------------------------------------------- work sizes

def vision_grid(sizes: list[tuple[int, int]], processor) -> torch.Tensor:
    """[n, 3] (t, h, w) in patches after the checkpoint's image processor (under its member's rules) resizes
    images of these sizes."""
    return torch.tensor([(1, *(s // processor.patch_size for s in processor.target_size(h, w))) for h, w in sizes])


def vision_flops(v, grid: torch.Tensor) -> float:
    """Matmul FLOPs of one encode: patch embedding, each block's projections and MLP, per-image attention."""
    E, M = v.embed_dim, v.mlp_dim
    frames = [int(t) for t in grid[:, 0].tolist()]
    sizes = [int(h * w) for h, w in grid[:, 1:].tolist()]
    L = sum(t * s for t, s in zip(frames, sizes))
    attention = sum(t * 4 * s * s * E for t, s in zip(frames, sizes))
    return 2 * L * v.patch_dim * E + v.depth * (L * 2 * (4 * E * E + 2 * E * M) + attention)


def projector_flops(cfg, grid: torch.Tensor) -> float:
    """Matmul FLOPs of the projector over one encode's features: per merge window (L / m^2 of them) a
    [merge_dim, merge_dim] and a [merge_dim, decoder width] product (the width is the member's decoder's)."""
    windows = int(grid.prod(-1).sum()) // cfg.vision.spatial_merge_size ** 2
    return 2 * windows * cfg.merge_dim * (cfg.merge_dim + cfg.decoder.hidden_size)


def prefill_flops(d, T: int) -> float:
    """Matmul FLOPs of a T-token prefill computing the last position's logits (causal attention: half). The
    q/k/v and output projections are hidden x (heads + 2 kv_heads) x head_dim and heads x head_dim x hidden
    with head_dim as the config gives it (Qwen3's is not hidden / heads); q/k norms and rotary are no matmuls."""
    per_token = 2 * d.n_layers * (d.hidden_size * (d.n_heads + 2 * d.n_kv_heads) * d.head_dim
                                  + d.n_heads * d.head_dim * d.hidden_size + 3 * d.hidden_size * d.ffn_size)
    attention = d.n_layers * 2 * T * T * d.n_heads * d.head_dim  # 4 T^2 H D / 2
    return T * per_token + attention + 2 * d.hidden_size * d.vocab_size


def decode_bytes(decoder, kv_len: int, batch: int) -> int:
    """Bytes one decode step must read: every weight but the embedding table, of which each row reads one
    row; the visible K/V of every row (K and V: n_kv_heads x head_dim each, head_dim as the config gives it).
    The head is counted once as lm_head whether or not it is tied: a tied head is the embedding matrix, read
    whole by the head's product (the embedding row a token looks up comes on top, as for an untied one). A head
    that shares the embedding's very Parameter is counted too (hence remove_duplicate=False: deduplicated,
    named_parameters would give it only under the embedding's name)."""
    d = decoder.cfg
    w = sum(p.numel() * p.element_size() for n, p in decoder.named_parameters(remove_duplicate=False)
            if n != "embed.weight")
    item = decoder.embed.weight.element_size()
    return w + batch * d.hidden_size * item + 2 * d.n_layers * batch * d.n_kv_heads * kv_len * d.head_dim * item


# --------------------------------------------------------------------------- the two sides

class _Clock:
    """A transformers streamer that stamps the time of every generated step."""

    def __init__(self, device):
        self.device, self.stamps = device, []

    def put(self, value):
        sync(self.device)
        self.stamps.append(time.perf_counter())

    def end(self):
        pass


def ours_decode(model, tokenizer, engine: Engine, prompts: torch.Tensor, lengths: torch.Tensor, new: int):
    """Seconds per step of `new` greedy steps through the scheduler (what chat, run and serve run: the step with
    the choice inside it, the tokens read and pushed to their requests), after an untimed step that prefills
    the prompts (rows of the right-padded `prompts`, `lengths` real tokens each) and chooses their first
    tokens. Stop tokens end no row (ignore_eos): every row takes every step."""
    rows = [prompts[i, :n].tolist() for i, n in enumerate(lengths.tolist())]
    cfg = GenerationConfig(max_new_tokens=new + 1, ignore_eos=True)  # new + 1 tokens: `new` steps

    def run() -> float:
        s = Scheduler(model, tokenizer, engine, max_batch=len(rows), max_prefill_tokens=sum(map(len, rows)))
        for ids in rows:
            s.submit(Prompt([], None, None), ids, cfg)  # (token ids given: the prompt's text is not read)
        s.step()
        sync(prompts.device)
        t0 = time.perf_counter()
        while s.step():
            pass
        sync(prompts.device)
        return (time.perf_counter() - t0) / new
    return run


def engine_decode(engine: Engine, cache, logits: torch.Tensor, pick: Picker, max_new: int):
    """The engine alone: max_new chosen ids [B] (device tensors), the first from the prefill's `logits`, each
    next one from a step (max_new - 1 steps; step t + 1 is queued before token t is yielded)."""
    pick.draw()
    nxt = pick(logits)
    for i in range(max_new):
        chosen = nxt.clone()  # (a CUDA-graph step's output is overwritten by its next run)
        if i < max_new - 1:
            pick.draw()
            nxt = engine.step(chosen[:, None], cache, pick)
        yield chosen


def engine_generate(engine: Engine, pick: Picker, max_new: int, *, tokens: torch.Tensor | None = None,
                    embeds: torch.Tensor | None = None, lengths: torch.Tensor | None = None):
    """The engine alone: a fresh cache, the prefill of the right-padded prompts, then `engine_decode`."""
    B, T = (tokens if tokens is not None else embeds).shape[:2]
    cache = engine.new_cache(B, T + max_new)
    logits = engine.prefill(cache, tokens=tokens, embeds=embeds, lengths=lengths)
    yield from engine_decode(engine, cache, logits, pick, max_new)


def theirs_decode(llm, prompts: torch.Tensor, lengths: torch.Tensor, new: int):
    B, T = prompts.shape
    left = torch.zeros_like(prompts)
    mask = torch.zeros_like(prompts)
    for i, n in enumerate(lengths.tolist()):  # transformers generates from left-padded rows
        left[i, T - n:], mask[i, T - n:] = prompts[i, :n], 1

    def run() -> float:
        clock = _Clock(prompts.device)
        with torch.inference_mode():
            llm.generate(left, attention_mask=mask, max_new_tokens=new + 1, min_new_tokens=new + 1,
                         do_sample=False, pad_token_id=0, streamer=clock)
        return (clock.stamps[-1] - clock.stamps[1]) / new  # stamps[0]: the prompt; [1]: the prefill's token
    return run


def load_probe(code: str) -> dict:
    """Run `code` (which sets `load`, a callable returning a Pipeline or a tuple of modules) in a fresh
    interpreter: time and peak RSS growth of load() followed by one read over every parameter (a loader
    that maps files lazily pays its reads there, as it would on its first forward)."""
    script = f"""
import json, time, torch
def rss(field):
    for line in open('/proc/self/status'):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
{code}
before = rss('VmRSS:')
t0 = time.perf_counter()
obj = load()
for m in (obj if isinstance(obj, tuple) else (obj.model,)):
    for p in m.parameters():
        p.amax()
if torch.cuda.is_available():
    torch.cuda.synchronize()
dt = time.perf_counter() - t0
print(json.dumps({{"s": dt, "peak_growth_bytes": rss('VmHWM:') - before, "rss_before_bytes": before}}))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"load probe failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])
