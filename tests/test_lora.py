"""LoRA as a transform (points.runtime.lora): the update's math per part of a fused projection, a fresh adapter
changing nothing, merge equal to the unmerged adapter, adapters saved, loaded onto a checked base
(`points.load(adapter=)`), and `points merge` writing the base's own layout."""

import json
import shutil

import pytest
import torch
from torch import nn

import points
from points.errors import CheckpointError
from points.io.tensors import TensorFiles
from points.runtime.lora import (LoraConfig, LoraLinear, add_lora, adapter_state, base_identity, load_adapter,
                                 lora_layers, merge_lora, save_adapter)

PROMPT = [{"role": "user", "content": "Name three colours."}]


def _randomize(model, seed=0):
    """Non-zero B everywhere (a fresh adapter's B is zero), drawn from a seed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_b.copy_(torch.randn(layer.lora_b.shape, generator=g) * 0.05)


def test_update_per_part_against_float64():
    """Parts q and v of a fused [q; k; v] (k without an adapter): each its own A_p and B_p, exactly
    base(x) + scale * B_p A_p x on its rows and base(x) on k's."""
    torch.manual_seed(0)
    base = nn.Linear(16, 6 + 2 + 2, bias=True)
    layer = LoraLinear(base, [(0, 6), (8, 10)], rank=3, alpha=6.0)
    with torch.no_grad():
        layer.lora_b.normal_()
    x = torch.randn(4, 16)
    got = layer(x).double()
    xd, w, b = x.double(), base.weight.double(), base.bias.double()
    a, bb = layer.lora_a.double(), layer.lora_b.double()
    want = xd @ w.T + b
    want[:, 0:6] += 2.0 * (xd @ a[0:3].T) @ bb[0:6].T
    want[:, 8:10] += 2.0 * (xd @ a[3:6].T) @ bb[6:8].T
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer.merged_weight().double(),
                               torch.cat([w[0:6] + 2.0 * bb[0:6] @ a[0:3], w[6:8], w[8:10] + 2.0 * bb[6:8] @ a[3:6]]),
                               rtol=1e-6, atol=1e-6)


def test_targets_choose_the_parts(e2e_dir):
    pipe = points.load(e2e_dir)
    cfg = pipe.model.decoder.cfg
    q, kv, f = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.ffn_size
    names = add_lora(pipe.model, LoraConfig(rank=2, targets=("q", "v", "gate")))
    layers = lora_layers(pipe.model)
    assert names == [f"decoder.layers.{i}.{m}" for i in range(cfg.n_layers) for m in ("attn.qkv", "mlp.up_gate")]
    assert layers["decoder.layers.0.attn.qkv"].parts == [(0, q), (q + kv, q + 2 * kv)]
    assert layers["decoder.layers.0.mlp.up_gate"].parts == [(f, 2 * f)]
    trainable = {n for n, p in pipe.model.named_parameters() if p.requires_grad}
    assert trainable == set(adapter_state(pipe.model)) and len(trainable) == 2 * len(names)
    with pytest.raises(ValueError, match="targets"):
        LoraConfig(targets=("q", "attention"))
    vision = add_lora(points.load(e2e_dir).model, LoraConfig(targets=("vision", "projector")))
    assert all(n.startswith(("vision.blocks.", "projector.fc")) for n in vision) and "vision.patch_embed" not in vision


def test_fresh_adapter_changes_nothing_and_merge_equals_adapter(e2e_dir):
    pipe = points.load(e2e_dir)
    enc = pipe.encode(PROMPT)
    with torch.no_grad():
        before = pipe.model(enc.input_ids)
        add_lora(pipe.model, LoraConfig(rank=4, targets=("q", "k", "v", "out", "up", "gate", "down", "projector")),
                 seed=0)
        assert torch.equal(pipe.model(enc.input_ids), before)
        _randomize(pipe.model)
        adapted = pipe.model(enc.input_ids)
        assert (adapted - before).abs().max() > 1e-3
        assert merge_lora(pipe.model) == 2 * 4 + 2
        assert not lora_layers(pipe.model) and all(type(m) is not LoraLinear for m in pipe.model.modules())
        torch.testing.assert_close(pipe.model(enc.input_ids), adapted, rtol=1e-5, atol=1e-5)


def test_saved_adapter_loads_onto_its_base_only(e2e_dir, tmp_path):
    pipe = points.load(e2e_dir)
    add_lora(pipe.model, LoraConfig(rank=4), seed=1)
    _randomize(pipe.model, 2)
    enc = pipe.encode(PROMPT)
    with torch.no_grad():
        want = pipe.model(enc.input_ids)
    out = save_adapter(pipe.model, tmp_path / "adapter",
                       base=base_identity(pipe.model, (e2e_dir / "config.json").read_bytes()))
    meta = json.loads((out / "adapter.json").read_text())
    assert meta["format"] == "points-lora" and meta["lora"]["rank"] == 4 and len(meta["base"]["tensors_sha256"]) == 64
    loaded = points.load(e2e_dir, adapter=out)
    trainable = {n for n, p in loaded.model.named_parameters() if p.requires_grad}  # peft's rule: the adapters
    assert trainable and all(".lora_" in n for n in trainable)
    with torch.no_grad():
        assert torch.equal(loaded.model(enc.input_ids), want)
    assert loaded.chat(PROMPT, max_new_tokens=4) == pipe.chat(PROMPT, max_new_tokens=4)
    # the same weights in bfloat16: one fingerprint
    points.load(e2e_dir, dtype=torch.bfloat16, adapter=out)
    other = tmp_path / "other"
    shutil.copytree(e2e_dir, other)
    (other / "config.json").write_text(json.dumps(json.loads((e2e_dir / "config.json").read_text()), indent=4))
    with pytest.raises(CheckpointError, match=r"adapter.json: the adapter was trained on another base model \(its "
                                              r"config.json differ"):
        points.load(other, adapter=out)
    changed = points.load(e2e_dir).model
    w = changed.decoder.layers[0].attn.qkv.weight
    w.data = w.data.clone()
    w.data[0, 0] += 1.0
    with pytest.raises(CheckpointError, match=r"its weights differ"):
        load_adapter(changed, out, (e2e_dir / "config.json").read_bytes())
    assert not lora_layers(changed)
    (out / "adapter.safetensors").write_bytes(b"not tensors")
    with pytest.raises(CheckpointError, match=r"adapter.safetensors: not a readable safetensors file"):
        points.load(e2e_dir, adapter=out)
    with pytest.raises(CheckpointError, match=r"no adapter config here"):
        points.load(e2e_dir, adapter=tmp_path)


def test_points_merge_writes_the_base_layout(e2e_dir, tmp_path, capsys):
    """Released layout in, released layout out: the adapted tensors changed (under their released names, in
    their stored dtype), every other tensor bit for bit; the merged checkpoint equals the adapter's logits."""
    pipe = points.load(e2e_dir)
    add_lora(pipe.model, LoraConfig(rank=4, targets=("q", "k", "v", "out", "up", "gate", "down")), seed=3)
    _randomize(pipe.model, 4)
    enc = pipe.encode(PROMPT)
    with torch.no_grad():
        want = pipe.model(enc.input_ids)
    adapter = save_adapter(pipe.model, tmp_path / "adapter",
                           base=base_identity(pipe.model, (e2e_dir / "config.json").read_bytes()))
    from points.tooling import cli, merge

    assert cli.main(["merge", str(e2e_dir), str(adapter), str(tmp_path / "m")]) == 0, capsys.readouterr().err
    src, out = TensorFiles(e2e_dir), TensorFiles(tmp_path / "m")
    assert src.names == out.names
    changed = {n for n in src.names if not torch.equal(src.get(n), out.get(n))}
    assert all(src.dtype_name(n) == out.dtype_name(n) for n in src.names)
    assert changed and all(".layers." in n and not n.endswith(("layernorm.weight", ".bias")) for n in changed)
    assert (tmp_path / "m" / "config.json").read_bytes() == (e2e_dir / "config.json").read_bytes()
    merged = points.load(tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(merged.model(enc.input_ids), want, rtol=1e-5, atol=1e-5)
    assert merge.main([str(e2e_dir), str(adapter), str(tmp_path / "m")]) == 2
    assert "already exists" in capsys.readouterr().err


def test_lora_equals_peft_loss_gradients_and_steps():
    """Our LoRA (rank 4 on all seven projections, B non-zero) against transformers + peft's on the same
    decoder weights and the same adapters, float32, three examples of different lengths unpacked (theirs one
    right-padded batch): the loss, every adapter gradient (per part), and five AdamW steps' losses."""
    from points.runtime.training import Example, pack, row_loss
    from points.tooling.reference import padded_batch, peft_lora, transformers_decoder
    from points.tooling.synthetic import SHAPES, random_decoder

    torch.manual_seed(0)
    widths, vision = SHAPES["tiny"]  # its widths with a 1000-token vocabulary (lm_head has no adapter)
    decoder = random_decoder((dict(widths, vocab_size=1000), vision), dtype=torch.float32).train()
    llm = transformers_decoder(decoder).train()  # on the plain projections' tensors, before the swap
    add_lora(decoder, LoraConfig(rank=4, alpha=8.0, targets=("q", "k", "v", "out", "up", "gate", "down")), seed=0)
    _randomize(decoder, seed=3)
    theirs, pairs = peft_lora(llm, decoder, 4, 8.0)
    g = torch.Generator().manual_seed(5)
    batch = []
    for i, n in enumerate((23, 40, 31)):
        targets = torch.zeros(n, dtype=torch.bool)
        targets[n // 3:] = True
        batch.append(Example(f"e{i}", torch.randint(0, decoder.cfg.vocab_size, (n,), generator=g), targets, None, None))
    rows = [pack([e], 4096)[0] for e in batch]
    ids, mask, labels = padded_batch(batch)

    def ours():
        return sum(row_loss(decoder, r)[0] for r in rows) / sum(r.n_targets for r in rows)

    def peft():
        return theirs(input_ids=ids, attention_mask=mask, labels=labels).loss

    a, b = ours(), peft()
    torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
    a.backward()
    b.backward()
    assert len(pairs) == 2 * 7 * decoder.cfg.n_layers
    for mine, part, other in pairs:
        got, want = mine.grad[part], other.grad
        assert (got - want).abs().max() <= 1e-5 * want.abs().max(), (got - want).abs().max()
    ours_params = [p for p in decoder.parameters() if p.requires_grad]
    peft_params = [p for p in theirs.parameters() if p.requires_grad]
    assert sum(p.numel() for p in ours_params) == sum(p.numel() for p in peft_params)
    losses = []
    for params, loss_fn in ((ours_params, ours), (peft_params, peft)):
        for p in params:
            p.grad = None
        opt, got = torch.optim.AdamW(params, lr=1e-2), []
        for _ in range(5):
            loss = loss_fn()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            got.append(loss.item())
        losses.append(got)
    assert losses[0][-1] < losses[0][0]
    for x, y in zip(*losses):
        assert abs(x - y) <= 1e-5 * abs(y), losses
