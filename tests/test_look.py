"""A look inside (points/runtime/look.py): hidden states and attention probabilities of one forward, against
transformers' `output_hidden_states` / eager `output_attentions` on the same weights (Qwen2ForCausalLM, the
Qwen2-VL vision tower), fp32; the fast kernels untouched when nothing is recorded."""

from pathlib import Path

import matplotlib
import pytest
import torch

import points.model.attention as attention
from points.tooling import reference

PHOTO = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
TEXT = [{"role": "user", "content": "Tell me about rivers."}]
TWO = [{"role": "user", "content": [{"type": "image", "image": PHOTO}, {"type": "text", "text": "And this?"},
                                    {"type": "image", "image": PHOTO}]}]
REPLY = "A river of stone."


def _theirs(pipe, e2e_reference, messages, reply_ids):
    """transformers' decoder on the same ids (images spliced in by the reference path), eager attention."""
    enc = pipe.encode(messages)
    ids = torch.cat([enc.input_ids, torch.tensor([reply_ids])], dim=1)
    embeds = reference.splice_reference(*e2e_reference, ids, enc.pixel_values, enc.grid_thw)
    with torch.no_grad():
        return e2e_reference[0](inputs_embeds=embeds, output_hidden_states=True, output_attentions=True), ids


@pytest.mark.parametrize("messages", [TEXT, TWO], ids=["text", "two-images"])
def test_decoder_hidden_states_and_attentions_equal_transformers(pipe, e2e_reference, messages):
    reply = pipe.tokenizer.encode(REPLY)
    seen = pipe.look(messages, reply)
    theirs, ids = _theirs(pipe, e2e_reference, messages, reply)
    n = pipe.model.decoder.cfg.n_layers
    assert seen.tokens == ids[0].tolist() and seen.reply_start == ids.shape[1] - len(reply)
    assert len(seen.hidden) == n + 1 and len(theirs.hidden_states) == n + 1
    for i in range(n):  # theirs: the input, then after layers 0 .. n-2, then the final norm's output
        torch.testing.assert_close(seen.hidden[i], theirs.hidden_states[i][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(seen.normed, theirs.hidden_states[n][0], rtol=1e-5, atol=1e-5)
    assert sorted(seen.attentions) == list(range(n))
    for layer in range(n):
        probs = seen.attentions[layer]
        assert probs.dtype == torch.float32 and probs.shape == theirs.attentions[layer][0].shape
        torch.testing.assert_close(probs, theirs.attentions[layer][0], rtol=0, atol=2e-6)
    assert torch.allclose(probs.sum(-1), torch.ones(()), atol=1e-5) and probs[0].triu(1).abs().max() == 0
    print(f"\nlook, decoder fp32, {len(seen.tokens)} tokens: max |hidden error| "
          f"{max((seen.hidden[i] - theirs.hidden_states[i][0]).abs().max().item() for i in range(n)):.2g}, "
          f"max |probability error| {max((seen.attentions[i] - theirs.attentions[i][0]).abs().max().item() for i in range(n)):.2g}")


def test_image_spans_and_chosen_heads(pipe):
    full, some = pipe.look(TWO, layers=[-1]), pipe.look(TWO, layers=[-1], heads=[1, 3], hidden=False)
    n = pipe.model.decoder.cfg.n_layers
    assert list(full.attentions) == [n - 1] and list(some.attentions) == [n - 1] and some.hidden == []
    assert sorted(pipe.look(TEXT, layers=[0, -1, n - 1]).attentions) == [0, n - 1]
    torch.testing.assert_close(some.attentions[n - 1], full.attentions[n - 1][[1, 3]], rtol=0, atol=0)
    pad = pipe.model.image_token_id
    assert len(full.images) == 2
    for image in full.images:
        t, h, w = image["grid"]
        assert image["end"] - image["start"] == t * h * w // 4
        assert set(full.tokens[image["start"]:image["end"]]) == {pad}
    assert sum(tok == pad for tok in full.tokens) == sum(i["end"] - i["start"] for i in full.images)
    with pytest.raises(ValueError, match="layers: index 99 is out of range"):
        pipe.look(TEXT, layers=[99])
    with pytest.raises(ValueError, match="heads: expected a list of indices"):
        pipe.look(TEXT, heads="two")


def test_vision_hidden_states_and_attentions_equal_transformers(pipe, e2e_reference, monkeypatch):
    """The vision tower's blocks with eager attention, their probabilities taken where transformers' own eager
    function returns them (one call per frame)."""
    from transformers.models.qwen2_vl import modeling_qwen2_vl as qwen2_vl

    encoder = e2e_reference[1]
    kept, real = [], qwen2_vl.eager_attention_forward

    def eager(*args, **kw):
        out, weights = real(*args, **kw)
        kept.append(weights[0])
        return out, weights

    monkeypatch.setattr(qwen2_vl, "eager_attention_forward", eager)
    monkeypatch.setattr(encoder.config, "_attn_implementation", "eager")
    enc = pipe.encode(TWO)
    with torch.no_grad():
        theirs = encoder(enc.pixel_values, enc.grid_thw, output_hidden_states=True)
    seen = pipe.look(TWO, layers=None, vision_layers="all")
    depth = pipe.model.vision.cfg.depth
    assert len(seen.vision_hidden) == depth + 1 and len(kept) == 2 * depth  # two frames per block
    assert len(theirs.hidden_states) == depth + 1  # the patch embeddings, then every block's output
    for ours, want in zip(seen.vision_hidden, theirs.hidden_states):
        torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(seen.vision_hidden[-1], theirs.last_hidden_state, rtol=1e-5, atol=1e-5)
    print(f"\nlook, vision fp32: max |hidden error| "
          f"{max((a - b).abs().max().item() for a, b in zip(seen.vision_hidden, theirs.hidden_states)):.2g}, max "
          f"|probability error| {max((a - b).abs().max().item() for layer in range(depth) for a, b in zip(seen.vision_attentions[layer], kept[2 * layer:2 * layer + 2])):.2g}")
    for layer in range(depth):
        frames = seen.vision_attentions[layer]
        assert len(frames) == 2
        for frame, want in zip(frames, kept[2 * layer:2 * layer + 2]):
            torch.testing.assert_close(frame, want, rtol=0, atol=2e-6)


def test_nothing_recorded_runs_the_usual_kernels_and_recording_changes_no_number(pipe, monkeypatch):
    """Without a record the eager path is never taken; with one, the logits equal the usual forward's."""
    enc = pipe.encode(TWO)
    with torch.no_grad():
        usual = pipe.model(enc.input_ids, enc.pixel_values, enc.grid_thw)[0]
    seen = pipe.look(TWO, layers="all", vision_layers="all")
    with torch.no_grad():
        from_normed = pipe.model.decoder.lm_head(seen.normed).float()
    torch.testing.assert_close(from_normed, usual, rtol=1e-5, atol=1e-5)

    def refuse(*a, **kw):
        raise AssertionError("the eager path ran without a record")

    monkeypatch.setattr(attention, "eager_causal", refuse)
    monkeypatch.setattr(attention, "_probs", refuse)
    with torch.no_grad():
        again = pipe.model(enc.input_ids, enc.pixel_values, enc.grid_thw)[0]
    assert torch.equal(again, usual)
    assert pipe.look(TWO, layers=None).attentions == {}  # hidden states only: hooks, no eager path
    left = [name for name, m in pipe.model.named_modules() if m._forward_hooks or m._forward_pre_hooks]
    assert left == []  # every hook removed again
