"""Decoder logits against transformers' Qwen2ForCausalLM (POINTS-1.5, every naming) and Qwen3ForCausalLM
(POINTS-GUI-G), with weights that went through our mapping."""

import dataclasses

import pytest
import torch

import points
from points.model.attention import AttentionMeta

LENGTHS = [1, 7, 40]


# checkpoint fixture -> the transformers model its weights came from
CHECKPOINTS = {"official_dir": "ref_decoder", "qwen2_dir": "ref_decoder", "converted_dir": "ref_decoder",
               "gui_dir": "ref_qwen3_decoder", "gui_converted_dir": "ref_qwen3_decoder"}


@pytest.fixture(scope="module")
def gui_converted_dir(gui_dir, tmp_path_factory):
    return points.convert(gui_dir, tmp_path_factory.mktemp("gui-converted") / "out")


@pytest.fixture(scope="module", params=list(CHECKPOINTS))
def pair(request):
    """(our decoder loaded from a checkpoint, the transformers decoder whose weights it holds)."""
    return (points.load_decoder(request.getfixturevalue(request.param)),
            request.getfixturevalue(CHECKPOINTS[request.param]))


@pytest.fixture
def decoder(pair):
    return pair[0]


@pytest.fixture
def theirs(pair):
    return pair[1]


def test_qwen3_decoder_is_read_as_qwen3(gui_dir):
    """GUI-G's config: head_dim apart from hidden / heads, q/k norms, no q/k/v bias, its own vocabulary."""
    d = points.load_decoder(gui_dir).cfg
    assert (d.head_dim, d.hidden_size // d.n_heads, d.qk_norm, d.qkv_bias, d.out_bias) == (32, 40, True, False, False)


@pytest.mark.parametrize("length", LENGTHS)
def test_logits_match_transformers(decoder, theirs, length):
    tokens = torch.randint(0, decoder.cfg.vocab_size, (2, length), generator=torch.Generator().manual_seed(length))
    with torch.no_grad():
        expected = theirs(tokens).logits
        got = decoder(tokens)
    assert got.dtype == torch.float32
    assert got.shape == (2, length, decoder.cfg.vocab_size)
    print(f"\ndecoder fp32, batch 2 x {length}: max |logit error| {(got - expected).abs().max().item():.3g}, "
          f"max |logit| {expected.abs().max().item():.3g}")
    torch.testing.assert_close(got, expected)


def test_query_chunks_match_transformers(decoder, theirs):
    """Long inputs are attended in query chunks (each reading only the keys it can see): 4 queries a chunk
    (the metadata's query_chunk) over a continuation of 15 tokens after 3 cached ones."""
    tokens = torch.randint(0, decoder.cfg.vocab_size, (2, 18), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        cache = decoder.new_cache(2, max_len=32)
        decoder(tokens[:, :3], meta=cache.reserve(3))
        meta = dataclasses.replace(cache.reserve(15), query_chunk=4)
        torch.testing.assert_close(decoder(tokens[:, 3:], meta=meta), theirs(tokens).logits[:, 3:])
        whole = dataclasses.replace(AttentionMeta.no_cache(2, 18, tokens.device), fresh=False, query_chunk=4)
        torch.testing.assert_close(decoder(tokens, meta=whole), theirs(tokens).logits)


def test_right_padded_rows_match_transformers(decoder, theirs):
    """Rows of different lengths in one batch: real positions equal transformers with its padding mask."""
    lengths = [23, 9]
    tokens = torch.randint(0, decoder.cfg.vocab_size, (2, 23), generator=torch.Generator().manual_seed(3))
    mask = torch.tensor([[1] * n + [0] * (23 - n) for n in lengths])
    with torch.no_grad():
        expected = theirs(tokens, attention_mask=mask).logits
        got = decoder(tokens)
    for row, n in enumerate(lengths):
        torch.testing.assert_close(got[row, :n], expected[row, :n])


def test_last_selects_each_rows_logits(decoder):
    tokens = torch.randint(0, decoder.cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = decoder(tokens)
        picked = decoder(tokens, last=torch.tensor([11, 5]))
    torch.testing.assert_close(picked, torch.stack([full[0, 11], full[1, 5]]))


def test_embeds_input_equals_tokens(decoder):
    tokens = torch.randint(0, decoder.cfg.vocab_size, (1, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(decoder(embeds=decoder.embed(tokens)), decoder(tokens), rtol=0, atol=0)


def test_transposed_cpu_layout_keeps_the_numbers_and_a_canonical_state(official_dir, ref_decoder, tmp_path):
    """The opt-in CPU transform stores the tall weights column-major; logits still match transformers and
    state_dict() still hands out contiguous [out, in] tensors equal to the originals."""
    from safetensors.torch import save_file

    from points.runtime.linears import transpose_tall_linears

    decoder = points.load_decoder(official_dir)
    before = {k: v.clone() for k, v in decoder.state_dict().items()}
    transpose_tall_linears(decoder)
    qkv = decoder.layers[0].attn.qkv.weight
    assert qkv.shape == (224 + 2 * 32, 224) and qkv.stride() == (1, 224 + 2 * 32)
    assert decoder.layers[0].mlp.down.weight.is_contiguous()  # wide: left as it is
    tokens = torch.randint(0, decoder.cfg.vocab_size, (2, 19), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(decoder(tokens), ref_decoder(tokens).logits)
    state = decoder.state_dict()
    assert all(t.is_contiguous() and torch.equal(t, before[k]) for k, t in state.items())
    save_file(state, str(tmp_path / "decoder.safetensors"))
    with pytest.raises(ValueError, match=r"layers.0.attn.qkv.weight is bfloat16 on cpu; the transposed layout is "
                                         r"for float32 CPU weights only"):
        transpose_tall_linears(points.load_decoder(official_dir, dtype=torch.bfloat16))
