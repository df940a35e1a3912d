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


def test_interactive_commands_are_answered_by_the_cli(e2e_dir, pipe, tmp_path):
    """/help, /image without a path, /image of a missing file (checked when given), an unknown /command: the
    CLI answers on stderr and nothing reaches the model; a good /image goes with the next message."""
    stdin = f"/help\n/image\n/image {tmp_path / 'missing.png'}\n/bogus\n/image {PHOTO}\nDescribe.\n/quit\n"
    run = _run("chat", "--model", str(e2e_dir), "--max-new-tokens", "4", stdin=stdin)
    assert run.returncode == 0, run.stderr
    messages = [{"role": "user", "content": [{"type": "image", "image": str(PHOTO)}, {"type": "text", "text": "Describe."}]}]
    assert run.stdout == "> " * 5 + f"> {pipe.chat(messages, max_new_tokens=4)}\n> "
    err = run.stderr
    assert err.count("/image PATH adds an image") == 3  # the banner, /help, and after the unknown command
    assert "usage: /image PATH" in err and "missing.png: file not found" in err and "unknown command /bogus" in err
    assert f"(image {PHOTO} goes with your next message)" in err


def test_version_and_help_defaults():
    from points import __version__

    run = _run("--version")
    assert run.returncode == 0 and run.stdout.strip() == f"points {__version__}"
    help_text = " ".join(_run("chat", "--help").stdout.split())
    for default in ("default: 1024", "(default: 0.0)", "default: 1.0 = off", "default: cpu", "default: the checkpoint's"):
        assert default in help_text, default


def test_convert_sigterm_leaves_nothing_and_stale_partials_go(official_dir, tmp_path):
    """SIGTERM in the middle of `points convert` (held after its first shard): exit 143, one line, no hidden
    partial folder. A partial folder of a dead process is removed by the next convert."""
    import os
    import signal
    import time

    dst = tmp_path / "out"
    code = ("import sys, time; import points.io.checkpoint as c; save = c.save_file\n"
            "def slow(*a, **k):\n    save(*a, **k); time.sleep(60)\n"
            "c.save_file = slow\nfrom points.tooling.cli import main\nsys.exit(main(sys.argv[1:]))")
    proc = subprocess.Popen([sys.executable, "-c", code, "convert", str(official_dir), str(dst), "--max-shard-gb", "0.001"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not any(p.name.startswith(".out.partial-") and any(p.iterdir())
                                             for p in tmp_path.iterdir()):
        time.sleep(0.05)
    assert [p.name for p in tmp_path.iterdir()] == [f".out.partial-{proc.pid}"]
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 143 and err.strip() == "points convert: terminated (SIGTERM); nothing half-written was left"
    assert list(tmp_path.iterdir()) == []
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".out.partial-{int(dead.stdout)}"
    (stale / "sub").mkdir(parents=True)
    run = _run("convert", str(official_dir), str(dst))
    assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_ctrl_c_is_one_line():
    """KeyboardInterrupt anywhere in a command: a one-line message and exit 130, no traceback."""
    code = ("import sys; import points.tooling.convert as c\n"
            "def boom(argv):\n    raise KeyboardInterrupt\n"
            "c.main = boom\nfrom points.tooling.cli import main\nsys.exit(main(['convert', 'a', 'b']))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 130 and run.stderr.strip() == "points convert: interrupted"


def test_interactive_prefix_cache_verbose_and_reset(e2e_dir, pipe):
    """Turn 2 reuses turn 1 (--verbose says how many tokens); /reset clears the cache too; replies equal the
    uncached ones."""
    import re

    run = _run("chat", "--model", str(e2e_dir), "--max-new-tokens", "4", "--verbose",
               stdin="Hi\nAnd then?\n/reset\nHi\n/quit\n")
    assert run.returncode == 0, run.stderr
    reused = [int(n) for n in re.findall(r"(\d+) prompt tokens reused from the prefix cache", run.stderr)]
    first = pipe.chat([{"role": "user", "content": "Hi"}], max_new_tokens=4)
    assert reused[0] == 0 and reused[1] > 0 and reused[2] == 0, run.stderr
    assert len(re.findall(r"\(first piece after \d+\.\d\d s;", run.stderr)) == 3
    assert run.stdout.startswith(f"> {first}\n> ") and run.stdout.endswith(f"> > {first}\n> ")
