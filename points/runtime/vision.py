"""Running the vision encoder and projector: the attention kernel chosen per call, and on a GPU without
paying a launch per kernel: bucketed patch counts, replayed from CUDA graphs.

    features = image_features(model, pixel_values, grid_thw, attn="auto")   # the kernel by the measured rule
    runner = VisionRunner(pipe.model)            # graphs on CUDA (Triton attention), eager elsewhere
    features = runner(pixel_values, grid_thw)    # == image_features(model, pixel_values, grid_thw)

A small image is launch-bound on a GPU: 32 blocks of about 20 kernels each take far longer to launch than to
run (docs/benchmarks.md: a 448x448 encode at 7-13% of its matmul floor on an H200). The runner pads the
patches of a batch of images up to a bucket (the next of `buckets`) with one extra padding image, so that a
few shapes cover every image size, and replays one CUDA graph per bucket:

- the padding image is a segment of its own (a `spatial_merge x n` grid: whole merge windows), so no real
  patch attends to it, and the projector's windows never mix it with real patches: the first L / 4 output
  rows are the unpadded result;
- every graph reads the segment bounds from a device tensor of a fixed size (`max_segments` + 1 entries,
  trailing empty segments), so images of any sizes that fill the same bucket replay the same graph; only
  the Triton varlen kernel reads bounds from the device, so graphs need it (`attn="triton"` or "auto");
- the rotary tables and pixels are computed / copied into the graph's static inputs before each replay.

Anything the graphs cannot take (more patches than the largest bucket, more images than `max_segments` - 1,
a CPU, SDPA forced) runs eagerly through `image_features`. `graphs=False` runs the bucketed
computation eagerly (what the CPU tests check against the unpadded encoder).
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from points.model.attention import Packing
from points.model.vision import check_inputs, frame_bounds
from points.runtime.attention import check_backend, vision_kernel

BUCKETS = (1024, 2048, 4096, 8192, 16384)  # patches; multiples of the 2 x 2 merge window


def image_features(model, pixel_values: torch.Tensor, grid_thw: torch.Tensor, attn: str = "auto") -> torch.Tensor:
    """`model.image_features` with the vision attention kernel `attn` asks for these images ("auto": the
    measured rule of points.runtime.attention)."""
    grid = [tuple(row) for row in grid_thw.tolist()]
    kernel = vision_kernel(attn, model.vision.patch_embed.weight.device, frame_bounds(grid))
    return model.image_features(pixel_values, grid_thw, kernel)


class FeatureCache:
    """Image features by image (`points.runtime.prefix.image_key`: the processed pixels and grid, so one image
    at two resolutions is two entries), least recently used first out, at most `budget_bytes` held: a request
    whose image was encoded before, for any prompt, skips the vision encoder for it. `hits` / `misses` count
    images."""

    def __init__(self, budget_bytes: int = 256 << 20):
        if not isinstance(budget_bytes, int) or budget_bytes < 0:
            raise ValueError(f"vision cache: budget_bytes must be an integer >= 0, got {budget_bytes!r}")
        self.budget = budget_bytes
        self.entries: OrderedDict[int, torch.Tensor] = OrderedDict()
        self.bytes = self.hits = self.misses = 0

    def get(self, key: int) -> torch.Tensor | None:
        features = self.entries.get(key)
        if features is None:
            self.misses += 1
            return None
        self.hits += 1
        self.entries.move_to_end(key)
        return features

    def put(self, key: int, features: torch.Tensor) -> None:
        if features.nbytes > self.budget or key in self.entries:
            return
        self.entries[key] = features
        self.bytes += features.nbytes
        while self.bytes > self.budget:
            _, old = self.entries.popitem(last=False)
            self.bytes -= old.nbytes

    def clear(self) -> None:
        self.entries.clear()
        self.bytes = 0


def padded_embeds(model, rows: list[list[int]], prompts: list, pad_id: int, attn: str = "auto") -> torch.Tensor:
    """Token rows right-padded with `pad_id` (never attended) -> embeddings [B, T, hidden], every image of every
    prompt (points.io.chat.Prompt: pixel_values, grid_thw) encoded in one packed call and spliced in."""
    padded = torch.full((len(rows), max(len(r) for r in rows)), pad_id, dtype=torch.long)
    for b, row in enumerate(rows):
        padded[b, :len(row)] = torch.tensor(row)
    with_images = [p for p in prompts if p.pixel_values is not None]
    features = None if not with_images else image_features(
        model, torch.cat([p.pixel_values for p in with_images]), torch.cat([p.grid_thw for p in with_images]), attn)
    return model.embed(padded.to(model.decoder.embed.weight.device), features)


class VisionRunner:
    def __init__(self, model, *, attn: str = "auto", buckets: tuple[int, ...] = BUCKETS, max_segments: int = 16,
                 graphs: bool | None = None):
        """model: a `points.POINTSModel` (its vision encoder and projector are used, never changed); attn:
        "auto" | "sdpa" | "triton" (graphs need the Triton kernel: "sdpa" runs eagerly)."""
        self.model = model
        self.attn = check_backend(attn)
        cfg = model.cfg.vision
        self.window = cfg.spatial_merge_size ** 2
        if any(b % self.window for b in buckets):
            raise ValueError(f"buckets {buckets}: every bucket must be a multiple of {self.window} patches")
        self.buckets = tuple(sorted(buckets))
        self.max_segments = max_segments
        device = model.vision.patch_embed.weight.device
        self.graphs = (device.type == "cuda" and attn != "sdpa") if graphs is None else graphs
        self._graphs: dict[int, tuple] = {}  # bucket -> (graph, static inputs, static output)

    @torch.inference_mode()
    def __call__(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """[L, patch_dim] pixels of all images, grid_thw [n, 3] -> [L / 4, hidden] LLM-token features."""
        vision = self.model.vision
        pixel_values = pixel_values.to(vision.patch_embed.weight.device)
        grid = check_inputs(pixel_values, grid_thw, vision.cfg, vision.patch_embed.weight)
        n_patches, n_frames = pixel_values.shape[0], sum(t for t, _, _ in grid)
        bucket = next((b for b in self.buckets if b >= n_patches), None)
        if bucket is None or n_frames + 1 > self.max_segments:
            return image_features(self.model, pixel_values, grid_thw, self.attn)
        padded = self._pad(grid, bucket - n_patches)
        device = pixel_values.device
        bounds = frame_bounds(padded)
        x = torch.zeros(bucket, pixel_values.shape[1], dtype=pixel_values.dtype, device=device)
        x[:n_patches] = pixel_values
        keep = n_patches // self.window
        if not self.graphs:
            rope, packing = vision.layout(padded, device, vision_kernel(self.attn, device, bounds))
            return self._run(x, rope, packing)[:keep]
        rope, _ = vision.layout(padded, device)  # the graph reads its segment bounds from the device
        bounds += [bounds[-1]] * (self.max_segments + 1 - len(bounds))  # trailing empty segments
        cu = torch.tensor(bounds, dtype=torch.int32, device=x.device)
        graph, inputs, out = self._graphs.get(bucket) or self._capture(bucket, x, rope, cu)
        for name, value in (("x", x), ("cos", rope[0]), ("sin", rope[1]), ("cu", cu)):
            inputs[name].copy_(value)
        graph.replay()
        return out[:keep].clone()

    def _pad(self, grid: list[tuple[int, int, int]], pad: int) -> list[tuple[int, int, int]]:
        """The images plus one padding image of `pad` patches made of whole merge windows."""
        if pad == 0:
            return list(grid)
        m = self.model.cfg.vision.spatial_merge_size
        return list(grid) + [(1, m, pad // m)]

    def _run(self, x, rope, packing: Packing):
        return self.model.projector(self.model.vision.encode(x, rope, packing))

    def _capture(self, bucket: int, x: torch.Tensor, rope, cu: torch.Tensor):
        """Static inputs for `bucket` (holding this call's images, so that the warm-up autotunes on real
        work), a warm-up on a side stream (Triton compiles and autotunes there), then the graph of one
        encode + projection."""
        inputs = {"x": x.clone(), "cos": rope[0].clone(), "sin": rope[1].clone(), "cu": cu.clone()}
        packing = Packing(None, inputs["cu"], bucket, "triton")  # the bounds are read from the device

        def run():
            return self._run(inputs["x"], (inputs["cos"], inputs["sin"]), packing)

        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                run()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = run()
        self._graphs[bucket] = (graph, inputs, out)
        return self._graphs[bucket]
