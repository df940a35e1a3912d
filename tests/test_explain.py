"""`points explain`: the map's numbers from a recorded forward (which queries, which image tokens, in the
projector's merge order), the picture's geometry (a cell lands where its 28 x 28 pixels are), and the
command as a user runs it."""

from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

from points.runtime.look import Look
from points.tooling import explain

PHOTO = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"


def _look(h=4, w=6, reply=3):
    """A Look whose attention to image token j (of one h x w-patch image) is j + 1 at every choosing query,
    in layer 0, and 2 * (j + 1) in layer 5, before 3 prompt tokens and after 2."""
    n_img = h * w // 4
    start, L = 3, 3 + n_img + 2 + reply
    seen = Look(tokens=list(range(L)), reply_start=L - reply, images=[{"grid": (1, h, w), "start": 3,
                                                                        "end": 3 + n_img}])
    for layer, scale in ((0, 1.0), (5, 2.0)):
        probs = torch.zeros(2, L, L)
        probs[:, :, start:start + n_img] = scale * torch.arange(1, n_img + 1, dtype=torch.float32) / 1000
        probs[:, :, 0] = 1 - probs[:, :, start:start + n_img].sum(-1)  # the rest on the first token
        seen.attentions[layer] = probs
    return seen


def test_the_grid_is_the_merged_windows_in_raster_order_averaged_over_layers_heads_and_queries():
    from points.model.vision import patch_positions

    seen = _look()
    grid, share = explain.attention_to_image(seen)
    want = torch.zeros(2, 3)  # image token j is merged window j: where the encoder puts window j's patches
    rows = patch_positions([(1, 4, 6)], 2)
    for j in range(6):
        r, c = (rows[4 * j:4 * j + 4] // 2).unique(dim=0)[0].tolist()
        want[r, c] = 1.5 * (j + 1) / 1000  # the mean of layers 1x and 2x
    torch.testing.assert_close(grid, want)
    assert share == pytest.approx(1.5 * 21 / 1000)
    seen.attentions[0][:, seen.reply_start - 1 + 1, 3] = 0.5  # only the query that chose reply token 1
    one, _ = explain.attention_to_image(seen, token=1)
    assert one[0, 0] == pytest.approx((0.5 + 2 / 1000) / 2)
    assert explain.attention_to_image(seen, token=-2)[0][0, 0] == one[0, 0]
    with pytest.raises(ValueError, match="--token 3: the reply has 3 tokens"):
        explain.attention_to_image(seen, token=3)


def test_a_hot_cell_is_drawn_where_its_pixels_are():
    grid = torch.zeros(3, 4)
    grid[0, 3] = 1.0  # the top-right window
    picture = Image.new("RGB", (112, 84), "gray")
    out = np.asarray(explain.draw(picture, grid, ["Q: a line", "A: another"], width=400))
    h = 300  # 400 x 3 / 4
    hot = explain.colour(np.array(1.0)).astype(float) * 0.5 + 128 * 0.5
    cold = explain.colour(np.array(0.0)).astype(float) * 0.5 + 128 * 0.5
    assert np.abs(out[50, 350] - hot).max() <= 2 and np.abs(out[50, 50] - cold).max() <= 2
    assert np.abs(out[250, 350] - cold).max() <= 2
    below = out[h + 30:]
    assert (below < 100).any() and (below == 255).all(axis=-1).mean() > 0.5  # dark text on white


def test_the_command_draws_the_picture(e2e_dir, tmp_path, capsys):
    out = tmp_path / "heat.png"
    args = ["--model", str(e2e_dir), "--image", str(PHOTO), "--prompt", "Who is this?", "--max-new-tokens", "6"]
    assert explain.main([*args, "--output", str(out)]) == 0
    assert "of the attention on the image" in capsys.readouterr().err
    whole = np.asarray(Image.open(out))
    w, h = Image.open(PHOTO).size
    assert whole.shape[1] == 640 and whole.shape[0] > 640 * h / w * 0.9 + 60  # the image (cells square), the text
    one = tmp_path / "one.png"
    assert explain.main([*args, "--output", str(one), "--token", "0", "--layers", "-1", "--heads", "0"]) == 0
    assert not np.array_equal(np.asarray(Image.open(one)), whole)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heat.png", "one.png"]


@pytest.mark.parametrize("extra, message", [
    (["--token", "999"], "--token 999: the reply has"),
    (["--layers", "99"], "--layers: index 99 is out of range (there are 2)"),
    (["--heads", "-8"], "--heads: index -8 is out of range (there are 7)"),
    (["--image-missing"], None),
])
def test_bad_arguments_are_one_line(e2e_dir, tmp_path, capsys, extra, message):
    out = tmp_path / "heat.png"
    if extra == ["--image-missing"]:
        argv = ["--model", str(e2e_dir), "--image", str(tmp_path / "none.jpg"), "--prompt", "?", "--output", str(out)]
        message = "--image"
    else:
        argv = ["--model", str(e2e_dir), "--image", str(PHOTO), "--prompt", "?", "--output", str(out),
                "--max-new-tokens", "4", *extra]
    assert explain.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not out.exists()
    with pytest.raises(SystemExit):
        explain.main(["--model", str(e2e_dir), "--image", str(PHOTO), "--prompt", "?", "--output", "x.jpg"])
    assert "expected a .png path" in capsys.readouterr().err


def test_an_output_that_is_the_image_is_refused_and_the_image_kept(e2e_dir, tmp_path, capsys):
    """The heat map never replaces its own input, however the path is spelled (a new user's probe lost the image)."""
    image = tmp_path / "in.png"
    Image.open(PHOTO).save(image)
    before = image.read_bytes()
    for output in (image, tmp_path / "x" / ".." / "in.png"):
        (tmp_path / "x").mkdir(exist_ok=True)
        argv = ["--model", str(e2e_dir), "--image", str(image), "--prompt", "?", "--output", str(output)]
        assert explain.main(argv) == 2
        assert capsys.readouterr().err == (f"error: --output {output}: is the input file (--image {image}); writing it "
                                           "would replace it: choose another output path\n")
    assert image.read_bytes() == before


def test_layers_and_heads_are_checked_before_the_model_loads(e2e_dir, tmp_path, capsys):
    """A directory with config.json alone: had the weights been read, the error would name them."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_bytes((e2e_dir / "config.json").read_bytes())
    argv = ["--model", str(tmp_path / "model"), "--image", str(PHOTO), "--prompt", "?", "--output",
            str(tmp_path / "heat.png")]
    assert explain.main([*argv, "--layers", "99"]) == 2
    assert capsys.readouterr().err == "error: --layers: index 99 is out of range (there are 2)\n"
    assert explain.main([*argv, "--heads", "7"]) == 2
    assert capsys.readouterr().err == "error: --heads: index 7 is out of range (there are 7)\n"
