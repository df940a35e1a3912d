"""Fine-tuning: the targets of a conversation, packing without attention across examples, `points finetune`
end to end (LoRA and --full), its resume after kill -9 and its 2-process run, equal to one process; a tied
decoder (POINTS-Reader) trained and written as one matrix."""

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

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


@pytest.fixture(scope="module")
def reader_dir(tmp_path_factory, tokenizer_json):
    """A tied POINTS-Reader in its released layout (no llm.lm_head stored: the head is the embedding), float32,
    with the real tokenizer and the e2e model's small images."""
    import shutil

    from conftest import E2E_MAX_PIXELS
    from points.io.processor import ImageProcessor
    from points.tooling.synthetic import write_checkpoint

    d = write_checkpoint(tmp_path_factory.mktemp("reader") / "tied", "reader-tiny", dtype=torch.float32,
                         tokenizer="bytes")
    shutil.copy(tokenizer_json, d / "tokenizer.json")
    (d / "preprocessor_config.json").write_text(json.dumps(ImageProcessor(max_pixels=E2E_MAX_PIXELS).to_json()))
    assert points.load_decoder(d).cfg.tied
    return d


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


# one thread per process, as torchrun sets it, so that one process's products sum in the same order as each of
# two processes' (with two threads they differ in the last bits and AdamW's first steps magnify that)
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


def _finetune_here(*args, threads: int | None = None):
    """`points finetune` run in this process (no interpreter to start: torch and its optimizers are imported
    already), with `threads` intra-op threads if given (what OMP_NUM_THREADS gives a process of its own); its
    exit code and what it wrote to stderr. Torch's thread count and RNG are restored after."""
    from points.tooling import finetune

    err, before, rng = io.StringIO(), torch.get_num_threads(), torch.get_rng_state()
    if threads:
        torch.set_num_threads(threads)
    try:
        with contextlib.redirect_stderr(err):
            code = finetune.main([str(a) for a in args])
    finally:
        torch.set_num_threads(before)
        torch.set_rng_state(rng)
    return SimpleNamespace(returncode=code, stderr=err.getvalue())


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
    # an output that is a file, or the model's own directory: one line each, before anything is read
    (tmp_path / "file").write_text("not a directory\n")
    assert finetune.main(["--model", str(e2e_dir), "--data", str(data), "--output", str(tmp_path / "file")]) == 2
    assert capsys.readouterr().err == (f"error: --output {tmp_path / 'file'}: is a file; expected a directory (it is "
                                       "created if missing)\n")
    assert finetune.main(["--model", str(e2e_dir), "--data", str(data), "--output", str(tmp_path / "file" / "run")]) == 2
    assert capsys.readouterr().err == (f"error: --output {tmp_path / 'file' / 'run'}: {tmp_path / 'file'} is a file, so "
                                       "no directory can be made under it\n")
    assert finetune.main(["--model", str(e2e_dir), "--data", str(data), "--output", str(e2e_dir), "--full"]) == 2
    assert capsys.readouterr().err == (f"error: --output {e2e_dir}: is the input directory (--model {e2e_dir}); "
                                       "writing there would replace its files: choose another output directory\n")


def test_resume_after_kill_equals_an_uninterrupted_run(e2e_dir, tmp_path):
    data = _write_data(tmp_path / "train.jsonl", 16)
    common = ["--model", e2e_dir, "--data", data, "--lora-rank", 4, "--epochs", 2, "--batch-tokens", 64,
              "--lr", 6e-3, "--save-every", 3, "--lora-dropout", 0.1]
    whole = _finetune_here(*common, "--output", tmp_path / "whole", threads=1)
    assert whole.returncode == 0, whole.stderr
    want = _log(tmp_path / "whole")
    # the uninterrupted run: a line per step, the loss going down, the adapter at the end and no checkpoint left
    assert [r["step"] for r in want] == list(range(1, len(want) + 1)) and len(want) >= 6
    assert all(set(r) == {"step", "loss", "tokens", "lr"} for r in want)
    assert want[-1]["loss"] < 0.8 * want[0]["loss"], [r["loss"] for r in want]
    # said on stderr whether or not it is a terminal (here it is a StringIO): what starts, and what ended
    assert (f"points finetune: 16 conversations, {len(want)} steps (LoRA rank 4, 1 process) -> {tmp_path / 'whole'}\n"
            in whole.stderr)
    assert whole.stderr.endswith(f"points finetune: {len(want)} steps done -> {tmp_path / 'whole'} (adapter.safetensors, "
                                 f"last loss {want[-1]['loss']:.4f}; log.jsonl)\n")
    assert (tmp_path / "whole" / "adapter.safetensors").is_file() and not list((tmp_path / "whole").glob("checkpoint-*"))
    tuned, base = points.load(e2e_dir, adapter=tmp_path / "whole"), points.load(e2e_dir)
    rows = pack([encode_example(c, base.tokenizer, base.processor, 4096) for c in CONVS], 4096)
    with torch.no_grad():
        assert row_loss(tuned.model, rows[0])[0] < 0.8 * row_loss(base.model, rows[0])[0]
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "points", "finetune", *map(str, common), "--output", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ONE_THREAD)
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
    resumed = _finetune_here(*common, "--output", out, threads=1)
    assert resumed.returncode == 0, resumed.stderr
    got = _log(out)
    assert [r["step"] for r in got] == [r["step"] for r in want]
    assert [r["loss"] for r in got] == [r["loss"] for r in want]  # exactly: same steps, same numbers
    a = (out / "adapter.safetensors").read_bytes()
    assert a == (tmp_path / "whole" / "adapter.safetensors").read_bytes()
    again = _finetune_here(*common, "--output", out)
    assert again.returncode == 0 and "finished already" in again.stderr


def _with_image(data: Path) -> Path:
    from test_end_to_end import _gradient

    _gradient(64, 48).save(data.parent / "g.png")
    with open(data, "a") as f:
        f.write(json.dumps({"id": "img", "messages": [
            {"role": "user", "content": [{"type": "image", "image": "g.png"}, {"type": "text", "text": "Colours?"}]},
            {"role": "assistant", "content": "Red and green."}]}) + "\n")
    return data


def _torchrun(*args, background: bool = False):
    """`points finetune` in 2 processes under torchrun; background: started in a session of its own (killed as
    a group), its output dropped."""
    env = ONE_THREAD
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "points", "finetune",
           *map(str, args)]
    if background:
        return subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    return subprocess.run(cmd, capture_output=True, text=True, env=env)


def _kill_run(proc) -> None:
    """kill -9 a torchrun started by `_torchrun(background=True)` and its workers (which torchrun starts in
    sessions of their own: killing its process group alone leaves them running to the end)."""
    def tree(pid: int) -> list[int]:
        kids = []
        for entry in Path("/proc").iterdir():
            try:
                if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    kids += tree(int(entry.name))
            except (OSError, ValueError):
                continue  # (gone meanwhile)
        return [pid] + kids

    for pid in tree(proc.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()


def _same_losses(a: list[dict], b: list[dict]) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b] and [r["tokens"] for r in a] == [r["tokens"] for r in b]
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) <= 1e-6 * abs(x["loss"]), (x, y)


def test_two_processes_equal_one(e2e_dir, tmp_path):
    """torchrun, 2 processes on gloo under DDP with --grad-accum 1 against one process with --grad-accum 2: the
    same global batch per step, the same losses and adapters; LoRA on the vision encoder too, with one image
    among text-only rows (a process whose rows have none leaves those adapters unused that step)."""
    data = _with_image(_write_data(tmp_path / "train.jsonl", 12))
    common = ["--model", e2e_dir, "--data", data, "--lora-rank", 4, "--epochs", 2, "--batch-tokens", 96,
              "--lr", 3e-3, "--lora-targets", "q,v,down,vision"]
    one = _finetune_here(*common, "--grad-accum", 2, "--output", tmp_path / "one", threads=1)
    assert one.returncode == 0, one.stderr
    two = _torchrun(*common, "--grad-accum", 1, "--output", tmp_path / "two")
    assert two.returncode == 0, two.stderr[-3000:]
    _same_losses(_log(tmp_path / "one"), _log(tmp_path / "two"))
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "one" / "adapter.safetensors"), load_file(tmp_path / "two" / "adapter.safetensors")
    assert a.keys() == b.keys() and any(".vision." in k or k.startswith("vision.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), (k, (a[k] - b[k]).abs().max().item())  # two gradients summed: exact


def test_full_finetune_sharded_resumes_and_equals_one_process(reader_dir, tmp_path):
    """--full with the projector frozen, on text and an image, with gradient checkpointing, of a tied decoder
    (POINTS-Reader: one matrix for the embedding and the head, so FSDP2 shards the two modules as one group).
    One process with --grad-accum 2: the decoder's and the encoder's tensors change, the projector's do not,
    and OUT is a checkpoint in the base's layout that points.load reads. Two processes under FSDP2 (weights,
    gradients and AdamW's state sharded), killed with -9 after a checkpoint and resumed: the same losses and
    weights. (An untied decoder, POINTS-1.5's, shards its embedding and head apart: that path is not run under
    torchrun here; its layout is written by the same writer in tests/test_lora.py's merge.)"""
    from points.io.tensors import TensorFiles

    data = _with_image(_write_data(tmp_path / "train.jsonl", 10))
    common = ["--model", reader_dir, "--data", data, "--full", "--freeze", "projector", "--batch-tokens", 96,
              "--lr", 1e-3, "--gradient-checkpointing", "--epochs", 2, "--save-every", 2]
    done = _finetune_here(*common, "--grad-accum", 2, "--output", tmp_path / "one", threads=1)
    assert done.returncode == 0, done.stderr
    src, new = TensorFiles(reader_dir), TensorFiles(tmp_path / "one")
    assert src.names == new.names
    changed = {n for n in src.names if not torch.equal(src.get(n), new.get(n))}
    assert not any(n.startswith("vision_projector.") for n in changed)
    assert any(n.startswith("vision_encoder.") for n in changed) and "llm.model.embed_tokens.weight" in changed
    points.load(tmp_path / "one").chat(CONVS[0][:1], max_new_tokens=2)
    want = _log(tmp_path / "one")
    out = tmp_path / "two"
    proc = _torchrun(*common, "--grad-accum", 1, "--output", out, background=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:  # kill -9 once past a checkpoint
        if (out / "latest").is_file() and (out / "log.jsonl").is_file():
            if len((out / "log.jsonl").read_text().splitlines()) >= 3:
                break
        time.sleep(0.002)
    _kill_run(proc)
    assert 3 <= len((out / "log.jsonl").read_text().splitlines()) < len(want)
    resumed = _torchrun(*common, "--grad-accum", 1, "--output", out)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "; resuming after step " in resumed.stderr  # (not a run its killed workers went on to finish)
    _same_losses(want, _log(out))
    two = TensorFiles(out)
    assert two.names == new.names
    for n in new.names:  # exactly: each process's products in one process's order, two gradients summed
        assert torch.equal(two.get(n), new.get(n)), (n, (two.get(n) - new.get(n)).abs().max().item())


def _untied(decoder):
    """The decoder with lm_head given a Parameter of its own holding the same numbers (two weights, as a tied
    checkpoint trained without its tie would have)."""
    decoder.lm_head.weight = torch.nn.Parameter(decoder.embed.weight.detach().clone())
    return decoder


def test_a_tied_decoder_trains_one_weight(reader_dir, tmp_path):
    """`points finetune --full` of a tied decoder takes AdamW's step on one matrix whose gradient is the
    lookup's plus the head's (as transformers trains tied embeddings) and writes it once, as the embedding:
    one step from the CLI gives w - lr g / (|g| + eps), g the tied gradient (the embedding's or the head's
    step alone differ from it by up to 2 lr); it loads back tied, the config as it was."""
    from points.io.tensors import TensorFiles
    from points.tooling import merge

    data = _write_data(tmp_path / "train.jsonl", 1)
    lr = 1e-3
    done = _finetune_here("--model", reader_dir, "--data", data, "--output", tmp_path / "out", "--full",
                          "--lr", lr, "--max-steps", 1, "--freeze", "vision,projector")
    assert done.returncode == 0, done.stderr
    pipe = points.load(reader_dir, prefix_cache=False)
    model, decoder = pipe.model.train(), pipe.model.decoder
    (row,) = pack([encode_example(CONVS[0], pipe.tokenizer, pipe.processor, 2048)], 2048)
    w0 = decoder.embed.weight.detach().clone()

    def adam_step(g):  # AdamW's first step (m / sqrt(v) = g / |g|), weight decay 0
        return w0 - lr * g / (g.abs() + 1e-8)

    decoder.requires_grad_(True)
    assert decoder.lm_head.weight is decoder.embed.weight
    (row_loss(model, row)[0] / row.n_targets).backward()
    want = adam_step(decoder.embed.weight.grad)
    src, out = TensorFiles(reader_dir), TensorFiles(tmp_path / "out")
    assert src.names == out.names and "llm.lm_head.weight" not in out.names
    got = out.get("llm.model.embed_tokens.weight")
    torch.testing.assert_close(got, want, rtol=0, atol=lr * 1e-3)
    _untied(decoder).zero_grad(set_to_none=True)
    (row_loss(model, row)[0] / row.n_targets).backward()
    for alone in (decoder.embed.weight.grad, decoder.lm_head.weight.grad):
        assert (got - adam_step(alone)).abs().max() > lr
    assert (tmp_path / "out" / "config.json").read_bytes() == (reader_dir / "config.json").read_bytes()
    tuned = points.load_decoder(tmp_path / "out")
    assert tuned.cfg.tied and tuned.lm_head.weight is tuned.embed.weight and torch.equal(tuned.embed.weight, got)
    # trained with its two tensors apart (a user's own loop): refused, naming both, where writing it in the
    # released layout would keep one of the two silently
    with torch.no_grad():
        decoder.lm_head.weight += 1
    (tmp_path / "apart").mkdir()
    with pytest.raises(points.CheckpointError, match=r"decoder.embed.weight and decoder.lm_head.weight differ"):
        merge.write_model(model, reader_dir, tmp_path / "apart")
    assert not list((tmp_path / "apart").iterdir())


def test_a_tied_head_gradient_is_the_sum_and_transformers(qwen2_dir, tmp_path):
    """The tied weight's gradient is the lookup's plus the head's, and equals transformers' tied
    Qwen2ForCausalLM's on the same batch (float32)."""
    from safetensors.torch import load_file

    from points.tooling import reference

    config = json.loads((qwen2_dir / "config.json").read_text())
    del config["tie_word_embeddings"]  # (absent: tied, as POINTS-Reader's release)
    tensors = {k: v for k, v in load_file(qwen2_dir / "model.safetensors").items() if k != "llm.lm_head.weight"}
    tied = reference.save_checkpoint(tmp_path / "tied", config, tensors, shards=1)
    tokens = torch.randint(0, 1000, (2, 13), generator=torch.Generator().manual_seed(0))

    def loss(logits):
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten())

    decoder = points.load_decoder(tied).train().requires_grad_(True)
    assert decoder.lm_head.weight is decoder.embed.weight
    loss(decoder(tokens)).backward()
    got = decoder.embed.weight.grad
    apart = _untied(points.load_decoder(tied)).train().requires_grad_(True)
    loss(apart(tokens)).backward()
    torch.testing.assert_close(got, apart.embed.weight.grad + apart.lm_head.weight.grad, rtol=1e-5, atol=1e-7)
    llm = reference.transformers_decoder(points.load_decoder(tied)).train().requires_grad_(True)
    assert llm.lm_head.weight is llm.model.embed_tokens.weight
    loss(llm(tokens).logits).backward()
    want = llm.model.embed_tokens.weight.grad
    err, scale = (got - want).abs().max().item(), want.abs().max().item()
    assert scale > 0 and err <= 1e-5 * scale, (err, scale)


def test_the_help_names_every_lora_target():
    """--lora-targets' help is written out (so that --help needs no torch): it names every target there is."""
    from points.runtime.lora import DECODER_TARGETS, TARGETS
    from points.tooling.finetune import TARGETS_HELP

    names = TARGETS_HELP.split("of ", 1)[1]
    assert all(t in names.replace(",", " ").split() for t in TARGETS) and len(DECODER_TARGETS) == 7


def test_qlora_on_an_int4_checkpoint(e2e_dir, tmp_path, capsys):
    """`points finetune` on a checkpoint converted to int4: LoRA trains on the frozen codes (its loss falls, the
    adapter loads back onto that checkpoint), full fine-tuning is refused with the reason."""
    from points.tooling import finetune

    q4 = points.convert(e2e_dir, tmp_path / "q4", quantize="int4", quantize_group_size=32)
    data = _write_data(tmp_path / "train.jsonl", 8)
    run = _finetune_here("--model", q4, "--data", data, "--lora-rank", 4, "--epochs", 2, "--batch-tokens", 64,
                         "--lr", 6e-3, "--output", tmp_path / "run")
    assert run.returncode == 0, run.stderr
    log = _log(tmp_path / "run")
    assert log[-1]["loss"] < 0.9 * log[0]["loss"], [r["loss"] for r in log]
    tuned = points.load(q4, adapter=tmp_path / "run")
    assert tuned.model.decoder.layers[0].attn.qkv.base.weight.dtype == torch.uint8
    assert finetune.main(["--model", str(q4), "--data", str(data), "--output", str(tmp_path / "full"), "--full"]) == 2
    assert "int4-quantized; full fine-tuning needs the float checkpoint" in capsys.readouterr().err


def test_qlora_from_the_float_checkpoint(e2e_dir, tmp_path, capsys):
    """`points finetune --quantize int4` quantizes the float checkpoint's projections as it reads them and trains
    LoRA on the frozen codes; the adapter loads onto the float checkpoint and onto its int4 copy alike. --full
    with --quantize, and --group-size without it, are refused."""
    from points.tooling import finetune

    data = _write_data(tmp_path / "train.jsonl", 8)
    run = _finetune_here("--model", e2e_dir, "--data", data, "--quantize", "int4", "--group-size", 32,
                         "--lora-rank", 4, "--epochs", 2, "--batch-tokens", 64, "--lr", 6e-3, "--output", tmp_path / "run")
    assert run.returncode == 0, run.stderr
    log = _log(tmp_path / "run")
    assert log[-1]["loss"] < 0.9 * log[0]["loss"], [r["loss"] for r in log]
    meta = json.loads((tmp_path / "run" / "adapter.json").read_text())
    assert meta["base"]["quantization"] == {"scheme": "int4", "lm_head": False, "group_size": 32, "symmetric": False}
    on_float = points.load(e2e_dir, adapter=tmp_path / "run")
    on_int4 = points.load(e2e_dir, quantize="int4", quantize_group_size=32, adapter=tmp_path / "run")
    assert on_float.model.decoder.layers[0].attn.qkv.base.weight.dtype == torch.float32
    assert on_int4.model.decoder.layers[0].attn.qkv.base.weight.dtype == torch.uint8
    for args, said in ((["--quantize", "int4", "--full"], "--quantize goes with LoRA"),
                       (["--group-size", "32"], "--group-size needs --quantize int4")):
        with pytest.raises(SystemExit) as e:
            finetune.main(["--model", str(e2e_dir), "--data", str(data), "--output", str(tmp_path / "x"), *args])
        assert e.value.code == 2 and said in capsys.readouterr().err
