#!/usr/bin/env python3
"""Pages per minute of `points ocr` against POINTS-Reader's official code path, on the same random checkpoint
at Reader's released shapes, in one sitting.

    python tools/bench_ocr.py --workdir /tmp/bench-ocr                  # reader-3b: bf16, int8, ngram drafts
    python tools/bench_ocr.py --size reader-tiny --pages 3 --new 8 --dtype float32 --rows bf16   # a quick look

The pages: a PDF of --pages pages written here (lines of text drawn by pillow), rendered by points' renderer
at 200 dpi within --max-pixels; both sides read the same rendered images and write exactly --new tokens a page
(points: ignore_eos; transformers: min_new_tokens), sampled with Reader's README settings (temperature 0.7,
top-p 0.8, top-k 20, repetition penalty 1.05). Load time is left out of both.

- ours: `points.tooling.ocr.process`, the loop `points ocr` runs (pages on the continuous-batching
  scheduler, --batch-size rows, each page journaled), in bf16, then with int8 decoder weights (and head).
- the official path, run the way Reader's README runs it, one page after another: transformers'
  Qwen2VLImageProcessor (its PIL build) on the page, transformers' Qwen2-VL vision tower with its PatchMerger
  (Reader's projector) on those pixels, the features written over the <|image_pad|> embeddings, and
  `Qwen2ForCausalLM.generate(inputs_embeds=...)` with sdpa attention (flash-attn does not run on a CPU),
  on the same tensors as ours (views, no copy) in bf16.
- speculative decoding: with the README's settings no row drafts (a repetition penalty turns drafting off,
  points.runtime.scheduler), so the rows are greedy without penalty, plain against `speculative="ngram"`.

The floor of each row: the vision encoder's and the prefill's matmul FLOPs at the bf16 matmul rate measured
here, plus the decode steps' weight bytes (one read a step for the whole batch) at the copy bandwidth measured
here. A benchmark, not a test: compare within one run.
"""

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

import points
from points.io.chat import build_prompt
from points.io.documents import DPI, Document, Pages, Resolution, find_documents
from points.tooling import ocr
from points.tooling.jobs import Journal
from points.tooling.measure import BURSTS, copy_bandwidth, machine, matmul_rate, prefill_flops, vision_flops, vision_grid
from points.tooling.synthetic import checkpoint_in

WORDS = ("the", "model", "reads", "each", "page", "of", "a", "document", "into", "text", "tables", "and", "lines")


def write_pdf(path: Path, pages: int) -> Path:
    """A Letter-sized PDF (612 x 792 points) of `pages` pages of drawn text lines."""
    images = []
    for i in range(pages):
        im = Image.new("RGB", (612, 792), "white")
        draw = ImageDraw.Draw(im)
        for line in range(40):
            words = " ".join(WORDS[(i * 7 + line * 3 + k) % len(WORDS)] for k in range(12))
            draw.text((40, 30 + 18 * line), f"{line + 1}. {words}", fill="black")
        images.append(im)
    images[0].save(path, save_all=True, append_images=images[1:], resolution=72)
    return path


class Recorder:
    """The pipeline as `ocr.process` uses it, keeping every request it submits (for their drafts' counts)."""

    def __init__(self, pipe):
        self.pipe, self.scheduler, self.tokenizer, self.requests = pipe, pipe.scheduler, pipe.tokenizer, []

    def submit(self, *args, **kwargs):
        self.requests.append(self.pipe.submit(*args, **kwargs))
        return self.requests[-1]


def ours(pipe, documents, items, gen: dict, work: Path, batch: int, recorder: Recorder | None = None):
    """Seconds of `ocr.process` over the items, the tokens generated, and the page records. The vision and
    prefix caches are emptied first: every row encodes its pages and prefills its prompts afresh."""
    for cache in (pipe.vision_cache, pipe.prefix):
        if cache is not None:
            cache.clear()
    journal = Journal(work / f"journal-{time.monotonic_ns()}")
    try:
        start = time.perf_counter()
        tokens = ocr.process(recorder or pipe, documents, items, gen, ocr.reader_defaults()[0], journal, None)
        seconds = time.perf_counter() - start
    finally:
        journal.close()
    records = ocr.read_records(journal.path)
    journal.path.unlink()
    return seconds, tokens, records


def official(pipe, images, prompt: str, new: int, sample: dict) -> tuple[float, list[int]]:
    """Reader's README path on each image, one after another: seconds and tokens per page."""
    from transformers import Qwen2VLImageProcessorPil

    from points.tooling.reference import transformers_decoder, transformers_vision

    model, proc = pipe.model, pipe.processor
    tower, llm = transformers_vision(model), transformers_decoder(model.decoder)
    llm.config._attn_implementation = "sdpa"
    image_processor = Qwen2VLImageProcessorPil(min_pixels=proc.min_pixels, max_pixels=proc.max_pixels)
    image_id = pipe.tokenizer.image_pad_id
    counts, start = [], time.perf_counter()
    for image in images:
        messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": prompt}]}]
        ids = torch.tensor([build_prompt(messages, proc).token_ids(pipe.tokenizer)])  # (the template's ids)
        with torch.inference_mode():
            batch = image_processor(images=[image], return_tensors="pt")
            features = tower(batch["pixel_values"].to(llm.dtype), grid_thw=batch["image_grid_thw"]).pooler_output
            embeds = llm.model.embed_tokens(ids)
            embeds[ids == image_id] = features.to(embeds.dtype)
            out = llm.generate(inputs_embeds=embeds, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                               min_new_tokens=new, do_sample=True, pad_token_id=pipe.tokenizer.eos_id, **sample)
        counts.append(out.shape[1])
    return time.perf_counter() - start, counts


def floor_seconds(pipe, images, prompt: str, new: int, batch: int, rate: float, bandwidth: float) -> float:
    """Vision and prefill FLOPs at `rate`, plus one read of the decoder's weights per decode step at `bandwidth`."""
    model, proc = pipe.model, pipe.processor
    grid = vision_grid([(im.height, im.width) for im in images], proc)
    flops = vision_flops(model.cfg.vision, grid)
    for image in images:
        messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": prompt}]}]
        flops += prefill_flops(model.decoder.cfg, len(build_prompt(messages, proc).token_ids(pipe.tokenizer)))
    seen, weights = set(), 0
    for t in model.decoder.state_dict().values():
        if t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            weights += t.untyped_storage().nbytes()
    steps = math.ceil(len(images) / batch) * new
    return flops / rate + steps * weights / bandwidth


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="reader-3b")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--pages", type=int, default=8, help="pages for our rows (default: %(default)s)")
    p.add_argument("--baseline-pages", type=int, default=4,
                   help="of them, for the official path, one after another (default: %(default)s)")
    p.add_argument("--new", type=int, default=128, help="tokens written per page (default: %(default)s)")
    p.add_argument("--max-pixels", type=int, default=250_000, help="a page's pixels (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rows", nargs="+", default=["bf16", "speculative", "int8"],
                   choices=["bf16", "speculative", "int8"],
                   help="bf16: ours and the official path; speculative: greedy without and with n-gram drafts; int8: "
                        "ours with int8 weights (default: all)")
    p.add_argument("--bursts", type=int, default=BURSTS, help="copy-bandwidth bursts, a second apart (default: "
                                                             "%(default)s)")
    p.add_argument("--workdir", type=Path, default=None, help="keeps the random checkpoint between runs")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-ocr-"))
    work.mkdir(parents=True, exist_ok=True)
    device = torch.device("cpu")
    info = machine(device)
    print(json.dumps(info), flush=True)
    ckpt = checkpoint_in(work, args.size, dtype)
    pdf = write_pdf(work / f"pages-{args.pages}.pdf", args.pages)
    documents = find_documents([pdf])
    prompt, readme = ocr.reader_defaults()
    fixed = {"max_new_tokens": args.new, "ignore_eos": True, "repetition_guard": 0}
    rows, result = [], {"machine": info, "args": {k: str(v) for k, v in vars(args).items()}}

    def say(name, seconds, pages, tokens, floor):
        per_min = pages / seconds * 60
        rows.append((name, per_min, tokens / seconds, floor / seconds))
        result[name] = {"seconds": round(seconds, 2), "pages": pages, "pages_per_min": round(per_min, 3),
                        "tok_per_s": round(tokens / seconds, 2), "of_floor": round(floor / seconds, 3)}
        print(f"{name:<44} {per_min:8.2f} pages/min  {tokens / seconds:7.2f} tok/s  {floor / seconds:6.1%} of floor "
              f"({seconds:.1f} s for {pages} pages)", flush=True)

    pipe = points.load(ckpt, dtype=dtype, max_batch=args.batch_size)
    rate = matmul_rate(1024, pipe.model.decoder.cfg.hidden_size, pipe.model.decoder.cfg.ffn_size, dtype, device)
    bandwidth = copy_bandwidth(device, bursts=args.bursts)
    print(f"floors: {rate / 1e9:.0f} GFLOP/s {args.dtype} matmul, {bandwidth / 1e9:.1f} GB/s copy", flush=True)
    result["floors"] = {"matmul_gflops": round(rate / 1e9, 1), "copy_gbs": round(bandwidth / 1e9, 2)}
    resolution = Resolution(DPI, args.max_pixels, pipe.processor.min_pixels, pipe.processor.max_pixels)
    items, _ = ocr.page_items(documents, None, resolution)
    with Pages(Document(pdf, "pages", "pdf")) as pages:
        images = [pages.image(n, resolution) for n in range(1, args.pages + 1)]
    print(f"{args.pages} pages of {images[0].width} x {images[0].height} pixels, {args.new} tokens each",
          flush=True)
    # warm-up (the kernel plan, the first products at these shapes): every page, two tokens
    ours(pipe, documents, items, readme | fixed | {"max_new_tokens": 2}, work, args.batch_size)

    floor = floor_seconds(pipe, images, prompt, args.new, args.batch_size, rate, bandwidth)
    official_per_min = None
    if "bf16" in args.rows:
        seconds, tokens, _ = ours(pipe, documents, items, readme | fixed, work, args.batch_size)
        say(f"points ocr, {args.dtype}, batch {args.batch_size}", seconds, args.pages, tokens, floor)
        theirs_pages = images[:args.baseline_pages]
        sample = {k: readme[k] for k in ("temperature", "top_p", "top_k", "repetition_penalty")}
        seconds_t, counts = official(pipe, theirs_pages, prompt, args.new, sample)
        assert all(c == args.new for c in counts), counts
        floor_t = floor_seconds(pipe, theirs_pages, prompt, args.new, 1, rate, bandwidth)
        say(f"official path (transformers, sdpa), {args.dtype}", seconds_t, len(theirs_pages), sum(counts), floor_t)
        official_per_min = rows[-1][1]
        print(f"points ocr / official: {rows[-2][1] / official_per_min:.2f}x pages/min", flush=True)
        result["ratio_bf16"] = round(rows[-2][1] / official_per_min, 3)

    if "speculative" in args.rows:
        greedy = fixed | {"temperature": 0.0, "repetition_penalty": 1.0}
        plain, spec = Recorder(pipe), Recorder(pipe)
        s_plain, t_plain, recs_plain = ours(pipe, documents, items, greedy | {"speculative": "off"}, work,
                                            args.batch_size, plain)
        say(f"points ocr, greedy, no drafts, {args.dtype}", s_plain, args.pages, t_plain, floor)
        s_spec, t_spec, recs_spec = ours(pipe, documents, items, greedy | {"speculative": "ngram"}, work,
                                         args.batch_size, spec)
        say(f"points ocr, greedy, ngram drafts, {args.dtype}", s_spec, args.pages, t_spec, floor)
        drafted = sum(r.drafted_tokens for r in spec.requests)
        kept = sum(r.accepted_tokens for r in spec.requests)
        same = sum(a.token_ids == b.token_ids for a, b in zip(plain.requests, spec.requests))
        agree = [next((i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y), len(a.token_ids))
                 for a, b in zip(plain.requests, spec.requests)]
        distinct = sorted(len(set(r.token_ids)) for r in plain.requests)
        print(f"ngram / plain: {s_plain / s_spec:.2f}x; drafts kept {kept} of {drafted}; pages with the same tokens: "
              f"{same} of {len(agree)}, tokens agreeing before the first difference: {agree}; distinct tokens per "
              f"page (greedy, no drafts): {distinct}", flush=True)
        result["speculative"] = {"speedup": round(s_plain / s_spec, 3), "drafted": drafted, "kept": kept,
                                 "same_pages": same, "agree_before_first_difference": agree,
                                 "distinct_tokens": distinct}

    if "int8" in args.rows:
        del pipe
        q = points.load(ckpt, dtype=dtype, quantize="int8", quantize_lm_head=True, max_batch=args.batch_size)
        ours(q, documents, items, readme | fixed | {"max_new_tokens": 2}, work, args.batch_size)
        seconds, tokens, _ = ours(q, documents, items, readme | fixed, work, args.batch_size)
        floor_q = floor_seconds(q, images, prompt, args.new, args.batch_size, rate, bandwidth)
        say(f"points ocr, int8 (decoder and head), batch {args.batch_size}", seconds, args.pages, tokens, floor_q)
        if official_per_min is not None:
            result["ratio_int8"] = round(rows[-1][1] / official_per_min, 3)
            print(f"points ocr int8 / official {args.dtype}: {result['ratio_int8']:.2f}x pages/min", flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
