"""Backward parity: the gradients of one loss with respect to every parameter and to pixel_values equal
transformers' (Qwen2ForCausalLM, the Qwen2-VL vision tower and POINTS' PatchMerger, composed as the official
generate() does) on the same weights through our converter, float32, text-only, one-image and two-image
inputs. Our side runs `points.load`'s model in train mode under plain autograd."""

import copy

import pytest
import torch
import torch.nn.functional as F

import points
from points.io.checkpoint import to_hf_state_dict
from points.tooling import reference
from test_end_to_end import conversations

# The loss's gradients accumulate over every token and layer: their error relative to the largest entry of
# each tensor, measured 2026-12-02 on the CPU (float32), is at most 1.3e-6; a mapping mistake (a swapped
# K/V half, [up; gate] read reversed, a missing image feature) moves it to 1e-1 or more.
REL = 1e-5


@pytest.fixture(scope="module")
def trainable(e2e_dir):
    model = points.load(e2e_dir).model
    return model.train().requires_grad_(True)


def _loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy over every position (the image positions included: every path gets a
    gradient)."""
    return F.cross_entropy(logits[0, :-1].float(), ids[0, 1:])


def _reference_grads(e2e_reference, enc):
    decoder, encoder, projector = (copy.deepcopy(m).train() for m in e2e_reference)
    pixels = None if enc.pixel_values is None else enc.pixel_values.clone().requires_grad_(True)
    embeds = reference.splice_reference(decoder, encoder, projector, enc.input_ids, pixels, enc.grid_thw)
    loss = _loss(decoder(inputs_embeds=embeds).logits, enc.input_ids)
    loss.backward()
    grads = {f"llm.{n}": p.grad for n, p in decoder.named_parameters()}
    grads |= {f"vision_encoder.{n}": p.grad for n, p in encoder.named_parameters()}
    grads |= {f"vision_projector.{n}": p.grad for n, p in projector.named_parameters()}
    return loss.detach(), grads, None if pixels is None else pixels.grad


@pytest.mark.parametrize("name", ["text_only", "single_image", "two_images"])
def test_gradients_match_transformers(trainable, pipe, e2e_reference, name):
    enc = pipe.encode(conversations()[name][0])
    model = trainable
    model.zero_grad(set_to_none=True)
    pixels = None if enc.pixel_values is None else enc.pixel_values.clone().requires_grad_(True)
    loss = _loss(model(enc.input_ids, pixels, enc.grid_thw), enc.input_ids)
    loss.backward()
    want_loss, want, want_pixels = _reference_grads(e2e_reference, enc)
    torch.testing.assert_close(loss.detach(), want_loss, rtol=1e-6, atol=1e-6)

    ours = {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in model.named_parameters()}
    mapped = to_hf_state_dict(ours, model.cfg, naming="qwen2")
    assert set(mapped) <= set(want), sorted(set(mapped) - set(want))[:5]
    worst = 0.0
    for key, g in mapped.items():
        ref = want[key] if want[key] is not None else torch.zeros_like(g)
        scale = ref.abs().max().item()
        err = (g - ref).abs().max().item()
        if enc.pixel_values is None and key.startswith("vision"):
            assert scale == 0 and err == 0, key  # no image: the vision side gets no gradient on either side
            continue
        assert scale > 0, f"{key}: the reference's gradient is zero"
        assert err <= REL * scale, f"{key}: max |grad error| {err:.3g} against max |grad| {scale:.3g}"
        worst = max(worst, err / scale)
    # every tensor of the reference that the composition uses has its counterpart checked
    unused = {k for k, g in want.items() if g is None or not g.abs().max() > 0}
    assert set(want) - unused <= set(mapped), sorted(set(want) - unused - set(mapped))[:5]
    if want_pixels is not None:
        scale = want_pixels.abs().max().item()
        err = (pixels.grad - want_pixels).abs().max().item()
        assert 0 < scale and err <= REL * scale, f"pixel_values: {err:.3g} against {scale:.3g}"
        worst = max(worst, err / scale)
    print(f"\ngradients, {name}: {len(mapped)} tensors, worst max|error| / max|grad| {worst:.2g}")
