"""The command line: one-shot chat streams the same reply as the Python API; convert delegates."""

import subprocess
import sys
from pathlib import Path

import matplotlib

PHOTO = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"


def _run(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "points", *args], capture_output=True, text=True, input=stdin)


def test_chat_prompt_prints_the_reply(e2e_dir, pipe):
    run = _run("chat", "--model", str(e2e_dir), "--image", str(PHOTO), "--prompt", "Describe.", "--max-new-tokens", "6")
    assert run.returncode == 0, run.stderr
    messages = [{"role": "user", "content": [{"type": "image", "image": str(PHOTO)}, {"type": "text", "text": "Describe."}]}]
    assert run.stdout == pipe.chat(messages, max_new_tokens=6) + "\n"


def test_interactive_session_keeps_the_conversation(e2e_dir, pipe):
    run = _run("chat", "--model", str(e2e_dir), "--max-new-tokens", "4", stdin="Hi\nAnd then?\n/reset\nHi\n/quit\n")
    assert run.returncode == 0, run.stderr
    first = pipe.chat([{"role": "user", "content": "Hi"}], max_new_tokens=4)
    second = pipe.chat([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": first},
                        {"role": "user", "content": "And then?"}], max_new_tokens=4)
    assert run.stdout == f"> {first}\n> {second}\n> > {first}\n> "


def test_bad_model_directory(tmp_path):
    run = _run("chat", "--model", str(tmp_path), "--prompt", "hi")
    assert run.returncode == 2 and "tokenizer.json: not found" in run.stderr


def test_convert_subcommand(official_dir, tmp_path):
    run = _run("convert", str(official_dir), str(tmp_path / "out"))
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "out" / "config.json").is_file()


def test_convert_and_chat_quantized(official_dir, e2e_dir, tmp_path):
    """`convert --quantize int8` records the scheme; `--quantize-lm-head` alone is refused; `chat --quantize`
    runs (and a quantized checkpoint converted twice is refused with the reason)."""
    import json

    run = _run("convert", str(official_dir), str(tmp_path / "q8"), "--quantize", "int8", "--quantize-lm-head")
    assert run.returncode == 0, run.stderr
    assert json.loads((tmp_path / "q8" / "config.json").read_text())["quantization"] == {"scheme": "int8",
                                                                                         "lm_head": True}
    run = _run("convert", str(official_dir), str(tmp_path / "x"), "--quantize-lm-head")
    assert run.returncode == 2 and "--quantize-lm-head needs --quantize" in run.stderr
    run = _run("convert", str(tmp_path / "q8"), str(tmp_path / "y"), "--quantize", "int8")
    assert run.returncode == 2 and "already quantized" in run.stderr
    run = _run("chat", "--model", str(e2e_dir), "--prompt", "Hi", "--max-new-tokens", "4", "--quantize", "int8")
    assert run.returncode == 0, run.stderr


def test_console_script_entry_point_resolves():
    """The `points` command pyproject installs must name a function that exists (it once pointed at a module
    that had moved)."""
    import tomllib
    from importlib import import_module
    from pathlib import Path

    target = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["scripts"]["points"]
    module, func = target.split(":")
    assert callable(getattr(import_module(module), func))
