"""Every engine on every member: POINTS-Reader (a tied Qwen2.5 decoder), POINTS-GUI-G and VersaViT (Qwen3:
q/k norms, head_dim apart), each a random tiny checkpoint in its released layout (points.tooling.synthetic, the
real Qwen2.5 tokenizer), run through each way the project runs a model. POINTS-1.5 itself runs through all of
them in the other test files; parity with transformers per member: test_decoder_parity.py and test_family.py.

Each test checks an engine against the plainest computation of the same thing (the cache-free forward of
the model, the float model, the files themselves), so that a member-specific mistake in an engine shows."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

import points
from points.tooling import synthetic

SIZES = {"points-reader": "reader-tiny", "points-gui-g": "gui-tiny", "versavit": "versavit-tiny"}
STOPS = (151645, 151643)
NEW = 6


@pytest.fixture(scope="module", params=list(SIZES))
def member(request, tmp_path_factory, tokenizer_json):
    """(released directory, its loaded pipeline) of one member."""
    size = SIZES[request.param]
    d = synthetic.write_checkpoint(tmp_path_factory.mktemp(size) / size, size, dtype=torch.float32, tokenizer="bytes")
    shutil.copy(tokenizer_json, d / "tokenizer.json")
    pipe = points.load(d)
    assert pipe.member.name == request.param and pipe.model.cfg.member == request.param
    return d, pipe


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    path = tmp_path_factory.mktemp("picture") / "p.png"
    Image.linear_gradient("L").convert("RGB").resize((84, 56)).save(path)
    return path


def _conversation(picture, text="What is shown?"):
    return [{"role": "user", "content": [{"type": "image", "image": str(picture)}, {"type": "text", "text": text}]}]


@torch.no_grad()
def _greedy_by_forward(pipe, messages, steps: int) -> list[int]:
    """Greedy ids from the whole-sequence forward, recomputed each step (no cache, no engine)."""
    enc = pipe.encode(messages)
    ids, out = enc.input_ids, []
    for _ in range(steps):
        nxt = int(pipe.model(ids, enc.pixel_values, enc.grid_thw)[0, -1].argmax())
        out.append(nxt)
        if nxt in STOPS:
            break
        ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
    return out


def test_chat_batch_stream_and_submit_equal_the_cache_free_forward(member, picture):
    _, pipe = member
    messages = _conversation(picture)
    expected = pipe.tokenizer.decode(_greedy_by_forward(pipe, messages, NEW))
    assert pipe.chat(messages, max_new_tokens=NEW) == expected
    assert "".join(pipe.chat(messages, max_new_tokens=NEW, stream=True)) == expected
    text_only = [{"role": "user", "content": "Hello"}]
    assert pipe.chat_batch([messages, text_only], max_new_tokens=NEW) == [
        expected, pipe.tokenizer.decode(_greedy_by_forward(pipe, text_only, NEW))]
    assert pipe.submit(messages, max_new_tokens=NEW).text() == expected


def test_the_prefix_cache_reuses_a_continued_conversation(member, picture):
    _, pipe = member
    pipe.prefix.clear()
    first = _conversation(picture)
    reply = pipe.chat(first, max_new_tokens=NEW)
    longer = first + [{"role": "assistant", "content": reply}, {"role": "user", "content": "And then?"}]
    hits = pipe.prefix.hits
    got = pipe.chat(longer, max_new_tokens=NEW)
    assert pipe.prefix.hits == hits + 1 and pipe.prefix.reused_tokens > 0
    assert got == pipe.tokenizer.decode(_greedy_by_forward(pipe, longer, NEW))


@torch.no_grad()
def test_score_is_the_forwards_log_probabilities(member, picture):
    _, pipe = member
    messages, reply = _conversation(picture), "A gradient."
    score = pipe.score(messages, reply)  # the reply's ids and <|im_end|>
    enc = pipe.encode(messages)
    at = enc.input_ids.shape[1] - 1  # the position whose logits give the first scored id
    ids = torch.cat([enc.input_ids, torch.tensor([score.tokens])], 1)
    assert score.tokens[-1] == pipe.tokenizer.im_end_id
    logp = torch.log_softmax(pipe.model(ids, enc.pixel_values, enc.grid_thw)[0].float(), -1)
    expected = logp[at:-1].gather(1, ids[0, at + 1:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(score.logprobs), expected, rtol=1e-5, atol=1e-5)


def test_int8_on_the_cpu_kernels_equals_its_own_forward_and_converts(member, picture, tmp_path):
    d, pipe = member
    q = points.load(d, quantize="int8")
    messages = _conversation(picture)
    assert q.chat(messages, max_new_tokens=NEW) == q.tokenizer.decode(_greedy_by_forward(q, messages, NEW))
    stored = points.convert(d, tmp_path / "int8", quantize="int8", progress=False)
    again = points.load(stored)
    assert again.member.name == pipe.member.name
    enc = pipe.encode(messages)
    with torch.no_grad():
        torch.testing.assert_close(again.model(enc.input_ids, enc.pixel_values, enc.grid_thw),
                                   q.model(enc.input_ids, enc.pixel_values, enc.grid_thw), rtol=0, atol=0)


def test_convert_soup_and_merge_keep_the_member_and_its_numbers(member, picture, tmp_path):
    d, pipe = member
    ours = points.convert(d, tmp_path / "ours", progress=False)
    assert json.loads((ours / "config.json").read_text())["member"] == pipe.member.name
    stored = json.loads((ours / "model.safetensors.index.json").read_text())["weight_map"]
    tied = pipe.model.cfg.decoder.tied  # (Reader: the head is the embedding, held and stored once)
    assert tied == (pipe.model.decoder.lm_head.weight is pipe.model.decoder.embed.weight)
    assert ("decoder.lm_head.weight" in stored) == (not tied) and "decoder.embed.weight" in stored
    from points.tooling.soup import soup

    souped = soup([d, d], tmp_path / "soup", progress=False)  # (the mean of one checkpoint twice: itself)
    messages = _conversation(picture)
    enc = pipe.encode(messages)
    with torch.no_grad():
        want = pipe.model(enc.input_ids, enc.pixel_values, enc.grid_thw)
        for path in (ours, souped):
            loaded = points.load(path)
            assert loaded.member.name == pipe.member.name
            torch.testing.assert_close(loaded.model(enc.input_ids, enc.pixel_values, enc.grid_thw), want,
                                       rtol=0, atol=0)


@torch.no_grad()
def test_look_records_every_layer_of_the_forward(member, picture):
    _, pipe = member
    messages, reply = _conversation(picture), "A gradient."
    seen = pipe.look(messages, reply, layers="all", vision_layers="all")
    d, L = pipe.model.cfg.decoder, len(seen.tokens)
    assert sorted(seen.attentions) == list(range(d.n_layers))
    assert all(a.shape[-3:] == (d.n_heads, L, L) for a in seen.attentions.values())
    assert len(seen.vision_attentions) == pipe.model.cfg.vision.depth
    enc = pipe.encode(messages)
    logits = pipe.model(torch.tensor([seen.tokens]), enc.pixel_values, enc.grid_thw)[0]
    torch.testing.assert_close(pipe.model.decoder.lm_head(seen.normed).float().reshape(L, -1), logits,
                               rtol=1e-5, atol=1e-5)


def test_the_compiled_step_has_no_graph_breaks_and_equals_eager(member, picture):
    """The decode step under torch.compile (dynamo with the eager backend: the graph is what is checked here,
    inductor's code for it in test_compile.py) gives the eager replies, batched and ragged."""
    from torch._dynamo.testing import CompileCounter

    from points.runtime.engine import Engine

    _, pipe = member
    torch._dynamo.reset()
    counter = CompileCounter()
    fast = points.Pipeline(pipe.model, pipe.tokenizer, pipe.processor,
                           Engine(pipe.model.decoder, compile=True, backend=counter), prefix_cache=False)
    conversations = [_conversation(picture), [{"role": "user", "content": "Hello"}]]
    assert fast.chat_batch(conversations, max_new_tokens=NEW) == pipe.chat_batch(conversations, max_new_tokens=NEW)
    assert 1 <= counter.frame_count <= 2


def test_points_run_and_serve_answer_as_the_pipeline(member, picture, tmp_path):
    """`points run` (in this process) and `points serve` (in this process, real HTTP, the openai client): the
    pipeline's replies; /v1/models names the member."""
    openai = pytest.importorskip("openai")
    pytest.importorskip("starlette")
    from test_serve import InProcess

    from points.tooling import run

    d, pipe = member
    messages = _conversation(picture)
    expected = pipe.chat(messages, max_new_tokens=NEW)
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text(json.dumps({"id": "a", "messages": messages}) + "\n")
    assert run.main(["--model", str(d), "--input", str(inp), "--output", str(out), "--max-new-tokens", str(NEW),
                     "--progress", "off"]) == 0
    assert json.loads(out.read_text())["reply"] == expected
    served = InProcess(d, "--served-model-name", "m", "--allow-local-images", str(Path(picture).parent))
    try:
        client = openai.OpenAI(base_url=served.url + "/v1", api_key="none", max_retries=0, timeout=60)
        assert [(m.id, m.member) for m in client.models.list().data] == [("m", pipe.member.name)]
        got = client.chat.completions.create(model="m", max_tokens=NEW, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": Path(picture).as_uri()}},
            {"type": "text", "text": "What is shown?"}]}])
        assert got.choices[0].message.content == expected
    finally:
        served.stop()


def test_lora_finetune_then_merge_and_explain(member, picture, tmp_path):
    """`points finetune` (LoRA, in this process, 2 steps) on the member's released directory, its adapter loaded
    onto the base and merged into the base's own layout (`points merge`): the merged model's logits are the
    adapted model's; `points explain` draws its attention over the picture."""
    from points.tooling import explain, finetune, merge

    d, pipe = member
    data = tmp_path / "train.jsonl"
    chat = _conversation(picture) + [{"role": "assistant", "content": "A gradient, dark to light."}]
    data.write_text("".join(json.dumps({"id": f"c{i}", "messages": chat}) + "\n" for i in range(4)))
    rng = torch.get_rng_state()
    try:
        assert finetune.main(["--model", str(d), "--data", str(data), "--output", str(tmp_path / "run"),
                              "--max-steps", "2", "--batch-tokens", "256", "--lr", "0.05", "--progress", "off"]) == 0
    finally:
        torch.set_rng_state(rng)
    adapted = points.load(d, adapter=tmp_path / "run")
    assert merge.main([str(d), str(tmp_path / "run"), str(tmp_path / "merged"), "--progress", "off"]) == 0
    merged = points.load(tmp_path / "merged")
    assert merged.member.name == pipe.member.name
    enc = pipe.encode(_conversation(picture))
    with torch.no_grad():
        want = adapted.model(enc.input_ids, enc.pixel_values, enc.grid_thw)
        assert (want - pipe.model(enc.input_ids, enc.pixel_values, enc.grid_thw)).abs().max() > 1e-4  # (it trained)
        torch.testing.assert_close(merged.model(enc.input_ids, enc.pixel_values, enc.grid_thw), want,
                                   rtol=1e-5, atol=1e-5)
    assert explain.main(["--model", str(d), "--image", str(picture), "--prompt", "What is shown?",
                         "--output", str(tmp_path / "seen.png"), "--max-new-tokens", "2"]) == 0
    assert Image.open(tmp_path / "seen.png").size[0] == 640


def test_an_image_items_own_max_pixels_follow_the_members_rule(member, picture):
    """POINTS-Reader's chat shrinks an image over its item's max_pixels first (its official rule); the other
    members take the item's bounds as the processor's (Qwen-VL's convention): the rule is the member's data."""
    import dataclasses

    from points.io.processor import open_image

    d, pipe = member
    rule = "prefit" if pipe.member.name == "points-reader" else "bounds"
    assert pipe.processor.item_max_pixels == pipe.member.item_max_pixels == rule
    n = 28 * 28 * 6
    enc = pipe.encode([{"role": "user", "content": [{"type": "image", "image": picture, "max_pixels": n},
                                                    {"type": "text", "text": "?"}]}])
    if rule == "bounds":
        want = dataclasses.replace(pipe.processor, max_pixels=n)(picture)[0]
    else:
        img = open_image(picture)
        b = (img.width * img.height / n) ** 0.5
        want = pipe.processor(img.resize((int(img.width // b), int(img.height // b)), Image.Resampling.BICUBIC))[0]
    assert torch.equal(enc.pixel_values, want)
