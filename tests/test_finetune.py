"""Fine-tuning: the targets of a conversation, packing without attention across examples, `points finetune`
end to end (LoRA and --full), its resume after kill -9 and its 2-process run, equal to one process."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import points
from points.runtime.training import encode_example, pack, row_loss

ROOT = Path(__file__).resolve().parents[1]
CONVS = [
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Two plus two?"},
     {"role": "assistant", "content": "Four."}, {"role": "user", "content": "And three?"},
     {"role": "assistant", "content": "Five."}],
    [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello <|im_end|> there."}],
]


def _write_data(path: Path, n: int = 12) -> Path:
    lines = [json.dumps({"id": f"c{i}", "messages": CONVS[i % len(CONVS)]}) for i in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_targets_are_the_assistant_turns_and_their_end(pipe):
    ex = encode_example(CONVS[1], pipe.tokenizer, pipe.processor, 4096)
    ids = ex.ids.tolist()
    targets = [i for i, t in zip(ids, ex.targets.tolist()) if t]
    assert pipe.tokenizer.decode(targets, skip_special=False) == "Four.<|im_end|>Five.<|im_end|>"
    ex = encode_example(CONVS[2], pipe.tokenizer, pipe.processor, 4096)
    text = pipe.tokenizer.decode([i for i, t in zip(ex.ids.tolist(), ex.targets.tolist()) if t], skip_special=False)
    assert text == "Hello <|im_end|> there.<|im_end|>"  # typed text is text: one real end, the last
    assert ex.ids.tolist().count(pipe.tokenizer.encode("<|im_end|>", special=True)[0]) == 2
    with pytest.raises(ValueError, match="no assistant turn"):
        encode_example([{"role": "user", "content": "hi"}], pipe.tokenizer, pipe.processor, 4096)
    with pytest.raises(ValueError, match="over the 8 a row holds"):
        encode_example(CONVS[0], pipe.tokenizer, pipe.processor, 8, id="c0")


def test_packed_row_equals_its_examples_alone(pipe, e2e_dir):
    """Three conversations (one with an image) in one row: the summed loss and every gradient equal the sum
    of the three run alone (nothing attends across them; positions restart)."""
    from test_end_to_end import conversations

    convs = conversations()
    model = points.load(e2e_dir).model.train()
    model.requires_grad_(True)
    image_conv = convs["single_image"][0] + [{"role": "assistant", "content": "A person."}]
    examples = [encode_example(c, pipe.tokenizer, pipe.processor, 4096, f"e{i}")
                for i, c in enumerate([CONVS[0], image_conv, CONVS[1]])]
    (row,) = pack(examples, 4096)
    assert row.bounds == (0, *torch.tensor([len(e.ids) for e in examples]).cumsum(0).tolist())
    loss, n = row_loss(model, row)
    loss.backward()
    packed = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    alone, count = 0.0, 0
    for ex in examples:
        (r,) = pack([ex], 4096)
        l_, k = row_loss(model, r)
        l_.backward()
        alone, count = alone + l_.detach(), count + k
    assert n == count
    torch.testing.assert_close(loss.detach(), alone, rtol=1e-5, atol=1e-5)
    for k, p in model.named_parameters():
        err, scale = (packed[k] - p.grad).abs().max().item(), p.grad.abs().max().item()
        assert scale > 0 and err <= 1e-5 * scale, f"{k}: max |error| {err:.3g} against max |grad| {scale:.3g}"


def _finetune(*args, env=None, **kw):
    return subprocess.run([sys.executable, "-m", "points", "finetune", *map(str, args)], capture_output=True,
                          text=True, env=env, **kw)


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_bad_data_is_named_before_training(e2e_dir, tmp_path, capsys):
    from points.tooling import finetune

    data = _write_data(tmp_path / "train.jsonl", 3)
    with open(data, "a") as f:
        f.write(json.dumps({"id": "bad", "messages": [{"role": "user", "content": "no reply"}]}) + "\n")
    assert finetune.main(["--model", str(e2e_dir), "--data", str(data), "--output", str(tmp_path / "run")]) == 2
    assert f"{data}, line 4 (id 'bad'): messages: no assistant turn" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    with pytest.raises(SystemExit) as e:
        finetune.main(["--model", str(e2e_dir), "--data", str(data), "--output", str(tmp_path / "r"), "--freeze", "vision"])
    assert e.value.code == 2 and "--freeze goes with --full" in capsys.readouterr().err


def test_resume_after_kill_equals_an_uninterrupted_run(e2e_dir, tmp_path):
    data = _write_data(tmp_path / "train.jsonl", 16)
    common = ["--model", e2e_dir, "--data", data, "--lora-rank", 4, "--epochs", 2, "--batch-tokens", 64,
              "--lr", 6e-3, "--save-every", 3, "--lora-dropout", 0.1]
    whole = _finetune(*common, "--output", tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr
    want = _log(tmp_path / "whole")
    # the uninterrupted run: a line per step, the loss going down, the adapter at the end and no checkpoint left
    assert [r["step"] for r in want] == list(range(1, len(want) + 1)) and len(want) >= 6
    assert all(set(r) == {"step", "loss", "tokens", "lr"} for r in want)
    assert want[-1]["loss"] < 0.8 * want[0]["loss"], [r["loss"] for r in want]
    assert (tmp_path / "whole" / "adapter.safetensors").is_file() and not list((tmp_path / "whole").glob("checkpoint-*"))
    tuned, base = points.load(e2e_dir, adapter=tmp_path / "whole"), points.load(e2e_dir)
    rows = pack([encode_example(c, base.tokenizer, base.processor, 4096) for c in CONVS], 4096)
    with torch.no_grad():
        assert row_loss(tuned.model, rows[0])[0] < 0.8 * row_loss(base.model, rows[0])[0]
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "points", "finetune", *map(str, common), "--output", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:  # kill -9 once a checkpoint is there and a step or more past it is logged
        if (out / "latest").is_file() and (out / "log.jsonl").is_file():
            lines = (out / "log.jsonl").read_text().splitlines()
            if len(lines) >= 4:
                break
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    lines = (out / "log.jsonl").read_text().splitlines()
    assert proc.returncode == -signal.SIGKILL and 4 <= len(lines) < len(want), len(lines)
    resumed = _finetune(*common, "--output", out)
    assert resumed.returncode == 0, resumed.stderr
    got = _log(out)
    assert [r["step"] for r in got] == [r["step"] for r in want]
    assert [r["loss"] for r in got] == [r["loss"] for r in want]  # exactly: same steps, same numbers
    a = (out / "adapter.safetensors").read_bytes()
    assert a == (tmp_path / "whole" / "adapter.safetensors").read_bytes()
    again = _finetune(*common, "--output", out)
    assert again.returncode == 0 and "finished already" in again.stderr


def test_two_processes_equal_one(e2e_dir, tmp_path):
    """torchrun, 2 processes on gloo with --grad-accum 1 against one process with --grad-accum 2: the same
    global batch per step, the same losses."""
    data = _write_data(tmp_path / "train.jsonl", 12)
    common = ["--model", e2e_dir, "--data", data, "--lora-rank", 4, "--epochs", 2, "--batch-tokens", 64,
              "--lr", 3e-3]
    one = _finetune(*common, "--grad-accum", 2, "--output", tmp_path / "one")
    assert one.returncode == 0, one.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "points",
                          "finetune", *map(str, common), "--grad-accum", "1", "--output", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = _log(tmp_path / "one"), _log(tmp_path / "two")
    assert [r["step"] for r in a] == [r["step"] for r in b] and [r["tokens"] for r in a] == [r["tokens"] for r in b]
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) <= 1e-6 * abs(x["loss"]), (x, y)


def test_full_finetune_writes_a_loadable_checkpoint(e2e_dir, tmp_path):
    """--full with the vision encoder frozen, on text and an image: the decoder's and the projector's tensors
    change, the encoder's do not; OUT is a checkpoint in the base's layout that points.load reads."""
    from test_end_to_end import _gradient

    data = _write_data(tmp_path / "train.jsonl", 6)
    _gradient(64, 48).save(tmp_path / "g.png")
    with open(data, "a") as f:
        f.write(json.dumps({"id": "img", "messages": [
            {"role": "user", "content": [{"type": "image", "image": "g.png"}, {"type": "text", "text": "Colours?"}]},
            {"role": "assistant", "content": "Red and green."}]}) + "\n")
    out = tmp_path / "full"
    done = _finetune("--model", e2e_dir, "--data", data, "--output", out, "--full", "--freeze", "vision",
                     "--batch-tokens", 96, "--lr", 1e-3, "--gradient-checkpointing")
    assert done.returncode == 0, done.stderr
    from points.io.checkpoint import TensorFiles

    src, new = TensorFiles(e2e_dir), TensorFiles(out)
    assert src.names == new.names
    changed = {n for n in src.names if not torch.equal(src.get(n), new.get(n))}
    assert changed and not any(n.startswith("vision_encoder.") for n in changed)
    assert any(n.startswith("vision_projector.") for n in changed)
    points.load(out).chat(CONVS[0][:1], max_new_tokens=2)
