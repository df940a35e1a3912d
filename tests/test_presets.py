"""Each member's presets and POINTS-GUI-G's grounding: `Pipeline.chat(..., preset=)` asks exactly what the
conversation written out by hand asks (the system turn, the prompt of a turn of images only, the decoding
defaults under the caller's settings), another member's preset is refused naming the model's own, and
`points chat` / `run` / `serve` take it as a flag or a field; `locate` reads "(x, y)" into pixels of the image.

The models are random tiny POINTS-Reader and POINTS-GUI-G checkpoints in their released layouts (written by
points.tooling.synthetic, with the real Qwen2.5 tokenizer)."""

import base64
import io
import re
import json
import shutil
from contextlib import redirect_stderr, redirect_stdout

import pytest
import torch
from PIL import Image

import points
from points.io.chat import PointError, PresetError, build_prompt, parse_point, read_point, with_preset
from points.model.family import GUI_G, GUI_SYSTEM, READER, READER_PROMPT
from points.runtime.generation import GenerationConfig
from points.tooling import cli, run, synthetic

NEW = 2


def _checkpoint(folder, size, tokenizer_json):
    d = synthetic.write_checkpoint(folder / size, size, dtype=torch.float32, tokenizer="bytes")
    shutil.copy(tokenizer_json, d / "tokenizer.json")  # (the real vocabulary: the ids config.json names)
    return d


@pytest.fixture(scope="module")
def reader_dir(tmp_path_factory, tokenizer_json):
    return _checkpoint(tmp_path_factory.mktemp("reader"), "reader-tiny", tokenizer_json)


@pytest.fixture(scope="module")
def reader(reader_dir):
    return points.load(reader_dir)


@pytest.fixture(scope="module")
def gui(tmp_path_factory, tokenizer_json):
    return points.load(_checkpoint(tmp_path_factory.mktemp("gui"), "gui-tiny", tokenizer_json))


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """A small image (84 x 56: a few tokens)."""
    path = tmp_path_factory.mktemp("page") / "page.png"
    Image.new("RGB", (84, 56), (200, 30, 90)).save(path)
    return path


def _images_only(image):
    return [{"role": "user", "content": [{"type": "image", "image": image}]}]


def test_with_preset_adds_the_system_turn_and_fills_turns_of_images_only():
    image, text = {"type": "image", "image": "a.png"}, {"type": "text", "text": "And this?"}
    messages = [{"role": "user", "content": [image]}, {"role": "assistant", "content": "# Title"},
                {"role": "user", "content": [image, text]}, {"role": "user", "content": [image, image]}]
    before = json.dumps(messages)
    got = with_preset(messages, READER.presets["reader"])
    prompt = {"type": "text", "text": READER_PROMPT}
    assert got == [{"role": "user", "content": [image, prompt]}, messages[1], messages[2],
                   {"role": "user", "content": [image, image, prompt]}]
    assert json.dumps(messages) == before  # the caller's messages are left as they were
    gui = GUI_G.presets["gui"]
    assert with_preset(messages[2:3], gui) == [{"role": "system", "content": GUI_SYSTEM}, messages[2]]
    own = [{"role": "system", "content": "Mine."}, messages[2]]
    assert with_preset(own, gui) == own  # the conversation's own system turn stays, alone


def test_a_preset_asks_what_the_conversation_written_out_asks(reader, gui, page):
    """The preset's turns and its decoding settings as defaults (the caller's win): the same prompt, the same
    settings, the same sampled reply as the conversation and settings given by hand; chat, stream and
    chat_batch alike."""
    written = [{"role": "user", "content": [{"type": "image", "image": page}, {"type": "text", "text": READER_PROMPT}]}]
    settings = dict(READER.presets["reader"].generation) | {"max_new_tokens": NEW, "seed": 3}
    request = reader.submit(_images_only(page), preset="reader", max_new_tokens=NEW, seed=3)
    reply = request.text()
    assert reply == reader.chat(written, **settings)
    assert request.cfg == GenerationConfig(max_new_tokens=NEW, temperature=0.7, top_p=0.8, top_k=20,
                                           repetition_penalty=1.05, seed=3)
    assert request.prompt.text == build_prompt(written, reader.processor).text
    greedy = dict(max_new_tokens=NEW, temperature=0)
    assert "".join(reader.chat(_images_only(page), stream=True, preset="reader", **greedy)) \
        == reader.chat_batch([_images_only(page)], preset="reader", **greedy)[0] \
        == reader.chat(written, **(settings | greedy))
    request = gui.submit([{"role": "user", "content": "the OK button"}], preset="gui", max_new_tokens=1)
    request.text()
    assert request.cfg == GenerationConfig(max_new_tokens=1, temperature=0.0)
    assert request.prompt.text.startswith(f"<|im_start|>system\n{GUI_SYSTEM}<|im_end|>\n<|im_start|>user\n")


def test_a_preset_of_another_member_or_none_is_refused_naming_the_model_s(reader, gui, pipe):
    assert (reader.member, gui.member, pipe.member.name) == (READER, GUI_G, "points-1.5")
    text = [{"role": "user", "content": "Hi"}]
    with pytest.raises(PresetError, match=r"^preset 'gui': a preset of points-gui-g, not of this model "
                                          r"\(points-reader; its presets: reader\)$"):
        reader.chat(text, preset="gui")
    with pytest.raises(PresetError, match=r"^preset 'nope': no preset of this model \(points-gui-g; its presets: "
                                          r"gui\)$"):
        gui.chat_batch([text], preset="nope")
    with pytest.raises(PresetError, match=r"\(points-1.5; it has none\)$"):
        pipe.chat(text, stream=True, preset="reader")


@pytest.mark.parametrize("reply, expected", [
    ("(0.512, 0.034)", (0.512, 0.034)),
    ("  ( 0.5 ,0.25 ) ", (0.5, 0.25)),
    ("[0.1, 1]", (0.1, 1.0)),
    ("The button is at (.75, 0.2).", (0.75, 0.2)),
    ("(1, 1)", (1.0, 1.0)),  # both at most 1: the model's own [0, 1]
    ("(500, 250)", (0.5, 0.25)),  # a value above 1: thousandths
    ("[12, 0.5]", (0.012, 0.0005)),  # one scale per reply
    ("(1000, 0)", (1.0, 0.0)),
])
def test_parse_point(reply, expected):
    assert parse_point(reply) == pytest.approx(expected)


@pytest.mark.parametrize("reply, why", [
    ("the OK button", "no point (x, y) in the reply"),
    ("0.5, 0.25", "no point (x, y) in the reply"),  # brackets are part of the format
    ("(0.5 0.25)", "no point (x, y) in the reply"),
    ("(-0.1, 0.5)", "the point (-0.1, 0.5) is outside the image"),
    ("(1200, 40)", "the point (1200, 40) is outside the image"),
])
def test_a_reply_that_is_no_point_is_a_point_error_holding_it(reply, why):
    with pytest.raises(PointError, match=r"^" + re.escape(why)) as e:
        parse_point(reply)
    assert isinstance(e.value, ValueError) and e.value.reply == reply and repr(reply) in str(e.value)


def test_read_point_gives_pixels_of_the_original_image():
    point = read_point("(0.5, 0.25)", (1920, 1080))
    assert (point.x, point.y, point.nx, point.ny, point.reply) == (960, 270, 0.5, 0.25, "(0.5, 0.25)")
    assert read_point("[250, 1000]", (400, 300)).x == 100 and read_point("[250, 1000]", (400, 300)).y == 300


def test_locate_asks_gui_g_s_question_and_names_a_reply_that_is_no_point(gui, reader, page):
    """The tiny model's weights are random: its reply is no point, and the error holds the reply, which is the
    one the conversation written out gets (system prompt, [image, instruction], greedy)."""
    asked = [{"type": "image", "image": page}, {"type": "text", "text": "the OK button"}]
    written = [{"role": "system", "content": GUI_SYSTEM}, {"role": "user", "content": asked}]
    with pytest.raises(PointError) as e:
        gui.locate(page, "the OK button", max_new_tokens=NEW)
    assert e.value.reply == gui.chat(written, max_new_tokens=NEW)
    with pytest.raises(ValueError, match=r"^locate: points-reader is not a grounding model"):
        reader.locate(page, "the OK button")
    with pytest.raises(ValueError, match=r"^locate: image: .*missing.png: file not found"):
        gui.locate(page.parent / "missing.png", "the OK button")


def _cli(*args):
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = cli.main(list(args))
    return code, out.getvalue(), err.getvalue()


def test_chat_preset_flag(reader_dir, reader, page):
    """--preset with --image and no --prompt: one reply, to the images and the preset's prompt; a preset the
    checkpoint lacks is one line naming the flag."""
    code, out, err = _cli("chat", "--model", str(reader_dir), "--preset", "reader", "--image", str(page),
                          "--max-new-tokens", str(NEW), "--seed", "1")
    assert code == 0, err
    assert out == reader.chat(_images_only(str(page)), preset="reader", max_new_tokens=NEW, seed=1) + "\n"
    code, out, err = _cli("chat", "--model", str(reader_dir), "--preset", "gui", "--prompt", "Hi")
    assert code == 2 and err == ("error: --preset gui: a preset of points-gui-g, not of this model (points-reader; "
                                 "its presets: reader)\n")


def test_run_preset_flag_and_field(reader_dir, reader, page, tmp_path, capsys):
    """--preset for every item, a line's "preset" (null: none) over it, its generation fields over both; a line
    naming a preset the checkpoint lacks is refused with its line before any work."""
    items = [("a", _images_only(str(page)), {}),
             ("b", [{"role": "user", "content": "Hello"}], {"preset": None, "max_new_tokens": 1})]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps({"id": i, "messages": m, **f}) + "\n" for i, m, f in items))
    assert run.main(["--model", str(reader_dir), "--input", str(inp), "--output", str(out), "--preset", "reader",
                     "--max-new-tokens", str(NEW), "--seed", "2", "--progress", "off"]) == 0
    got = {r["id"]: r["reply"] for r in map(json.loads, out.read_text().splitlines())}
    assert got == {"a": reader.chat(items[0][1], preset="reader", max_new_tokens=NEW, seed=2),
                   "b": reader.chat(items[1][1], max_new_tokens=1, seed=2)}
    inp.write_text(json.dumps({"id": "a", "messages": items[0][1], "preset": "gui"}) + "\n")
    capsys.readouterr()
    assert run.main(["--model", str(reader_dir), "--input", str(inp), "--output", str(tmp_path / "o2.jsonl")]) == 2
    assert (f"{inp}, line 1: \"preset\" = 'gui': a preset of points-gui-g, not of this model (points-reader; its "
            "presets: reader)") in capsys.readouterr().err
    assert not (tmp_path / "o2.jsonl").exists()


def test_serve_preset_field_and_flag(reader_dir, reader, page):
    """`--preset reader`: the default of every request (a "preset" field names another); /v1/models names the
    member and its presets (the openai client reads them); a preset the model lacks is a 400 naming the field."""
    openai = pytest.importorskip("openai")
    pytest.importorskip("starlette")
    from test_serve import InProcess

    served = InProcess(reader_dir, "--preset", "reader", "--served-model-name", "reader")
    try:
        client = openai.OpenAI(base_url=served.url + "/v1", api_key="none", max_retries=0, timeout=60)
        model = client.models.list().data[0]
        assert (model.id, model.member, model.presets, model.default_preset) == ("reader", "points-reader",
                                                                                 ["reader"], "reader")
        url = "data:image/png;base64," + base64.b64encode(page.read_bytes()).decode()
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]
        got = client.chat.completions.create(model="reader", messages=messages, max_tokens=NEW, seed=4)
        ours = _images_only(page.read_bytes())
        assert got.choices[0].message.content == reader.chat(ours, preset="reader", max_new_tokens=NEW, seed=4)
        for value, message in (("gui", "preset: a preset of points-gui-g, not of this model (points-reader; its "
                                        "presets: reader)"),
                               (5, "preset: expected a string, got 5")):
            with pytest.raises(openai.BadRequestError) as e:
                client.chat.completions.create(model="reader", messages=messages, max_tokens=NEW,
                                               extra_body={"preset": value})
            assert e.value.body["param"] == "preset" and e.value.body["message"] == message
    finally:
        served.stop()
