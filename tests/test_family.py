"""The family's other members end to end, each against transformers' pieces composed as its official code
composes them: POINTS-GUI-G (a Qwen3 decoder: head_dim apart, q/k norms) in its released layout, with the real
Qwen2.5 vocabulary's tokenizer, through `points.load`. (POINTS-1.5 itself: tests/test_end_to_end.py.)"""

import json
from pathlib import Path

import matplotlib
import pytest
import torch

import points
from conftest import E2E_MAX_PIXELS

PHOTO = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
STOPS = (151645, 151643)  # <|im_end|>, <|endoftext|>


@pytest.fixture(scope="module")
def gui_shapes():
    """GUI-G-8B's proportions made tiny (Qwen3: head_dim 32 against hidden 112 / 4 heads = 28) with its real
    151,936-row vocabulary; the vision tower's merger width is the decoder's."""
    from points.tooling import reference

    llm = dict(reference.TINY_QWEN3, vocab_size=151936, hidden_size=112, intermediate_size=320)
    return llm, dict(reference.TINY_VISION, hidden_size=112)


@pytest.fixture(scope="module")
def gui_reference(gui_shapes):
    from points.tooling import reference

    llm, vision = gui_shapes
    return reference.reference_qwen3_decoder(llm, seed=7), *reference.reference_vision(vision, seed=8)


@pytest.fixture(scope="module")
def gui(tmp_path_factory, gui_shapes, gui_reference, tokenizer_json):
    """A POINTS-GUI-G directory as released (config, shards, tokenizer.json, preprocessor_config.json), loaded."""
    import shutil

    from points.tooling import reference

    decoder, encoder, projector = gui_reference
    tensors = {f"llm.{k}": v for k, v in decoder.state_dict().items()} | reference.vision_tensors(encoder, projector)
    d = reference.save_checkpoint(tmp_path_factory.mktemp("gui-e2e"), reference.gui_config(*gui_shapes), tensors)
    shutil.copy(tokenizer_json, d / "tokenizer.json")
    (d / "preprocessor_config.json").write_text(json.dumps(points.ImageProcessor(max_pixels=E2E_MAX_PIXELS).to_json()))
    return points.load(d)


CONVERSATIONS = {
    "screenshot with its system turn": [
        {"role": "system", "content": "Locate the element the user names; reply (x, y), each in [0, 1]."},
        {"role": "user", "content": [{"type": "image", "image": str(PHOTO)}, {"type": "text", "text": "The badge"}]}],
    "text only": [{"role": "user", "content": "Click where?"}],
}


@pytest.mark.parametrize("name", list(CONVERSATIONS))
@torch.no_grad()
def test_gui_logits_and_greedy_reply_match_the_reference(gui, gui_reference, name):
    from points.tooling import reference

    messages = CONVERSATIONS[name]
    enc = gui.encode(messages)
    embeds = reference.splice_reference(*gui_reference, enc.input_ids, enc.pixel_values, enc.grid_thw)
    expected = gui_reference[0](inputs_embeds=embeds).logits
    got = gui.model(enc.input_ids, enc.pixel_values, enc.grid_thw)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    print(f"\nGUI-G end to end fp32, {name}: {enc.input_ids.shape[1]} prompt tokens, max |logit error| "
          f"{(got - expected).abs().max().item():.3g}, max |logit| {expected.abs().max().item():.3g}")
    torch.testing.assert_close(got, expected)
    tokens = reference.greedy_reference(gui_reference[0], embeds, 16, STOPS)
    assert gui.chat(messages, max_new_tokens=16) == gui.tokenizer.decode(tokens)
    assert len(tokens) == 16  # random weights: no stop came up, every step was compared
