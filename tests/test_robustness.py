"""Bad or unusual input: each case gives a clear, specific error (or a documented behaviour), never an
obscure traceback or a partial result."""

import io
import json
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

import points
from points.io.processor import MAX_IMAGE_PIXELS, ImageProcessor, open_image, smart_resize

PHOTO = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"


def _png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


def _with_declared_size(png: bytes, width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height (CRC fixed), its data untouched: a decompression bomb's header."""
    assert png[12:16] == b"IHDR"
    ihdr = b"IHDR" + struct.pack(">II", width, height) + png[24:29]
    return png[:8] + png[8:12] + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + png[33:]


# --------------------------------------------------------------------------- images: errors

def test_empty_file(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty.jpg: not a readable image"):
        ImageProcessor()(tmp_path / "empty.jpg")


def test_non_image_bytes(tmp_path):
    (tmp_path / "notes.png").write_text("these are not pixels\n" * 10)
    with pytest.raises(ValueError, match=r"notes.png: not a readable image"):
        ImageProcessor()(str(tmp_path / "notes.png"))


def test_truncated_jpeg(tmp_path):
    data = PHOTO.read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match=r"cut.jpg: not a readable image \(image file is truncated"):
        ImageProcessor()(tmp_path / "cut.jpg")


@pytest.mark.parametrize("side", [10_000, 40_000, 100_000])  # over the limit, over twice it (pillow's own error)
def test_decompression_bomb_refused_before_decoding(tmp_path, side):
    bomb = _with_declared_size(_png(Image.new("L", (8, 8))), side, side)
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb)
    with pytest.raises(ValueError, match=rf"bomb.png: declares .*{side * side:,} pixels, over the limit of "
                                         rf"{MAX_IMAGE_PIXELS:,} pixels \(a decompression bomb\?\); refused before "
                                         "decoding$") as e:
        ImageProcessor()(path)
    assert "178" not in str(e.value) and "exceeds limit" not in str(e.value)  # one limit named: ours
    with pytest.raises(ValueError, match="image bytes: declares"):
        ImageProcessor()(bomb)


@pytest.mark.parametrize("url", ["https://example.com/cat.jpg", "http://host/a.png", "file:///tmp/a.png"])
def test_urls_are_not_fetched(url):
    with pytest.raises(ValueError, match=rf"^{re.escape(url)}: URLs are not fetched; download the file first"):
        ImageProcessor()(url)


def test_directory_instead_of_image(tmp_path):
    with pytest.raises(ValueError, match="not a readable image"):
        ImageProcessor()(tmp_path)


# --------------------------------------------------------------------------- images: sensible behaviour

def test_one_pixel_image_grows_to_the_minimum():
    pv, grid = ImageProcessor()(Image.new("RGB", (1, 1), (255, 0, 0)))
    assert grid == (1, 4, 4) and pv.shape == (16, 1176)  # 56 x 56 = min_pixels
    assert torch.allclose(pv[0, :196], pv[0, 0].expand(196))  # one colour throughout


def test_aspect_ratio_over_200():
    with pytest.raises(ValueError, match=r"image size 5656x28: aspect ratio 202.0 is over 200"):
        ImageProcessor()(Image.new("RGB", (5656, 28)))


def _same_as_rgb_of(path_or_img, expected: Image.Image):
    got, grid = ImageProcessor()(path_or_img)
    want, grid2 = ImageProcessor()(expected.convert("RGB"))
    assert grid == grid2
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("colour", [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0),
                                    (128, 128, 128), (250, 140, 20), (30, 90, 160)])
def test_cmyk_jpeg_gives_the_colour_it_holds(tmp_path, colour):
    """A CMYK JPEG (Adobe's inverted convention, as pillow writes it) of one known colour: the processor's
    pixels, un-normalised, are that colour (within 2 / 255 of JPEG rounding), not its channels read as RGB
    or inverted."""
    from points.io.processor import CLIP_MEAN, CLIP_STD

    Image.new("RGB", (64, 64), colour).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    pv, _ = ImageProcessor()(tmp_path / "cmyk.jpg")
    channels = pv.reshape(-1, 3, 2 * 14 * 14)  # each row: (channel, frame, y, x)
    rgb = (channels * torch.tensor(CLIP_STD)[:, None] + torch.tensor(CLIP_MEAN)[:, None]) * 255
    assert (rgb - torch.tensor(colour, dtype=torch.float32)[:, None]).abs().max() <= 2


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path):
    ramp = (np.arange(64 * 64, dtype=np.uint32) * 16).astype(np.uint16).reshape(64, 64)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I;16")
    img = open_image(tmp_path / "deep.png")
    assert img.mode == "RGB" and np.array_equal(np.asarray(img)[..., 0], (ramp >> 8).astype(np.uint8))


def test_la_alpha_is_dropped(tmp_path):
    la = Image.merge("LA", (Image.linear_gradient("L").resize((60, 40)), Image.new("L", (60, 40), 0)))
    Image.Image.save(la, tmp_path / "la.png")
    _same_as_rgb_of(tmp_path / "la.png", la.convert("L"))  # fully transparent, yet the grey values stay


def test_premultiplied_la_from_the_python_api():
    """A PIL image in mode "La" (pillow converts it to RGB only through LA): read as its LA form is."""
    la = Image.merge("LA", (Image.linear_gradient("L").resize((60, 40)), Image.new("L", (60, 40), 200)))
    premultiplied = la.convert("La")
    assert np.array_equal(np.asarray(open_image(premultiplied)), np.asarray(premultiplied.convert("LA").convert("RGB")))


def test_stream_must_be_a_bool(pipe):
    messages = [{"role": "user", "content": "Hi"}]
    for value in ("yes", 1, None):
        with pytest.raises(TypeError, match=r"^stream: expected True or False, got "):
            pipe.chat(messages, stream=value, max_new_tokens=1)


def test_palette_with_transparency(tmp_path, recwarn):
    p = Image.open(PHOTO).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    p.info["transparency"] = 0
    (tmp_path / "p.png").write_bytes(_png(p, transparency=0))
    _same_as_rgb_of(tmp_path / "p.png", Image.open(PHOTO).convert("P", palette=Image.Palette.ADAPTIVE, colors=16))
    assert not [w for w in recwarn if "Palette images with Transparency" in str(w.message)]


def test_animated_gif_uses_the_first_frame(tmp_path):
    frames = [Image.new("RGB", (64, 48), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(tmp_path / "anim.gif").n_frames == 3
    _same_as_rgb_of(tmp_path / "anim.gif", Image.open(tmp_path / "anim.gif"))  # frame 0 (red, via the palette)
    assert np.asarray(open_image(tmp_path / "anim.gif"))[0, 0].tolist() == [255, 0, 0]


def test_exif_orientation_is_ignored_like_the_reference(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.open(PHOTO).save(tmp_path / "rotated.jpg", exif=exif)
    img = open_image(tmp_path / "rotated.jpg")
    assert img.size == Image.open(PHOTO).size  # stored orientation: 512 wide, 600 high, not 600 x 512
    _, grid = ImageProcessor()(tmp_path / "rotated.jpg")
    h, w = smart_resize(600, 512)
    assert grid == (1, h // 14, w // 14) and h > w


# --------------------------------------------------------------------------- checkpoints

def test_load_refuses_a_directory_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(points.CheckpointError, match=r"config.json: not found"):
        points.load(tmp_path)


def test_load_refuses_another_model_type(e2e_dir, tmp_path):
    import shutil

    other = tmp_path / "llava"
    shutil.copytree(e2e_dir, other)
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(dict(cfg, model_type="llava")))
    with pytest.raises(points.CheckpointError, match=r"config.json: model_type 'llava' is not a POINTS model"):
        points.load(other)


def test_dtype_the_device_cannot_run(e2e_dir, monkeypatch):
    real = torch.nn.functional.linear

    def no_half(x, w, b=None):
        if x.dtype == torch.float16:
            raise RuntimeError('"addmm_impl_cpu_" not implemented for \'Half\'')
        return real(x, w, b)
    monkeypatch.setattr(torch.nn.functional, "linear", no_half)
    with pytest.raises(points.CheckpointError, match=r"dtype float16 cannot run matmuls on cpu \(\"addmm_impl_cpu_\" "
                                                      r"not implemented for 'Half'\); choose another dtype"):
        points.load(e2e_dir, dtype=torch.float16)
    with pytest.raises(points.CheckpointError, match=r"dtype float16 cannot run"):
        points.load(e2e_dir, dtype="float16")


# --------------------------------------------------------------------------- the command line

def _points(*args, **kw):
    return subprocess.run([sys.executable, "-m", "points", *args], capture_output=True, text=True, **kw)


@pytest.mark.parametrize("command", [[], ["chat"], ["convert"], ["demo"], ["bench"], ["run"], ["serve"]])
def test_help_for_each_command(command, capsys):
    from points.tooling import cli

    with pytest.raises(SystemExit) as e:
        cli.main([*command, "--help"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith("usage: points" + (f" {command[0]}" if command else ""))


def test_help_version_and_bad_flags_answer_without_torch():
    """`--help`, `--version` and a bad flag of every command, in a fresh interpreter: torch (2-3 s to import) is
    never imported, so they answer at once; `import points` is as light, and its modules come on first use."""
    from points.tooling.cli import COMMANDS

    code = f"""
import contextlib, io, sys
from points.tooling import cli
for argv in [["--version"], ["--help"], ["chat", "--help"], ["chat", "--bogus"]] + [
        [c, flag] for c in {sorted(COMMANDS)!r} for flag in ("--help", "--bogus")]:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        try:
            cli.main(argv)
        except SystemExit as e:
            assert e.code == (2 if "--bogus" in argv else 0), (argv, e.code, err.getvalue())
    assert "torch" not in sys.modules, argv
import points
assert "torch" not in sys.modules
points.runtime.linears.transpose_tall_linears  # README's call after `import points`
assert "torch" in sys.modules and not hasattr(points, "no_such_name")
print("ok")
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout == "ok\n", run.stderr


def test_version():
    """The installed entry point itself, in a fresh interpreter (`python -m points`)."""
    run = _points("--version")
    assert run.returncode == 0 and run.stdout.strip() == f"points {points.__version__}"


def test_demo_runs_offline_and_says_the_weights_are_random(tmp_path, capsys, tokenizer_built_once):
    from points.tooling import demo

    cache = tmp_path / "cache"
    assert demo.main(["--cache-dir", str(cache), "--max-new-tokens", "5"]) == 0
    first = capsys.readouterr()
    assert "RANDOM WEIGHTS" in first.err and "the real Qwen2.5 vocabulary" in first.err
    assert "writing the demo checkpoint" in first.err and "  written in " in first.err  # (not silent meanwhile)
    ckpt = next(cache.glob("demo-tiny-*"))
    assert json.loads((ckpt / "DEMO.json").read_text())["weights"] == "random"
    # the demo checkpoint is an ordinary released-layout directory: the same reply through the API
    pipe = points.load(ckpt)
    messages = [{"role": "user", "content": [{"type": "image", "image": str(cache / "demo-house.png")},
                                             {"type": "text", "text": "Describe this picture."}]}]
    assert first.out == pipe.chat(messages, max_new_tokens=5) + "\n"
    assert demo.main(["--cache-dir", str(cache), "--max-new-tokens", "5"]) == 0
    again = capsys.readouterr()
    assert "writing the demo checkpoint" not in again.err and again.out == first.out


def test_demo_cache_dir_that_is_a_file(tmp_path, capsys):
    from points.tooling import demo

    (tmp_path / "cache").write_text("not a folder")
    assert demo.main(["--cache-dir", str(tmp_path / "cache")]) == 2
    assert capsys.readouterr().err == (f"error: --cache-dir {tmp_path / 'cache'}: is a file; expected a folder (it is "
                                       "created if missing)\n")
    assert demo.main(["--cache-dir", str(tmp_path / "cache" / "below")]) == 1  # a parent that is a file
    assert capsys.readouterr().err.startswith(f"error: --cache-dir {tmp_path / 'cache' / 'below'}: cannot write (")


@pytest.mark.parametrize("size", ["-1", "0", "1e-10", "inf", "nan"])
def test_convert_refuses_a_shard_size_that_is_no_size(official_dir, tmp_path, size, capsys):
    from points.tooling import convert

    with pytest.raises(SystemExit) as e:
        convert.main([str(official_dir), str(tmp_path / "out"), "--max-shard-gb", size])
    assert e.value.code == 2 and "--max-shard-gb" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_demo_with_an_unreadable_image(tmp_path, capsys):
    from points.tooling import demo

    assert demo.main(["--cache-dir", str(tmp_path / "c"), "--image", str(tmp_path / "missing.jpg")]) == 2
    assert capsys.readouterr().err == f"error: --image {tmp_path / 'missing.jpg'}: file not found\n"
    assert not (tmp_path / "c").exists()  # refused before the demo checkpoint is written


def test_demo_of_another_member_asks_with_its_preset(tmp_path, capsys, tokenizer_built_once):
    """`points demo --model reader`: a random tiny POINTS-Reader in its released layout, asked with its preset
    (the document prompt on a turn of the picture alone); the reply is the pipeline's."""
    from points.tooling import demo

    cache = tmp_path / "cache"
    assert demo.main(["--cache-dir", str(cache), "--model", "reader", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr()
    assert "POINTS-Reader" in out.err and "preset 'reader'" in out.err and "'reader-tiny' shapes" in out.err
    pipe = points.load(next(cache.glob("demo-reader-tiny-*")))
    assert pipe.member.name == "points-reader"
    picture = [{"role": "user", "content": [{"type": "image", "image": str(cache / "demo-house.png")}]}]
    assert out.out == pipe.chat(picture, preset="reader", max_new_tokens=3, seed=0) + "\n"  # (its sampling, seeded)
