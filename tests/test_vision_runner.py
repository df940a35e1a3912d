"""The bucketed vision runner (points.runtime.vision): padding a batch of images up to a bucket with one
padding image changes no real feature; device segment bounds with trailing empty segments give the host
bounds' result on the Triton kernel; CUDA graphs replay the eager result (on a GPU)."""

from pathlib import Path

import matplotlib
import pytest
import torch

from points.model.attention import Packing
from points.runtime.vision import VisionRunner
from points.tooling.synthetic import random_model

CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def model():
    return random_model("tiny", "cpu", torch.float32, seed=3)


def _images(grid, seed=0):
    grid = torch.tensor(grid)
    pixels = torch.randn(int(grid.prod(-1).sum()), 1176, generator=torch.Generator().manual_seed(seed))
    return pixels, grid


@pytest.mark.parametrize("grid", [[[1, 4, 6]], [[1, 4, 6], [2, 2, 2], [1, 2, 8]], [[1, 8, 8]]],
                         ids=["one image", "three, one of 2 frames", "exactly a bucket"])
def test_bucketed_features_equal_the_encoder(model, grid):
    """fp32: 24 / 48 / 64 patches padded to 64 (or none): the same features as the unpadded encoder."""
    runner = VisionRunner(model, buckets=(16, 64, 128), graphs=False)
    pixels, grid = _images(grid)
    expected = model.image_features(pixels, grid)
    got = runner(pixels, grid)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_what_no_bucket_takes_runs_eagerly(model):
    """More patches than the largest bucket, or more images than the segments allow: image_features as is."""
    pixels, grid = _images([[1, 8, 8], [1, 4, 4]])
    expected = model.image_features(pixels, grid)
    assert torch.equal(VisionRunner(model, buckets=(16, 64), graphs=False)(pixels, grid), expected)
    assert torch.equal(VisionRunner(model, buckets=(128,), max_segments=2, graphs=False)(pixels, grid), expected)


def test_buckets_must_be_whole_merge_windows(model):
    with pytest.raises(ValueError, match="multiple of 4 patches"):
        VisionRunner(model, buckets=(64, 66))


def test_device_segments_with_empty_tail_on_the_triton_kernel():
    """What a graph replays: bounds as an int32 device tensor padded with empty segments, the bucket as the
    longest; the Triton kernel (Triton's interpreter on the CPU) against the host bounds on SDPA (fp32)."""
    device = "cuda" if CUDA else "cpu"
    vision = random_model("tiny", device, torch.float32, seed=3).vision
    pixels, _ = _images([[1, 4, 6], [1, 2, 8]], seed=1)
    padded = [(1, 4, 6), (1, 2, 8), (1, 2, 12)]  # + a padding image: 64 patches
    x = torch.cat([pixels, torch.zeros(24, 1176)]).to(device)
    rope, packing = vision.layout(padded, device)
    expected = vision.encode(x, rope, packing)  # SDPA per segment
    cu = torch.tensor(packing.bounds + [packing.bounds[-1]] * 4, dtype=torch.int32, device=device)
    got = vision.encode(x, rope, Packing(None, cu, 64, "triton"))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_device_bounds_refuse_sdpa():
    with pytest.raises(ValueError, match="device bounds \\(cu alone\\) need the Triton kernel"):
        Packing(None, torch.tensor([0, 8], dtype=torch.int32), 8, "sdpa")


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
def test_cuda_graphs_replay_the_eager_features():
    """bf16 on a GPU: one graph per bucket, re-used by images of other sizes in the same bucket; each replay
    agrees with the eager bucketed run and the unbucketed encoder to bf16 rounding (the autotuner may pick
    other tiles for other lengths, which reorders the softmax sums)."""
    model = random_model("tiny", "cuda", torch.bfloat16, seed=4)
    runner = VisionRunner(model, buckets=(64, 128))
    eager = VisionRunner(model, buckets=(64, 128), graphs=False)
    for grid in ([[1, 4, 6]], [[1, 2, 8], [1, 4, 4]], [[2, 4, 4]]):
        pixels, grid = _images(grid, seed=5)
        pixels = pixels.cuda()
        got = runner(pixels, grid)
        torch.testing.assert_close(got.float(), eager(pixels, grid).float(), rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(got.float(), model.image_features(pixels, grid).float(), rtol=2e-2, atol=2e-2)
    assert set(runner._graphs) == {64}


def test_the_vision_cache_skips_the_encoder_for_an_image_seen_before(e2e_dir, pipe):
    """The same picture in two different conversations (no shared prefix): the second takes its features from
    the cache (one hit, no encoding) and its reply is the pipeline's without a cache; a bounded cache drops the
    oldest; vision_cache_mb=0 is none and a bad value is named."""
    import pytest

    import points
    from points.runtime.vision import FeatureCache

    photo = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    fresh = points.load(e2e_dir, prefix_cache=False)
    first = [{"role": "user", "content": [{"type": "image", "image": photo}, {"type": "text", "text": "Who?"}]}]
    second = [{"role": "system", "content": "Be brief."}] + [
        {"role": "user", "content": [{"type": "text", "text": "Describe:"}, {"type": "image", "image": photo}]}]
    plain = points.load(e2e_dir, prefix_cache=False, vision_cache_mb=0)
    assert plain.vision_cache is None
    a = fresh.submit(first, max_new_tokens=6)
    assert a.text() == plain.chat(first, max_new_tokens=6) and (a.images_encoded, a.images_cached) == (1, 0)
    b = fresh.submit(second, max_new_tokens=6)
    assert b.text() == plain.chat(second, max_new_tokens=6) and (b.images_encoded, b.images_cached) == (0, 1)
    assert fresh.vision_cache.hits == 1 and fresh.vision_cache.misses == 1
    small = FeatureCache(budget_bytes=3 * 4)
    small.put(-1, torch.zeros(2)), small.put(-2, torch.zeros(2))  # 8 + 8 bytes > 12: the first goes
    assert list(small.entries) == [-2] and small.bytes == 8 and small.get(-1) is None
    with pytest.raises(ValueError, match=r"^vision_cache_mb = -1: expected a number of MiB >= 0"):
        points.load(e2e_dir, vision_cache_mb=-1)
