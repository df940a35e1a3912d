"""The rows of `points bench` (the command and its options: points/tooling/bench.py): this implementation and
transformers timed on the same weights, each row with its physical floor on this machine. Any named size of
any family member (points.model.family): the transformers side is the member's own class
(points.tooling.reference.transformers_decoder), its images resized under the member's processor rules.

    result = run("small", torch.device("cpu"), torch.float32, repeat=5, workdir=tmp, rows={"decode"}, sizes=SIZES)
    result = run("reader-tiny", ...)   # POINTS-Reader's shapes: a tied Qwen2ForCausalLM on the other side
"""

from __future__ import annotations

import gc
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from points.io.processor import RELEASE_MAX_PIXELS, ImageProcessor
from points.model.family import member
from points.runtime.engine import Engine
from points.runtime.vision import image_features
from points.tooling.measure import (BURSTS, Timing, copy_stats, decode_bytes, load_probe, machine, matmul_rate,
                                    ours_decode, prefill_flops, projector_flops, sync, theirs_decode, timed,
                                    vision_flops, vision_grid)


@dataclass(frozen=True)
class Sizes:
    """The work of each row."""
    vision: dict  # label -> image sizes (height x width) packed into one encode
    prefill: tuple[int, ...]  # prompt lengths
    decode_prompt: int  # batch 1's prompt
    decode_new: int  # steps timed
    ragged: tuple[int, ...]  # batch 4's prompts (right-padded here, left-padded for transformers)
    matmul: tuple[int, ...]  # square products probed for the matmul rate
    long: int  # the M of the shape-specific matmul probes
    copy: int  # bytes of each copy that probes the bandwidth (measure.copy_stats: why 1 GiB)


SIZES = Sizes(vision={"vision 448x448": [(448, 448)], "vision 1008x756": [(1008, 756)],
                      "vision 4 mixed, packed": [(336, 336), (448, 672), (560, 420), (224, 896)]},
              prefill=(512, 2048), decode_prompt=512, decode_new=64, ragged=(512, 400, 300, 200),
              matmul=(1024, 2048, 4096), long=4096, copy=1 << 30)
# --quick: every row at a fraction of the work, to see that each runs (tools/gpu_check.sh --dry-run, tests);
# its figures mean little
QUICK = Sizes(vision={"vision 224x224": [(224, 224)], "vision 336x252": [(336, 252)],
                      "vision 4 mixed, packed": [(112, 112), (112, 168), (168, 112), (56, 224)]},
              prefill=(64, 128), decode_prompt=64, decode_new=8, ragged=(64, 50, 40, 30), matmul=(256, 512), long=512,
              copy=256 << 20)
DECODE_PROMPT = SIZES.decode_prompt  # the decode profile's prompt


# --------------------------------------------------------------------------- the run

@dataclass
class Bench:
    """One run's setting: our model and engine, transformers' two sides on the same tensors (None without
    transformers), the machine's floors, and the result the rows are added to."""
    model: torch.nn.Module
    tokenizer: object  # points.io.tokenizer.Tokenizer: the scheduler's decode rows push text like a request
    engine: Engine
    processor: ImageProcessor
    llm: torch.nn.Module | None
    vision: torch.nn.Module | None
    device: torch.device
    dtype: torch.dtype
    repeat: int
    attn: str
    sizes: Sizes
    bandwidth: float
    rate_llm: float
    rate_vis: float
    result: dict

    def add(self, label, unit, ours: Timing, theirs: Timing | None, floor_s: float, per=1, **fields):
        """fields: what the row measured, for readers of the JSON (kind, batch, tokens, compiled, ...)."""
        row = {"row": label, **fields, "unit": unit, "points": vars(ours), "floor_s": floor_s, "per": per}
        if theirs is not None:
            row["transformers"] = vars(theirs)
            row["ratio"] = theirs.min_s / ours.min_s
        self.result["rows"].append(row)
        print(_format_row(row), flush=True)

    def timed(self, fn) -> Timing:
        return timed(fn, self.device, self.repeat)


def run(preset: str, device: torch.device, dtype: torch.dtype, repeat: int, workdir: Path, rows: set[str], *,
        compile_step: bool = False, profile: bool = False, transposed: bool = False, attn: str = "auto",
        quantize: dict | None = None, compile_backend: str = "inductor",
        sizes: Sizes = SIZES) -> dict:
    if "load" in rows:  # the load rows need files: a random checkpoint on disk, loaded as a user would
        import points
        from points.tooling.synthetic import checkpoint_in

        ckpt = checkpoint_in(workdir, preset, dtype, tokenizer="bytes")
        pipe = points.load(ckpt, device=device, dtype=dtype, progress=False, attn=attn)
        model, processor, engine, tokenizer = pipe.model, pipe.processor, pipe.engine, pipe.tokenizer
    else:  # the same random weights drawn straight into memory (no 17 GB written and read back at 7B)
        from points.io.tokenizer import Tokenizer
        from points.runtime.linears import use_cpu_kernels
        from points.tooling.synthetic import bytes_tokenizer_json, random_model

        model = random_model(preset, device, dtype)
        if device.type == "cpu":  # what points.load does on the CPU (points.loading.build)
            use_cpu_kernels(model.decoder)
        # the processor write_checkpoint writes, under the member's rules (as points.load reads it)
        processor = ImageProcessor(max_pixels=RELEASE_MAX_PIXELS, rules=member(model.cfg.member).processor)
        engine = Engine(model.decoder, attn=attn)
        (workdir / "bytes-tokenizer").mkdir(parents=True, exist_ok=True)  # (the stand-in checkpoint_in writes)
        tokenizer = Tokenizer(bytes_tokenizer_json(workdir / "bytes-tokenizer" / "tokenizer.json").parent)
    weights = weight_bytes(model)
    try:
        from points.tooling import reference
        llm, vision = reference.transformers_decoder(model.decoder), reference.transformers_vision(model)
    except ImportError:
        llm = vision = None
        print("transformers is not installed: points' side only", file=sys.stderr)
    if quantize:  # ours quantized; transformers keeps the float tensors it already shares
        from points.runtime.linears import quantize_decoder

        quantize_decoder(model.decoder, quantize["scheme"], lm_head=quantize["lm_head"],
                         group_size=quantize.get("group_size"), symmetric=quantize.get("symmetric"))
        weights = weight_bytes(model)

    copies, rate_llm, rate_vis = _machine_rates(model.cfg, sizes, device, dtype)
    bw = copies.best
    result = {"preset": preset, "member": model.cfg.member, "device": str(device),
              "dtype": str(dtype).removeprefix("torch."), "repeat": repeat,
              "quick": sizes is QUICK, "quantize": quantize,
              "machine": machine(device), "weights_bytes": weights, "copy_bytes_per_s": bw,
              "copy_median_bytes_per_s": copies.median, "copy_spread": copies.spread, "copy_bursts": copies.bursts,
              "copy_probe_bytes": sizes.copy,
              "matmul_flops_per_s": {"decoder": rate_llm, "vision": rate_vis}, "rows": []}
    b = Bench(model, tokenizer, engine, processor, llm, vision, device, dtype, repeat, attn, sizes, bw, rate_llm, rate_vis, result)
    print(_header(result), flush=True)
    g = torch.Generator().manual_seed(0)
    if "vision" in rows:
        vision_rows(b, g)
    if "prefill" in rows:
        prefill_rows(b, g)
    if "decode" in rows:
        decode_rows(b, g, compile_step, compile_backend, transposed)
    if profile:
        result["profile"] = profile_decode(b)
        print(result["profile"])
    if "load" in rows:
        hf_dir = None
        if llm is not None:  # transformers' own directories of the same weights, for from_pretrained
            hf_dir = workdir / f"transformers-{ckpt.name.removeprefix('points-')}"
            if not hf_dir.exists():
                llm.save_pretrained(hf_dir / "llm")
                vision.save_pretrained(hf_dir / "vision")
        # let go of every model first, so that memory pressure does not evict a side's files from the page cache
        del pipe, model, engine, llm, vision, b
        gc.collect()
        result["rows"] += load_rows(ckpt, hf_dir, workdir, device, dtype, sum(weights.values()), bw,
                                    quantize, runs=repeat)
    return result


def weight_bytes(model) -> dict[str, int]:
    """Bytes of each part's distinct weights, as the checkpoint holds them: a tied decoder's float head is
    its embedding's Parameter, counted once; an int8 head (--quantize-lm-head) is a tensor of its own."""
    d = model.decoder
    out = {"decoder": sum(p.numel() * p.element_size() for p in d.parameters())}  # (each Parameter once)
    return out | {name: sum(p.numel() * p.element_size() for p in getattr(model, name).parameters())
                  for name in ("vision", "projector")}


def _machine_rates(cfg, sizes: Sizes, device: torch.device, dtype: torch.dtype):
    """The floors' denominators: the copy bandwidth (`copy_stats`: its best is the floor's bytes/s), the
    matmul rate (FLOP/s) on decoder and on vision shapes, each the best of the square probes and its own
    shapes'."""
    bw, (d, v) = copy_stats(device, sizes.copy, bursts=1 if sizes is QUICK else BURSTS), (cfg.decoder, cfg.vision)
    square = max(matmul_rate(n, n, n, dtype, device) for n in sizes.matmul)
    rate_llm = max(square, matmul_rate(sizes.long // 2, d.hidden_size, d.ffn_size, dtype, device))
    rate_vis = max(square, matmul_rate(sizes.long, v.embed_dim, v.mlp_dim, dtype, device),
                   matmul_rate(sizes.long, v.mlp_dim, v.embed_dim, dtype, device))
    return bw, rate_llm, rate_vis


def vision_rows(b: Bench, g: torch.Generator) -> None:
    """Each image set encoded and projected (and, on CUDA, replayed from the vision runner's CUDA graphs)
    against transformers' vision tower with its PatchMerger; floor: the encoder's and the projector's FLOPs
    over the matmul rate."""
    v = b.model.cfg.vision
    graphs = None
    if b.device.type == "cuda" and b.attn != "sdpa":
        from points.runtime.vision import VisionRunner

        graphs = VisionRunner(b.model, attn=b.attn)
    for label, images in b.sizes.vision.items():
        grid = vision_grid(images, b.processor)
        pixels = torch.randn(int(grid.prod(-1).sum()), v.patch_dim, generator=g).to(b.device)
        with torch.inference_mode():
            mine = b.timed(lambda: image_features(b.model, pixels, grid, b.attn))
            ref = None if b.vision is None else b.timed(
                lambda: b.vision(pixels.to(b.dtype), grid.to(b.device)).pooler_output)
        patches = int(grid.prod(-1).sum())
        floor = (vision_flops(v, grid) + projector_flops(b.model.cfg, grid)) / b.rate_vis
        b.add(f"{label} ({patches} patches)", "s", mine, ref, floor, kind="vision", images=len(images),
              patches=patches, cuda_graphs=False)
        if graphs is not None and graphs.graphs:  # bucketed and replayed from CUDA graphs
            padded = next((bucket for bucket in graphs.buckets if bucket >= pixels.shape[0]), None)
            if padded is not None:
                mine = b.timed(lambda: graphs(pixels, grid))
                b.add(f"{label}, CUDA graphs (bucket {padded})", "s", mine, ref, floor, kind="vision",
                      images=len(images), patches=patches, cuda_graphs=True)


def prefill_rows(b: Bench, g: torch.Generator) -> None:
    """One prompt's prefill (last position's logits) as the scheduler's runner runs it (its embeddings, one
    segment of the packed forward) against transformers' forward with logits_to_keep=1."""
    d = b.model.cfg.decoder
    for T in b.sizes.prefill:
        tokens = torch.randint(0, d.vocab_size, (1, T), generator=g).to(b.device)
        with torch.inference_mode():
            mine = b.timed(lambda: b.engine.packed(b.engine.new_cache(1, T + 1), [(0, 0, T)],
                                                   b.model.decoder.embed(tokens[0]), [T - 1]))
            ref = None if b.llm is None else b.timed(lambda: b.llm(tokens, use_cache=True, logits_to_keep=1))
        b.add(f"prefill {T} tokens", "s", mine, ref, prefill_flops(d, T) / b.rate_llm, kind="prefill", tokens=T)


def decode_rows(b: Bench, g: torch.Generator, compile_step: bool, compile_backend: str, transposed: bool) -> None:
    """Greedy steps after a prompt, batch 1 and a ragged batch 4, eager (and compiled, and with the opt-in
    transposed CPU layout) against transformers' generate; floor: the bytes a step reads over the bandwidth."""
    d, new = b.model.cfg.decoder, b.sizes.decode_new
    timings = []  # (label, prompts, lengths, floor, batch, transformers' timing, fields)
    compiled = None  # one compiled engine: a graph per batch size and key block
    for batch, lengths in ((1, (b.sizes.decode_prompt,)), (4, b.sizes.ragged)):
        lengths_t = torch.tensor(lengths, device=b.device)
        prompts = torch.randint(0, d.vocab_size, (batch, max(lengths)), generator=g).to(b.device)
        floor = decode_bytes(b.model.decoder, max(lengths) + new // 2, batch) / b.bandwidth
        label = f"decode batch {batch}" + (" (ragged)" if batch > 1 else "") + f", {new} tokens"
        mine = b.timed(ours_decode(b.model, b.tokenizer, b.engine, prompts, lengths_t, new))
        ref = None if b.llm is None else b.timed(theirs_decode(b.llm, prompts, lengths_t, new))
        fields = dict(kind="decode", batch=batch, prompts=list(lengths), tokens=new)
        b.add(label, "s/step", mine, ref, floor, per=batch, **fields, compiled=False)
        timings.append((label, prompts, lengths_t, floor, batch, ref, fields))
        if compile_step:
            compiled = compiled or Engine(b.model.decoder, compile=True, backend=compile_backend, attn=b.attn)
            mine = b.timed(ours_decode(b.model, b.tokenizer, compiled, prompts, lengths_t, new))
            b.add(label + ", compiled", "s/step", mine, ref, floor, per=batch, **fields, compiled=True)
    if transposed:  # the opt-in CPU layout (points.runtime.layout), the same transformers runs
        from points.runtime.linears import transpose_tall_linears

        transpose_tall_linears(b.model.decoder)
        for label, prompts, lengths_t, floor, batch, ref, fields in timings:
            mine = b.timed(ours_decode(b.model, b.tokenizer, b.engine, prompts, lengths_t, new))
            b.add(label + ", transposed tall weights", "s/step", mine, ref, floor, per=batch, **fields, compiled=False,
                  transposed=True)


def load_rows(ckpt: Path, hf_dir: Path | None, workdir: Path, device: torch.device, dtype: torch.dtype,
              total: int, bw: float, quantize: dict | None = None, runs: int = 3) -> list[dict]:
    """`points.load` of the released layout and of the same weights converted into ours, against
    transformers' `from_pretrained` of the same weights (saved under hf_dir): fresh processes, alternating,
    `runs` each (the first pass also brings every side's files into the page cache: take 2 or more for a
    warm figure); min and median, peak = the smallest of the runs. With `quantize`: the released layout
    quantized while loading, the converted one written quantized (`points convert --quantize`) and mapped as
    it is."""
    import points

    q = quantize or {}
    kwargs = {"quantize": q.get("scheme"), "quantize_lm_head": q.get("lm_head"),
              "quantize_group_size": q.get("group_size"), "quantize_symmetric": q.get("symmetric")}
    suffix = "".join(f"-{v}" for v in q.values())
    converted = workdir / f"converted-{ckpt.name.removeprefix('points-')}{suffix}"
    if not converted.exists():
        points.convert(ckpt, converted, progress=False, **kwargs)
    dt = str(dtype).removeprefix("torch.")
    asked = {"released": "".join(f", {k}={v!r}" for k, v in kwargs.items()) if quantize else "", "converted": ""}
    probes = {side: f"import points\nload = lambda: points.load({str(path)!r}, device={str(device)!r}, "
                    f"dtype=torch.{dt}, progress=False{asked[side]})"
              for side, path in (("released", ckpt), ("converted", converted))}
    if hf_dir is not None:  # the class transformers saved the decoder as (Qwen2ForCausalLM / Qwen3ForCausalLM)
        cls = json.loads((hf_dir / "llm" / "config.json").read_text())["architectures"][0]
        probes["transformers"] = f"""
from transformers import {cls}
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel
def load():
    llm = {cls}.from_pretrained({str(hf_dir / 'llm')!r}, dtype=torch.{dt}).to({str(device)!r})
    vis = Qwen2VisionTransformerPretrainedModel.from_pretrained({str(hf_dir / 'vision')!r}, dtype=torch.{dt}).to({str(device)!r})
    return llm, vis
"""
    measured = {side: [] for side in probes}
    for _ in range(runs):
        for side, code in probes.items():
            measured[side].append(load_probe(code))
    summary = {side: {"min_s": min(r["s"] for r in got), "median_s": statistics.median(r["s"] for r in got),
                      "runs": [r["s"] for r in got], "peak_bytes": min(r["peak_growth_bytes"] for r in got)}
               for side, got in measured.items()}
    rows = []
    for side in ("released", "converted"):
        row = {"row": f"load, {side} layout", "kind": "load", "layout": side, "unit": "s", "floor_s": total / bw,
               "per": 1, "weights_total": total, "points": summary[side]}
        if "transformers" in summary:
            row["transformers"] = summary["transformers"]
            row["ratio"] = row["transformers"]["min_s"] / row["points"]["min_s"]
        rows.append(row)
        print(_format_row(row), flush=True)
        print(f"  peak resident growth while loading: points {row['points']['peak_bytes'] / 1e9:.2f} GB = "
              f"{row['points']['peak_bytes'] / total:.2f}x the weights ({total / 1e9:.2f} GB)"
              + (f"; transformers {row['transformers']['peak_bytes'] / 1e9:.2f} GB = "
                 f"{row['transformers']['peak_bytes'] / total:.2f}x" if "transformers" in row else ""), flush=True)
    return rows


def profile_decode(b: Bench, steps: int = 16) -> str:
    """The top ops of `steps` decode steps through the scheduler (batch 1, after a 512-token prompt), by self
    time; the prefill and as many warm-up steps run before the profiler starts."""
    from torch.profiler import ProfilerActivity, profile

    from points.io.chat import Prompt
    from points.runtime.generation import GenerationConfig
    from points.runtime.scheduler import Scheduler

    device = b.engine.device
    ids = torch.randint(0, b.model.decoder.cfg.vocab_size, (DECODE_PROMPT,)).tolist()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    s = Scheduler(b.model, b.tokenizer, b.engine, max_batch=1, max_prefill_tokens=DECODE_PROMPT)
    s.submit(Prompt([], None, None), ids, GenerationConfig(max_new_tokens=2 * steps + 1, ignore_eos=True))
    for _ in range(steps + 1):  # the prefill, then the warm-up steps
        s.step()
    with profile(activities=activities) as prof:
        while s.step():
            pass
        sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return f"decode step profile ({steps} steps):\n" + prof.key_averages().table(sort_by=key, row_limit=12)


def _header(r: dict) -> str:
    m = r["machine"]
    where = m.get("gpu") or f"{m['cpu']}, {m['threads']} threads"
    q = r.get("quantize")
    scheme = q and q["scheme"] + (f" g{q['group_size']}{' symmetric' if q['symmetric'] else ''}" if "group_size" in q else "")
    ours = f" (ours: decoder {scheme}{' with lm_head' if q['lm_head'] else ''})" if q else ""
    return (f"points bench, preset {r['preset']} ({member(r['member']).title}), {r['dtype']}{ours} on {r['device']} "
            f"({where}), torch {m['torch']}, "
            f"transformers {m.get('transformers', 'absent')}; min/median of {r['repeat']} runs after a warm-up\n"
            f"copy bandwidth {r['copy_bytes_per_s'] / 1e9:.1f} GB/s (the best copy of {r['copy_probe_bytes'] >> 20} MiB in "
            f"{len(r['copy_bursts'])} burst(s) a second apart: {' '.join(f'{b / 1e9:.1f}' for b in r['copy_bursts'])}; median "
            f"{r['copy_median_bytes_per_s'] / 1e9:.1f}, spread {r['copy_spread']:.0%}); matmul rate {r['matmul_flops_per_s']['decoder'] / 1e9:.0f} "
            f"GFLOP/s (decoder shapes), {r['matmul_flops_per_s']['vision'] / 1e9:.0f} GFLOP/s (vision shapes)\n"
            f"{'row':46} {'points min / median':>22} {'transformers min / median':>27} {'ratio':>6} "
            f"{'floor':>9} {'of floor':>8}")


def _fmt(seconds: float, unit: str, per: int) -> str:
    if unit == "s/step":
        return f"{per / seconds:8.1f} tok/s"
    return f"{seconds * 1e3:8.1f} ms" if seconds < 10 else f"{seconds:8.2f} s "


def _format_row(row: dict) -> str:
    u, per = row["unit"], row["per"]
    ours = f"{_fmt(row['points']['min_s'], u, per)} / {_fmt(row['points']['median_s'], u, per).strip()}"
    theirs = "-"
    if "transformers" in row:
        t = row["transformers"]
        theirs = f"{_fmt(t['min_s'], u, per)} / {_fmt(t['median_s'], u, per).strip()}"
    ratio = f"{row['ratio']:.2f}x" if "ratio" in row else "-"
    reach = row["floor_s"] / row["points"]["min_s"]
    return f"{row['row']:46} {ours:>22} {theirs:>27} {ratio:>6} {_fmt(row['floor_s'], u, per):>9} {reach:8.0%}"
