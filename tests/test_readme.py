"""README's Python examples run as written, on the tiny end-to-end checkpoint: the released model's directory,
the picture, the device, the dtype and the adapter's directory are the only words changed (and replies are
capped at a few tokens, since random weights rarely stop)."""

import re
from pathlib import Path

import matplotlib
import pytest
import torch

import points
from points.runtime import generation
from points.runtime.lora import LoraConfig, add_lora, base_identity, save_adapter

ROOT = Path(__file__).resolve().parents[1]
PHOTO = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def _run(code: str, names: dict) -> dict:
    exec(compile(code, "README.md", "exec"), names)
    return names


@pytest.fixture
def short_replies(monkeypatch):
    """Replies of at most 4 tokens unless a call says otherwise (the default is 1024)."""
    make = generation.GenerationConfig.from_kwargs.__func__
    monkeypatch.setattr(generation.GenerationConfig, "from_kwargs",
                        classmethod(lambda cls, **gen: make(cls, **({"max_new_tokens": 4} | gen))))


def test_the_python_example_runs(e2e_dir, short_replies, capsys):
    code = _blocks()[0]
    assert code.startswith("import torch, points") and 'device="cuda", dtype=torch.bfloat16' in code
    code = (code.replace('"POINTS-1-5-Qwen-2-5-7B-Chat"', repr(str(e2e_dir))).replace('"cat.jpg"', repr(str(PHOTO)))
            .replace('device="cuda", dtype=torch.bfloat16', 'device="cpu", dtype=torch.float32').replace('"max_new_tokens": 1024', '"max_new_tokens": 4')
            .replace("max_new_tokens=256", "max_new_tokens=4"))
    names = _run(code, {})
    score = names["score"]
    assert isinstance(score.logprobs, list) and all(isinstance(x, float) for x in score.logprobs)
    assert names["logits"].dtype == torch.float32 and not names["logits"].requires_grad  # under no_grad
    assert names["tokens"].shape[0] * 4 == names["features"].shape[0]


def test_the_fine_tuning_example_runs(e2e_dir, tmp_path, monkeypatch):
    """`points.load(DIR, adapter=...)`, then train() and backward(): the adapters get gradients, the base none."""
    base = points.load(e2e_dir)
    add_lora(base.model, LoraConfig(rank=2), seed=0)
    save_adapter(base.model, tmp_path / "runs" / "a", base=base_identity(base.model, (e2e_dir / "config.json").read_bytes()))
    monkeypatch.chdir(tmp_path)
    code = next(b for b in _blocks() if "adapter=" in b)
    messages = [{"role": "user", "content": [{"type": "image", "image": str(PHOTO)}, {"type": "text", "text": "Who?"}]}]
    names = _run(code.replace("DIR", repr(str(e2e_dir))), {"points": points, "torch": torch, "messages": messages})
    model = names["pipe"].model
    assert torch.isfinite(names["loss"]) and model.training
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained == {n for n, p in model.named_parameters() if ".lora_" in n}


def test_a_loaded_model_trains_as_it_is(e2e_dir):
    """Without an adapter every float parameter takes a gradient (PyTorch's default for an nn.Module)."""
    pipe = points.load(e2e_dir)
    enc = pipe.encode([{"role": "user", "content": [{"type": "image", "image": str(PHOTO)},
                                                    {"type": "text", "text": "Who?"}]}])
    pipe.model.train()
    pipe.model(enc.input_ids, enc.pixel_values, enc.grid_thw).logsumexp(-1).mean().backward()
    assert all(p.grad is not None for p in pipe.model.parameters())
