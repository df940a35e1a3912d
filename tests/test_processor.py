"""The image processor against transformers' PIL processor, and smart_resize against the reference rule."""

import math
from pathlib import Path

import matplotlib
import pytest
import torch
from hypothesis import given, settings, strategies as st
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from points.io.processor import ImageProcessor, smart_resize

PHOTO = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"  # a real photograph (512 x 600)


def _photo():
    return Image.open(PHOTO)


def _ref(img: Image.Image, **kw):
    """transformers' processor on the image after PIL's convert('RGB') (what POINTS' chat() feeds it)."""
    out = Qwen2VLImageProcessorPil(**kw)(images=[img.convert("RGB")], return_tensors="pt")
    return out["pixel_values"], tuple(out["image_grid_thw"][0].tolist())


CASES = {
    "photo": lambda: _photo(),
    "photo_large_hits_max_pixels": lambda: _photo().resize((4000, 3400), Image.Resampling.LANCZOS),
    "photo_crop_odd": lambda: _photo().crop((13, 7, 13 + 301, 7 + 157)),
    "grayscale": lambda: _photo().convert("L"),
    "rgba": lambda: Image.merge("RGBA", (*_photo().split(), Image.linear_gradient("L").resize((512, 600)))),
    "palette": lambda: _photo().convert("P", palette=Image.Palette.ADAPTIVE),
    "thin_30x900": lambda: _photo().resize((30, 900)),
}


@pytest.mark.parametrize("name", CASES)
def test_matches_transformers(name):
    img = CASES[name]()
    expected, grid = _ref(img)
    got, our_grid = ImageProcessor()(img)
    assert our_grid == grid
    assert got.dtype == torch.float32 and got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_max_pixels_branch_taken():
    img = CASES["photo_large_hits_max_pixels"]()
    _, (t, h, w) = ImageProcessor()(img)
    assert h * w * 196 <= 28 * 28 * 1280 < round(3400 / 28) * round(4000 / 28) * 784


def test_alpha_is_dropped_not_composited():
    """PIL convert('RGB') keeps the stored colour of transparent pixels (the reference); no white matte."""
    img = Image.new("RGBA", (56, 56), (10, 200, 30, 0))
    pv, grid = ImageProcessor()(img)
    expected, _ = ImageProcessor()(Image.new("RGB", (56, 56), (10, 200, 30)))
    assert torch.equal(pv, expected)


@pytest.mark.parametrize("size, grid", [((1, 1), (1, 4, 4)), ((20, 15), (1, 4, 6)), ((900, 30), (1, 2, 64))])
def test_tiny_sides_do_not_raise(size, grid):
    """Sides under 28 px go through the min_pixels branch (PIL sizes are width x height)."""
    _, got = ImageProcessor()(Image.new("RGB", size, (1, 2, 3)))
    assert got == grid
    h, w = _spec_resize(size[1], size[0])
    assert got == (1, h // 14, w // 14)


def test_inputs_path_pathlib_bytes_pil_agree(tmp_path):
    path = tmp_path / "p.png"
    _photo().save(path)
    outs = [ImageProcessor()(x)[0] for x in (str(path), path, path.read_bytes(), Image.open(path))]
    assert all(torch.equal(outs[0], o) for o in outs[1:])


def test_preprocessor_config_is_read(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text('{"min_pixels": 3136, "max_pixels": 50176}')
    proc = ImageProcessor.from_dir(tmp_path)
    assert (proc.min_pixels, proc.max_pixels) == (3136, 50176)
    _, grid = proc(_photo())
    assert grid[1] * grid[2] * 196 <= 50176
    assert ImageProcessor.from_dir(tmp_path / "absent") == ImageProcessor()


def test_aspect_ratio_over_200_is_refused():
    with pytest.raises(ValueError, match="aspect ratio 201.0 is over 200"):
        smart_resize(28, 28 * 201)


def test_unreadable_images_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="image bytes: not a readable image"):
        ImageProcessor()(b"not an image")
    with pytest.raises(ValueError, match="nope.png: file not found"):
        ImageProcessor()(tmp_path / "nope.png")
    with pytest.raises(ValueError, match="expected a path, pathlib.Path, bytes or PIL.Image.Image, got int"):
        ImageProcessor()(3)


def _spec_resize(H, W, factor=28, lo=3136, hi=1003520):
    h, w = round(H / factor) * factor, round(W / factor) * factor
    if h * w > hi:
        b = math.sqrt(H * W / hi)
        h, w = math.floor(H / b / factor) * factor, math.floor(W / b / factor) * factor
    elif h * w < lo:
        b = math.sqrt(lo / (H * W))
        h, w = math.ceil(H * b / factor) * factor, math.ceil(W * b / factor) * factor
    return h, w


@settings(max_examples=300, deadline=None)
@given(st.integers(28, 6000), st.integers(28, 6000))
def test_smart_resize_properties(H, W):
    if max(H, W) / min(H, W) > 200:
        return
    h, w = smart_resize(H, W)
    assert (h, w) == _spec_resize(H, W)
    assert h % 28 == 0 and w % 28 == 0 and h >= 28 and w >= 28
    assert h * w <= 1003520
    if H * W >= 3136:
        assert h * w >= 3136 or min(h, w) == 28  # only a side pinned at one window can fall short
    assert abs(h / w - H / W) <= (H / W) * (28 / min(h, w)) + 28 / min(h, w)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 300), st.integers(1, 300))
def test_output_shape_matches_grid(H, W):
    pv, (t, gh, gw) = ImageProcessor()(Image.new("RGB", (W, H)))
    assert t == 1 and gh % 2 == 0 and gw % 2 == 0
    assert pv.shape == (gh * gw, 1176)


def test_an_image_items_own_max_pixels_shrinks_it_first_as_reader_does():
    """POINTS-Reader's chat: w x h over the item's max_pixels -> (floor(w / b), floor(h / b)), b = sqrt(w h / N),
    bicubic, then the processor as usual; at or under it, nothing changes."""
    import math

    from points.io.chat import build_prompt

    img = Image.open(PHOTO).convert("RGB")  # 512 x 600
    n = 100_000
    b = math.sqrt(img.width * img.height / n)
    shrunk = img.resize((math.floor(img.width / b), math.floor(img.height / b)), Image.Resampling.BICUBIC)
    proc = ImageProcessor(item_max_pixels="prefit")
    want, grid = proc(shrunk)
    got, got_grid = proc(img, max_pixels=n)
    assert got_grid == grid and torch.equal(got, want) and grid != proc(img)[1]
    assert torch.equal(proc(img, max_pixels=img.width * img.height)[0], proc(img)[0])
    prompt = build_prompt([{"role": "user", "content": [{"type": "image", "image": img, "max_pixels": n},
                                                        {"type": "text", "text": "Read it."}]}], proc)
    assert torch.equal(prompt.pixel_values, want)
    for key in ("max_pixels", "min_pixels"):
        for bad in (0, 783, 1.5, True, "100"):
            with pytest.raises(ValueError, match=rf"^messages\[0\].content\[0\].{key} = .*: expected an integer >= 784"):
                build_prompt([{"role": "user", "content": [{"type": "image", "image": img, key: bad}]}], proc)


@pytest.mark.parametrize("rules", ["points", "qwen2vl"])
@pytest.mark.parametrize("bounds", [(3136, 50_000), (400_000, 2_000_000), (None, 20_000), (500_000, None)])
def test_an_image_items_own_bounds_are_the_processors_with_those_bounds(rules, bounds):
    """Qwen-VL's convention (every member but Reader): an image item's min_pixels / max_pixels are the
    processor's bounds for that image: the same ids and pixels as a processor built with them, and for the
    stock rules as transformers' processor with them; a min over the max is refused, naming the item."""
    from points.io.chat import build_prompt

    lo, hi = bounds
    img = Image.open(PHOTO).convert("RGB")  # 512 x 600
    proc = ImageProcessor(rules=rules)
    own = ImageProcessor(min_pixels=lo or proc.min_pixels, max_pixels=hi or proc.max_pixels, rules=rules)
    want, grid = own(img)
    got, got_grid = proc(img, max_pixels=hi, min_pixels=lo)
    assert got_grid == grid and torch.equal(got, want)
    if rules == "qwen2vl":
        expected, ref_grid = _ref(img, min_pixels=lo or proc.min_pixels, max_pixels=hi or proc.max_pixels)
        assert ref_grid == grid and torch.equal(got, expected)
    item = {"type": "image", "image": img} | ({"min_pixels": lo} if lo else {}) | ({"max_pixels": hi} if hi else {})
    prompt = build_prompt([{"role": "user", "content": [item, {"type": "text", "text": "Read it."}]}], proc)
    assert torch.equal(prompt.pixel_values, want) and prompt.grid_thw.tolist() == [list(grid)]
    with pytest.raises(ValueError, match=r"^messages\[0\].content\[0\].min_pixels = 5000: expected at most max_pixels \(4000\)"):
        build_prompt([{"role": "user", "content": [{"type": "image", "image": img, "min_pixels": 5000,
                                                    "max_pixels": 4000}]}], proc)


# --------------------------------------------------------------------------- rules="qwen2vl" (Reader, GUI-G)
# transformers' stock processor against POINTS-1.5's on the sizes where their smart_resize differs.
# Sizes are PIL's (width, height); processor settings (min_pixels, max_pixels) as given.

DEFAULT = (3136, 1003520)
SMALL_MAX = (3136, 28 * 28 * 20)  # low enough that shrinking floors a thin side to 0
EDGES = {  # name: (size, settings, what "points" gives: a grid, or the start of its error)
    "side_under_28": ((20, 15), DEFAULT, (1, 4, 6)),
    "aspect_200_exactly": ((5600, 28), DEFAULT, (1, 2, 400)),
    "aspect_200_exactly_side_under_28": ((2000, 10), DEFAULT, (1, 2, 58)),
    "aspect_just_under_200_side_under_28": ((1999, 10), DEFAULT, (1, 2, 58)),
    "aspect_just_over_200": ((5601, 28), DEFAULT, "image size 5601x28: aspect ratio 200.0357 is over 200"),
    "aspect_just_over_200_side_under_28": ((2001, 10), DEFAULT, (1, 2, 58)),
    "shrink_floors_a_side_to_0": ((1500, 30), SMALL_MAX, "image size 1500x30: resizes to 868x0"),
    "upscale_by_min_pixels": ((40, 40), DEFAULT, (1, 4, 4)),
    "upscale_by_larger_min_pixels": ((90, 50), (28 * 28 * 16, 1003520), (1, 6, 12)),
}


@pytest.mark.parametrize("name", EDGES)
def test_qwen2vl_rules_match_transformers_stock_processor(name):
    """Pixels bit for bit and the grid, or both refuse the image."""
    (W, H), (lo, hi), _ = EDGES[name]
    img = Image.effect_noise((W, H), 64).convert("RGB")
    proc = ImageProcessor(min_pixels=lo, max_pixels=hi, rules="qwen2vl")
    try:
        expected, grid = _ref(img, min_pixels=lo, max_pixels=hi)
    except ValueError:
        with pytest.raises(ValueError, match=rf"^image size {W}x{H}: aspect ratio .* is over 200"):
            proc(img)
        return
    got, our_grid = proc(img)
    assert our_grid == grid and torch.equal(got, expected)


@pytest.mark.parametrize("name", EDGES)
def test_points_rules_keep_points_behaviour_at_the_edges(name):
    """POINTS-1.5's rule (wepoints/utils/images.py): no aspect check under a 28 px side, no clamp when shrinking."""
    (W, H), (lo, hi), want = EDGES[name]
    proc = ImageProcessor(min_pixels=lo, max_pixels=hi, rules="points")
    img = Image.new("RGB", (W, H), (1, 2, 3))
    if isinstance(want, str):
        with pytest.raises(ValueError, match=f"^{want}"):
            proc(img)
        return
    pv, grid = proc(img)
    h, w = _spec_resize(H, W, lo=lo, hi=hi)
    assert grid == want == (1, h // 14, w // 14) and pv.shape == (h * w // 196, 1176)


def test_the_rules_differ_exactly_where_documented():
    """Same grid under both rules except: aspect over 200 with a side under 28, and a shrink that floors to 0."""
    differ = set()
    for name, ((W, H), (lo, hi), _) in EDGES.items():
        out = {}
        for rules in ("points", "qwen2vl"):
            try:
                out[rules] = smart_resize(H, W, 28, lo, hi, rules=rules)
            except ValueError:
                out[rules] = None
        if out["points"] != out["qwen2vl"]:
            differ.add(name)
    assert differ == {"aspect_just_over_200_side_under_28", "shrink_floors_a_side_to_0"}
    assert smart_resize(30, 1500, 28, *SMALL_MAX, rules="qwen2vl") == (28, 868)  # area 24304 > max_pixels 15680


@settings(max_examples=400, deadline=None)
@given(st.integers(1, 6000), st.integers(1, 6000), st.sampled_from([56 * 56, 28 * 28 * 16, 28 * 28 * 256]),
       st.sampled_from([28 * 28 * 4, 28 * 28 * 20, 28 * 28 * 1280, 12_845_056]))
def test_qwen2vl_smart_resize_is_transformers(H, W, lo, hi):
    """Every size: the same target as transformers' own smart_resize, or both refuse it."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as stock

    try:
        expected = stock(H, W, 28, lo, hi)
    except ValueError:
        with pytest.raises(ValueError, match=rf"^image size {W}x{H}: aspect ratio"):
            smart_resize(H, W, 28, lo, hi, rules="qwen2vl")
        return
    assert smart_resize(H, W, 28, lo, hi, rules="qwen2vl") == expected


def test_rules_reach_the_processor_from_dir_and_are_checked(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text('{"min_pixels": 3136, "max_pixels": 15680}')
    proc = ImageProcessor.from_dir(tmp_path, rules="qwen2vl")
    assert (proc.rules, proc.max_pixels) == ("qwen2vl", 15680)
    assert proc(Image.new("RGB", (1500, 30)))[1] == (1, 2, 62)
    assert ImageProcessor.from_dir(tmp_path / "absent", rules="qwen2vl") == ImageProcessor(rules="qwen2vl")
    assert ImageProcessor.from_dir(tmp_path).rules == "points"
    for bad in ("Qwen2VL", "stock", None):
        with pytest.raises(ValueError, match=r"^rules = .*: expected one of 'points', 'qwen2vl'$"):
            ImageProcessor.from_dir(tmp_path, rules=bad)
        with pytest.raises(ValueError, match=r"^rules = "):
            smart_resize(56, 56, rules=bad)


def test_an_image_items_own_max_pixels_under_qwen2vl_rules():
    """Reader's per-image shrink first, then the stock processor: the same pixels as transformers' on the shrunk
    image (a thin one, whose grid the stock clamp decides)."""
    img = Image.effect_noise((3000, 60), 64).convert("RGB")
    n = 45_000
    b = math.sqrt(img.width * img.height / n)
    shrunk = img.resize((math.floor(img.width / b), math.floor(img.height / b)), Image.Resampling.BICUBIC)
    expected, grid = _ref(shrunk, min_pixels=3136, max_pixels=28 * 28 * 20)
    got, our_grid = ImageProcessor(max_pixels=28 * 28 * 20, rules="qwen2vl", item_max_pixels="prefit")(img, max_pixels=n)
    assert our_grid == grid and torch.equal(got, expected)
    with pytest.raises(ValueError, match="resizes to .*x0"):
        ImageProcessor(max_pixels=28 * 28 * 20, rules="points", item_max_pixels="prefit")(img, max_pixels=n)
