"""`points run` over JSONL: every reply equal to the item run alone (float32), errors per item, input checked
up front, resume after kill -9 and after Ctrl-C, journals of other settings refused, and two processes under
torchrun (gloo) giving the single-process output."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import matplotlib
import pytest
from PIL import Image

from points.tooling import run

PHOTO = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
NEW = 5


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Nine items: text of several lengths, images by relative and absolute path, a two-turn conversation, an
    unreadable image and a prompt over the context (the last two are per-item errors)."""
    d = tmp_path_factory.mktemp("data")
    (d / "img").mkdir()
    Image.open(PHOTO).resize((90, 60)).save(d / "img" / "small.png")
    (d / "broken.png").write_bytes(b"not a png")

    def user(*content):
        return [{"role": "user", "content": list(content)}]

    def text(t):
        return {"type": "text", "text": t}

    items = [
        ("a", user(text("Hello there."))),
        ("b", user({"type": "image", "image": "img/small.png"}, text("What is this?"))),
        ("c", user(text("Write a long, long answer about " + "rivers and mountains " * 12))),
        ("d", user(text("Bad image:"), {"type": "image", "image": "broken.png"})),
        ("e", [{"role": "user", "content": "One?"}, {"role": "assistant", "content": "Two."},
               {"role": "user", "content": "Three?"}]),
        ("f", user({"type": "image", "image": str(PHOTO)}, text("Describe."))),
        ("g", user(text("x " * 20000))),  # over the context of the e2e model (16384)
        ("h", user(text("Short."))),
        ("i", user(text("A question of medium length about the weather today?"))),
    ]
    path = d / "in.jsonl"
    path.write_text("".join(json.dumps({"id": i, "messages": m}) + "\n" for i, m in items))
    return path, items


def _absolute(messages, folder):
    return run._absolute_images(json.loads(json.dumps(messages)), folder)


def _expected(pipe, dataset):
    path, items = dataset
    out = []
    for i, messages in items:
        try:
            out.append({"id": i, "reply": pipe.chat(_absolute(messages, path.parent), max_new_tokens=NEW)})
        except ValueError as e:
            out.append({"id": i, "error": str(e)})
    return out


@pytest.fixture(scope="module")
def expected(pipe, dataset):
    return _expected(pipe, dataset)


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _args(e2e_dir, dataset, out, *extra):
    return ["--model", str(e2e_dir), "--input", str(dataset[0]), "--output", str(out), "--max-new-tokens", str(NEW),
            "--batch-size", "3", *extra]


def _same(got, expected):
    """Replies equal; errors where the item alone raised (their wording names the item differently)."""
    assert [r["id"] for r in got] == [r["id"] for r in expected]
    for g, e in zip(got, expected):
        assert set(g) == set(e), (g, e)
        if "reply" in e:
            assert g["reply"] == e["reply"], g["id"]


def test_run_equals_each_item_alone(e2e_dir, dataset, expected, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    assert run.main(_args(e2e_dir, dataset, out)) == 0
    got = _read(out)
    _same(got, expected)
    errors = {r["id"]: r["error"] for r in got if "error" in r}
    assert set(errors) == {"d", "g"}
    assert errors["d"].startswith("item 'd': ") and "broken.png" in errors["d"]
    assert errors["g"].startswith("item 'g': ") and "exceeds the context of 16384 tokens" in errors["g"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]  # journals gone, no temporary file
    assert "9 items" in capsys.readouterr().err
    # the same command again: a finished OUT is not trusted as a journal (it records no settings): all runs
    # again, to the same bytes
    before = out.read_bytes()
    out.write_text('{"id": "a", "reply": "stale"}\n')
    assert run.main(_args(e2e_dir, dataset, out)) == 0
    assert out.read_bytes() == before
    assert "(0 from an earlier run" in capsys.readouterr().err


@pytest.mark.parametrize("line, message", [
    ("{not json", r"line 2: not JSON"),
    ('["a"]', r"line 2: expected an object"),
    ('{"messages": [{"role": "user", "content": "x"}]}', r'line 2: "id" must be a non-empty string'),
    ('{"id": "z", "messages": []}', r'line 2: "messages" must be a non-empty list'),
    ('{"id": "a", "messages": [{"role": "user", "content": "x"}]}', r"line 2: id 'a' already used on line 1"),
])
def test_bad_input_lines_are_named_before_any_work(tmp_path, line, message, capsys):
    path = tmp_path / "in.jsonl"
    path.write_text('{"id": "a", "messages": [{"role": "user", "content": "x"}]}\n' + line + "\n")
    out = tmp_path / "out.jsonl"
    assert run.main(["--model", str(tmp_path / "no-model"), "--input", str(path), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}, ") and message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_journal_with_a_cut_last_line_resumes_to_the_same_output(e2e_dir, dataset, expected, tmp_path):
    """A kill in the middle of a write leaves a cut last line: it is ignored and that item runs again."""
    out = tmp_path / "out.jsonl"
    args = run.parser().parse_args(_args(e2e_dir, dataset, out))
    run.check_meta(out, run.run_key(args, run.read_items(dataset[0])), 0)
    done = [r for r in expected if r["id"] in ("c", "h")]
    (tmp_path / "out.jsonl.journal.0").write_text("".join(json.dumps(r) + "\n" for r in done)
                                                  + '{"id": "a", "reply": "cut sh')
    assert run.main(_args(e2e_dir, dataset, out)) == 0
    _same(_read(out), expected)


def test_journal_of_other_settings_is_refused(e2e_dir, dataset, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    args = run.parser().parse_args(_args(e2e_dir, dataset, out))
    run.check_meta(out, run.run_key(args, run.read_items(dataset[0])), 0)
    (tmp_path / "out.jsonl.journal.0").write_text('{"id": "a", "reply": "x"}\n')
    assert run.main(_args(e2e_dir, dataset, out, "--max-new-tokens", "7")) == 2
    err = capsys.readouterr().err
    assert "written by a run with other gen" in err and "delete those files to start over" in err
    assert not out.exists() and (tmp_path / "out.jsonl.journal.0").read_text() == '{"id": "a", "reply": "x"}\n'


def test_ctrl_c_keeps_finished_batches(e2e_dir, dataset, expected, tmp_path, capsys, monkeypatch):
    """KeyboardInterrupt during the third batch: a one-line message, exit 130, the two per-item errors and
    the first two batches (3 items each) journaled; the same command then ends with the uninterrupted output."""
    from points.runtime import generation

    out = tmp_path / "out.jsonl"
    original, calls = generation.replies, []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(*a, **k)

    monkeypatch.setattr(generation, "replies", interrupted)
    assert run.main(_args(e2e_dir, dataset, out)) == 130
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "points run: interrupted" in err and "Traceback" not in err
    assert len(run.read_records(tmp_path / "out.jsonl.journal.0")) == 2 + 3 + 3
    monkeypatch.setattr(generation, "replies", original)
    assert run.main(_args(e2e_dir, dataset, out)) == 0
    _same(_read(out), expected)
    assert "(8 from an earlier run" in capsys.readouterr().err


def test_kill_9_then_resume(e2e_dir, pipe, tmp_path):
    """A real SIGKILL once a few batches are journaled (40 items, batch size 1), then the same command."""
    messages = [[{"role": "user", "content": f"Question number {i}: " + "why? " * (i % 7)}] for i in range(40)]
    path = tmp_path / "many.jsonl"
    path.write_text("".join(json.dumps({"id": f"q{i}", "messages": m}) + "\n" for i, m in enumerate(messages)))
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "points", "run", "--model", str(e2e_dir), "--input", str(path), "--output", str(out),
           "--max-new-tokens", str(NEW), "--batch-size", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    journal = tmp_path / "out.jsonl.journal.0"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if journal.exists() and len(run.read_records(journal)) >= 3:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists() and 3 <= len(run.read_records(journal)) < 40
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert _read(out) == [{"id": f"q{i}", "reply": pipe.chat(m, max_new_tokens=NEW)} for i, m in enumerate(messages)]
    assert not journal.exists()


def test_torchrun_two_processes_equal_one(e2e_dir, dataset, expected, tmp_path):
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "points", "run", *_args(e2e_dir, dataset, out, "--batch-size", "2")]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    _same(_read(out), expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]


def test_progress_line(e2e_dir, dataset, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    assert run.main(_args(e2e_dir, dataset, out, "--progress", "on")) == 0
    err = capsys.readouterr().err
    assert "9/9 items" in err and "items/s" in err and "tok/s" in err and "ETA" in err
    out.unlink()
    assert run.main(_args(e2e_dir, dataset, out)) == 0  # auto: stderr is not a terminal here
    assert "items/s" not in capsys.readouterr().err
