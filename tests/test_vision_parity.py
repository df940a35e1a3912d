"""Vision encoder and projector against transformers' Qwen2-VL vision tower and PatchMerger, with weights
that went through our mapping. The reference's output is taken before its own merger, as POINTS does."""

import copy

import pytest
import torch
from transformers.vision_utils import get_vision_position_ids

import points
from conftest import DEVICES
from points.model.rope import cos_sin
from points.model.vision import frame_bounds, rotary_angles
from points.tooling import reference

GRIDS = {
    "single": [[1, 8, 12]],
    "three_packed": [[1, 4, 6], [1, 10, 8], [1, 2, 2]],
    "smallest": [[1, 2, 2]],
    "non_square": [[1, 4, 40]],
    "two_frames": [[2, 6, 4]],
    "frames_and_images": [[1, 6, 2], [2, 4, 4], [1, 2, 8]],
}


@pytest.fixture(scope="module", params=["official_dir", "converted_dir"])
def vision(request):
    return points.load_vision(request.getfixturevalue(request.param))


def _pixels(grid, seed=0):
    n = sum(t * h * w for t, h, w in grid)
    return torch.randn(n, 1176, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", GRIDS)
@torch.no_grad()
def test_encoder_matches_transformers(vision, ref_vision, name):
    grid = torch.tensor(GRIDS[name])
    pixels = _pixels(GRIDS[name])
    expected = ref_vision[0](pixels, grid).last_hidden_state
    got = vision[0](pixels, grid)
    assert got.shape == (pixels.shape[0], 160)
    print(f"\nvision encoder fp32, {name}: max |error| {(got - expected).abs().max().item():.3g}, "
          f"max |output| {expected.abs().max().item():.3g}")
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("name", ["single", "three_packed", "two_frames"])
@torch.no_grad()
def test_projector_matches_transformers(vision, ref_vision, name):
    grid = torch.tensor(GRIDS[name])
    features = ref_vision[0](_pixels(GRIDS[name], 1), grid).last_hidden_state
    expected = ref_vision[1](features)
    got = vision[1](features)
    assert got.shape == (features.shape[0] // 4, 224)
    print(f"\nprojector fp32, {name}: max |error| {(got - expected).abs().max().item():.3g}")
    torch.testing.assert_close(got, expected)


@torch.no_grad()
def test_packing_equals_images_one_by_one(vision):
    """Images never attend to each other: the packed output is the concatenation of separate runs."""
    grids = GRIDS["frames_and_images"]
    pixels = _pixels(grids, 2)
    packed = vision[0](pixels, torch.tensor(grids))
    parts, start = [], 0
    for g in grids:
        n = g[0] * g[1] * g[2]
        parts.append(vision[0](pixels[start:start + n], torch.tensor([g])))
        start += n
    torch.testing.assert_close(packed, torch.cat(parts))


def test_rotary_table_equals_reference_for_mixed_grids(ref_vision):
    grid = torch.tensor([[1, 4, 6], [2, 10, 8], [1, 2, 2], [1, 4, 40]])
    enc = ref_vision[0]
    positions = get_vision_position_ids(grid, enc.spatial_merge_size)
    ref_cos, ref_sin = enc.rotary_pos_emb(torch.zeros(1), positions)
    vcfg = reference.model_config().vision
    cos, sin = cos_sin(rotary_angles([tuple(r) for r in grid.tolist()], vcfg))
    assert cos.dtype == torch.float32 and cos.shape == (int((grid.prod(-1)).sum()), 80)
    torch.testing.assert_close(cos, ref_cos, rtol=0, atol=0)
    torch.testing.assert_close(sin, ref_sin, rtol=0, atol=0)


def test_frame_bounds_are_cu_seqlens():
    assert frame_bounds([(1, 2, 2), (2, 4, 6), (1, 2, 8)]) == [0, 4, 28, 52, 68]


# --------------------------------------------------------------------------- low precision

BOUNDS = {torch.bfloat16: 0.08, torch.float16: 0.01}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.no_grad()
def test_low_precision_gap(official_dir, ref_vision, dtype, device):
    """Encoder + projector output in bf16/fp16 vs the fp32 reference: within a bound relative to the output
    scale (docs/parity.md) and never more than twice transformers' own modules cast to that dtype."""
    grids = GRIDS["three_packed"]
    grid, pixels = torch.tensor(grids), _pixels(grids, 3)
    enc, proj = ref_vision
    expected = proj(enc(pixels, grid).last_hidden_state)
    ours_enc, ours_proj = points.load_vision(official_dir, dtype=dtype, device=device)
    got = ours_proj(ours_enc(pixels.to(device), grid)).float().cpu()
    err = (got - expected).abs().max().item()
    low = [copy.deepcopy(m).to(device=device, dtype=dtype) for m in (enc, proj)]
    theirs = (low[1](low[0](pixels.to(device, dtype), grid.to(device)).last_hidden_state).float().cpu()
              - expected).abs().max().item()
    scale = expected.abs().max().item()
    print(f"\nvision+projector {dtype} on {device}: max |error| ours {err:.4g}, transformers' own {theirs:.4g}, "
          f"max |output| {scale:.3g}")
    assert err <= BOUNDS[dtype] * scale
    assert err <= 2 * theirs


@pytest.mark.parametrize("device", DEVICES)
@torch.no_grad()
def test_fp32_on_device(official_dir, ref_vision, device):
    grids = GRIDS["three_packed"]
    grid, pixels = torch.tensor(grids), _pixels(grids, 4)
    expected = ref_vision[0](pixels, grid).last_hidden_state
    enc, _ = points.load_vision(official_dir, device=device)
    torch.testing.assert_close(enc(pixels.to(device), grid).cpu(), expected)


# --------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("pixels, grid, message", [
    (torch.zeros(16, 1000), [[1, 4, 4]], r"pixel_values: expected a tensor \[L, 1176\].*got \[16, 1000\]"),
    (torch.zeros(16, 2, 588), [[1, 4, 4]], r"pixel_values: expected a tensor \[L, 1176\]"),
    (torch.zeros(16, 1176, dtype=torch.int64), [[1, 4, 4]], r"expected a floating tensor, got torch.int64"),
    (torch.zeros(20, 1176), [[1, 4, 4]], r"grid_thw describes 16 patches .* but pixel_values has 20 rows"),
    (torch.zeros(12, 1176), [[1, 3, 4]], r"grid_thw\[0\] = \[1, 3, 4\]: h and w must be divisible by the spatial merge size 2"),
    (torch.zeros(0, 1176), [[0, 4, 4]], r"grid_thw\[0\] = \[0, 4, 4\]: every entry must be >= 1"),
    (torch.zeros(16, 1176), [[1.0, 4.0, 4.0]], r"grid_thw: expected an integer tensor \[n_images, 3\]"),
    (torch.zeros(16, 1176), [[1, 16]], r"grid_thw: expected an integer tensor \[n_images, 3\].*got \[1, 2\]"),
])
def test_bad_input_is_a_clear_error(vision, pixels, grid, message):
    with pytest.raises(ValueError, match=message):
        vision[0](pixels, torch.tensor(grid))


def test_device_mismatch_is_a_clear_error(vision):
    enc = copy.deepcopy(vision[0]).to("meta")
    with pytest.raises(ValueError, match=r"pixel_values is on cpu but the vision encoder is on meta"):
        enc(torch.zeros(16, 1176), torch.tensor([[1, 4, 4]]))


def test_projector_rejects_partial_windows(vision):
    with pytest.raises(ValueError, match=r"projector input: expected \[N, 160\] with N a multiple of 4"):
        vision[1](torch.zeros(6, 160))


def test_pixels_are_cast_to_the_encoder_dtype(official_dir):
    enc, _ = points.load_vision(official_dir, dtype=torch.bfloat16)
    out = enc(torch.randn(16, 1176, dtype=torch.float64), torch.tensor([[1, 4, 4]]))
    assert out.dtype == torch.bfloat16
