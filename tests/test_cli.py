"""The command line: one-shot chat streams the same reply as the Python API; convert delegates.

Commands run in this process (`points.tooling.cli.main`, stdin/stdout/stderr swapped); the tests of signals
(SIGTERM, Ctrl-C) run the real `python -m points` as a child process.
"""

import io
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import matplotlib

from points.tooling import cli

PHOTO = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"


@dataclass
class Done:
    returncode: int
    stdout: str
    stderr: str


def _run(*args, stdin=None) -> Done:
    """`points ARGS` in this process, with `stdin` as its input."""
    out, err, old_stdin = io.StringIO(), io.StringIO(), sys.stdin
    sys.stdin = io.StringIO(stdin or "")
    try:
        with redirect_stdout(out), redirect_stderr(err):
            try:
                code = cli.main(list(args))
            except SystemExit as e:  # argparse: --help (0) and usage errors (2)
                code = e.code if isinstance(e.code, int) else 0
    finally:
        sys.stdin = old_stdin
    return Done(code, out.getvalue(), err.getvalue())


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
    assert run.returncode == 2 and "config.json: not found" in run.stderr


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
    run = _run("convert", str(official_dir), str(tmp_path / "q4"), "--quantize", "int4", "--group-size", "64",
               "--symmetric")
    assert run.returncode == 0, run.stderr
    assert json.loads((tmp_path / "q4" / "config.json").read_text())["quantization"] == {
        "scheme": "int4", "lm_head": False, "group_size": 64, "symmetric": True}
    for flags, error in ((["--quantize", "int8", "--group-size", "64"], "--group-size needs --quantize int4"),
                         (["--symmetric"], "--symmetric needs --quantize int4"),
                         (["--quantize", "int4", "--group-size", "48"], "argument --group-size: invalid choice: 48")):
        run = _run("convert", str(official_dir), str(tmp_path / "z"), *flags)
        assert run.returncode == 2 and error in run.stderr, run.stderr
    run = _run("chat", "--model", str(e2e_dir), "--prompt", "Hi", "--max-new-tokens", "4", "--quantize", "int4")
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


def test_help_shows_the_defaults():
    help_text = " ".join(_run("chat", "--help").stdout.split())
    for default in ("default: 1024", "(default: 0.0)", "default: 1.0 = off", "default: cpu", "default: the checkpoint's"):
        assert default in help_text, default


def test_convert_sigterm_leaves_nothing_and_stale_partials_go(official_dir, tmp_path):
    """SIGTERM in the middle of `points convert` (held after its first shard): exit 143, one line, no hidden
    partial folder. Partial folders of dead processes beside DST (for any destination) are removed by the
    next convert; a live process's are left alone."""
    import os
    import signal
    import time

    dst = tmp_path / "out"
    code = ("import sys, time; import points.io.atomic as c; save = c.save_tensors\n"
            "def slow(*a, **k):\n    save(*a, **k); time.sleep(60)\n"
            "c.save_tensors = slow\nfrom points.tooling.cli import main\nsys.exit(main(sys.argv[1:]))")
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
    for name in ("out", "another-destination"):  # left by a dead convert into any folder beside DST
        (tmp_path / f".{name}.partial-{int(dead.stdout)}" / "sub").mkdir(parents=True)
    alive = tmp_path / f".busy.partial-{os.getpid()}"  # a live process's: left alone
    alive.mkdir()
    run = _run("convert", str(official_dir), str(dst))
    assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [alive.name, "out"]


def test_ctrl_c_is_one_line(monkeypatch):
    """KeyboardInterrupt anywhere in a command: a one-line message and exit 130, no traceback."""
    from points.tooling import convert

    def boom(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(convert, "main", boom)
    run = _run("convert", "a", "b")
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


class _Output:
    """A running process's stdout, read as it comes."""

    def __init__(self, proc):
        self.proc, self.data = proc, b""

    def until(self, predicate, timeout=60.0) -> str:
        import os
        import select
        import time

        deadline = time.time() + timeout
        while not predicate(self.data.decode(errors="replace")):
            assert time.time() < deadline and self.proc.poll() is None, self.data
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.05)
            if ready:
                self.data += os.read(self.proc.stdout.fileno(), 4096)
        return self.data.decode(errors="replace")


def test_ctrl_c_stops_the_reply_and_returns_to_the_prompt(e2e_dir, pipe):
    """Interactive chat: Ctrl-C while a reply streams stops that reply, which stays in the conversation; the
    next turn continues from it (its reply equals the API's for that history); Ctrl-C at the prompt then
    leaves, exit 0. /reset says what it did."""
    import signal

    new = 200
    proc = subprocess.Popen([sys.executable, "-m", "points", "chat", "--model", str(e2e_dir), "--max-new-tokens",
                             str(new)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = _Output(proc)
    proc.stdin.write(b"Hi\n")
    proc.stdin.flush()
    out.until(lambda t: len(t) > 40)  # "> " and the first pieces of the reply
    proc.send_signal(signal.SIGINT)
    partial = out.until(lambda t: t.endswith("\n> "))[2:-3]
    proc.stdin.write(b"Again\n/reset\n")
    proc.stdin.flush()
    text = out.until(lambda t: t.endswith("\n> > "), timeout=120)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": partial},
               {"role": "user", "content": "Again"}]
    full = pipe.chat(history[:1], max_new_tokens=new)
    assert partial and full.startswith(partial) and len(partial) < len(full)
    assert text == f"> {partial}\n> {pipe.chat(history, max_new_tokens=new)}\n> > "
    err = err.decode()
    assert "(reply stopped; it stays in the conversation." in err
    assert "(conversation forgotten, cached prefix cleared)" in err
    assert "Traceback" not in err


def test_a_bad_image_is_named_with_its_flag_before_anything_loads(e2e_dir, tmp_path):
    """--image that cannot be read: one line naming the flag and the path, exit 2, before the first prompt
    (interactive) or the reply (one-shot); a --seed out of range, named the same way; /image names its
    command."""
    missing = tmp_path / "missing.jpg"
    for extra in ([], ["--prompt", "Describe."]):
        run = _run("chat", "--model", str(e2e_dir), "--image", str(missing), *extra, stdin="Describe.\n")
        assert run.returncode == 2 and run.stdout == ""
        assert run.stderr == f"error: --image {missing}: file not found\n"
    run = _run("chat", "--model", str(e2e_dir), "--image", "https://example.com/cat.jpg", "--prompt", "x")
    assert run.stderr == ("error: --image https://example.com/cat.jpg: URLs are not fetched; download the file "
                          "first and give its path\n")
    run = _run("chat", "--model", str(e2e_dir), "--seed", "-1", "--prompt", "x")
    assert run.returncode == 2 and run.stderr.startswith("error: --seed -1: expected an integer from 0 to 2**64 - 1")
    run = _run("chat", "--model", str(e2e_dir), stdin=f"/image {missing}\n/quit\n")
    assert f"error: /image {missing}: file not found\n" in run.stderr and "messages[" not in run.stderr


def test_compile_says_it_is_compiling(e2e_dir, pipe, capsys, monkeypatch):
    """`points chat --compile` compiles the decode step (here with dynamo's eager backend: inductor itself is
    tested in test_compile.py) and says so once on stderr, before the first compiled step; the reply is the
    eager one."""
    import torch

    from points.tooling import cli

    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real(fn, **(kw | {"backend": "eager", "mode": None})))
    torch._dynamo.reset()
    assert cli.main(["chat", "--model", str(e2e_dir), "--prompt", "Hi", "--max-new-tokens", "3", "--compile"]) == 0
    out, err = capsys.readouterr()
    assert err.count("points: compiling the decode step (torch.compile)") == 1
    assert out == pipe.chat([{"role": "user", "content": "Hi"}], max_new_tokens=3) + "\n"
