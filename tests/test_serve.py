"""`points serve` as a client meets it: a real server process (uvicorn on a free loopback port; in this process
where a test holds the scheduler) and the real `openai` client; replies equal `Pipeline.chat` of the same
conversation alone."""

import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import matplotlib
import pytest
import torch
from PIL import Image

openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

PHOTO = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
KEY = "test-key-123"
NEW = 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Http:
    """Requests to the server at `self.url`: (status, headers, JSON body)."""

    def post(self, path, body, key=KEY, raw=None, headers=None):
        data = raw if raw is not None else json.dumps(body).encode()
        h = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {}), **(headers or {})}
        request = urllib.request.Request(self.url + path, data=data, headers=h, method="POST")
        return _answer(request)

    def get(self, path, key=KEY, headers=None):
        h = {**({"Authorization": f"Bearer {key}"} if key else {}), **(headers or {})}
        return _answer(urllib.request.Request(self.url + path, headers=h))


class Served(_Http):
    """`points serve` in a process of its own, its stderr lines in `lines`."""

    def __init__(self, model, *flags):
        self.proc = subprocess.Popen([sys.executable, "-m", "points", "serve", "--model", str(model), "--port",
                                      str(_free_port()), *flags], stderr=subprocess.PIPE, text=True)
        self.lines = []
        deadline = time.time() + 120
        while time.time() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            self.lines.append(line)
            found = re.search(r"http://[0-9.]+:\d+", line)
            if found:
                self.url = found.group(0)
                threading.Thread(target=self._drain, daemon=True).start()
                return
        self.proc.kill()
        raise AssertionError("the server did not start: " + "".join(self.lines) + self.proc.stderr.read())

    def _drain(self):
        for line in self.proc.stderr:
            self.lines.append(line)

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)


class InProcess(_Http):
    """`points serve` in this process: the command's app and shutdown (serve.http_server) under uvicorn in a
    thread, on the --host the flags give (a free port), so that a test can reach its scheduler
    (`self.server.scheduler`); `url` is the address it bound."""

    def __init__(self, model, *flags):
        from points.tooling import serve

        args = serve.parser().parse_args(["--model", str(model), *flags])
        self.server = serve.build(vars(args))
        self.http = serve.http_server(self.server, args.host, 0, args.grace_seconds)
        self.thread = threading.Thread(target=self.http.run, daemon=True)
        self.thread.start()
        assert _within(60, lambda: self.http.started), "the server did not start"
        host, port = self.http.servers[0].sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}"

    def stop(self):
        self.http.should_exit = True
        self.thread.join(60)


def _within(seconds: float, condition) -> bool:
    """Whether `condition()` holds within `seconds`."""
    deadline = time.time() + seconds
    while not condition():
        if time.time() > deadline:
            return False
        time.sleep(0.01)
    return True


def _oversized(server, chunked: bool):
    """A body over the 1 MiB limit: announced by Content-Length (only its first KiB sent: the answer must come
    from the header alone), or chunked without a length (1 MiB + 64 KiB sent)."""
    import http.client

    host, port = server.url.removeprefix("http://").split(":")
    c = http.client.HTTPConnection(host, int(port), timeout=60)
    c.putrequest("POST", "/v1/chat/completions")
    c.putheader("Authorization", f"Bearer {KEY}")
    c.putheader("Content-Type", "application/json")
    if chunked:
        c.putheader("Transfer-Encoding", "chunked")
        c.endheaders()
        for _ in range(17):
            c.send(b"10000\r\n" + b" " * 0x10000 + b"\r\n")
        c.send(b"0\r\n\r\n")
    else:
        c.putheader("Content-Length", str(2 << 20))
        c.endheaders()
        c.send(b" " * 1024)
    r = c.getresponse()
    answer = r.status, json.loads(r.read())
    c.close()
    return answer


def _answer(request):
    try:
        with urllib.request.urlopen(request, timeout=300) as r:
            return r.status, r.headers, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.headers, json.loads(e.read())


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("served-images")
    Image.open(PHOTO).resize((56, 84)).save(folder / "photo.png")
    (folder / "inner").mkdir()
    return folder


@pytest.fixture(scope="module")
def server(e2e_dir, images):
    s = Served(e2e_dir, "--api-key", KEY, "--max-batch", "4", "--max-queue", "8", "--max-body-mb", "1",
               "--allow-local-images", str(images / "inner"), "--served-model-name", "points-e2e")
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def _data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _messages(i: int, image: Path | None = None):
    content = [{"type": "text", "text": f"Question {i}: " + "why " * (i % 4) + "?"}]
    if image is not None:
        content.insert(0, {"type": "image_url", "image_url": {"url": _data_url(image)}})
    return [{"role": "user", "content": content}]


def _ours(messages, image: Path | None = None):
    """The same conversation in Pipeline.chat's format."""
    out = []
    for m in messages:
        if isinstance(m["content"], str):
            out.append(m)
            continue
        parts = [{"type": "image", "image": image} if p["type"] == "image_url" else p for p in m["content"]]
        out.append({"role": m["role"], "content": parts})
    return out


def test_reply_usage_and_models_equal_the_pipeline(server, client, pipe):
    messages = _messages(1)
    got = client.chat.completions.create(model="points-e2e", messages=messages, max_tokens=NEW)
    assert got.choices[0].message.content == pipe.chat(_ours(messages), max_new_tokens=NEW)
    assert got.choices[0].finish_reason in ("stop", "length") and got.model == "points-e2e"
    prompt = pipe.encode(_ours(messages)).input_ids.shape[1]
    assert got.usage.prompt_tokens == prompt and 1 <= got.usage.completion_tokens <= NEW
    assert got.usage.total_tokens == prompt + got.usage.completion_tokens
    assert [m.id for m in client.models.list().data] == ["points-e2e"]
    status, _, body = server.get("/health", key=None)
    assert status == 200 and body["status"] == "ok"


def test_stream_concatenates_to_the_reply(client, pipe, images):
    messages = _messages(2, images / "photo.png")
    chunks = list(client.chat.completions.create(model="points-e2e", messages=messages, max_tokens=NEW, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == pipe.chat(_ours(messages, images / "photo.png"), max_new_tokens=NEW)
    finishing = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishing in (["stop"], ["length"]) and chunks[-1].usage.completion_tokens >= 1


def test_concurrent_clients_each_get_their_alone_reply(client, pipe, images):
    """Eight clients at once on four rows (the rest queue, 8 places): each reply is the conversation's own."""
    convs = [_messages(i, images / "photo.png" if i % 3 == 0 else None) for i in range(8)]
    got = [None] * 8

    def ask(i):
        got[i] = client.chat.completions.create(model="points-e2e", messages=convs[i], max_tokens=NEW + i,
                                                temperature=0).choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, m in enumerate(convs):
        assert got[i] == pipe.chat(_ours(m, images / "photo.png"), max_new_tokens=NEW + i), i


def test_seeded_sampling_repeats(client):
    ask = lambda: client.chat.completions.create(model="points-e2e", messages=_messages(5), max_tokens=NEW,  # noqa
                                                 temperature=0.9, top_p=0.9, seed=7).choices[0].message.content
    assert ask() == ask()


def test_official_chat_route(server, pipe):
    messages = _messages(3)
    status, _, body = server.post("/chat", {"messages": messages, "max_tokens": NEW, "temperature": 0})
    assert status == 200
    assert body == {"choices": [{"index": 0, "message": {"role": "assistant",
                                                         "content": pipe.chat(_ours(messages), max_new_tokens=NEW)}}]}


@pytest.mark.parametrize("body, status, param", [
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "video"}]}]}, 400, "messages[0].content[0]"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": "many"}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": -1}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 17}, 400, "n"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 0}, 400, "n"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": 10**400}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": 1e-40}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "top_k": 10**20}, 400, "top_k"),
    ({"messages": [{"role": "user", "content": "x"}], "repetition_penalty": 10**400}, 400, "repetition_penalty"),
    ({"messages": [{"role": "user", "content": "x"}], "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"messages": [{"role": "user", "content": "\ud800"}]}, 400, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]}, 400, "messages[0].content[0].text"),
    ({"messages": [{"role": "user", "content": "x"}], "model": "gpt-9"}, 404, "model"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 10**6}, 400, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://169.254.169.254/x"}}]}]},
     400, "messages[0].content[0].image_url.url"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}]},
     400, "messages[0].content[0].image_url.url"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "../photo.png"}}]}]},
     400, "messages[0].content[0].image_url.url"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url",
                                                 "image_url": {"url": "data:image/png;base64,!!!"}}]}]},
     400, "messages[0].content[0].image_url.url"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "data:image/png;base64," + base64.b64encode(b"not a picture").decode()}}]}]}, 400, "messages[0].content[0]"),
])
def test_bad_requests_are_4xx_json_naming_the_field(server, body, status, param):
    got, _, answer = server.post("/v1/chat/completions", body)
    assert got == status, answer
    assert set(answer["error"]) == {"message", "type", "param", "code"}
    assert answer["error"]["param"] == param and answer["error"]["message"].startswith(param), answer


@pytest.mark.parametrize("route, field, value, says", [
    *[("/v1/chat/completions", field, value, "not supported yet") for field, value in [
        ("frequency_penalty", 0.5), ("presence_penalty", -1),
        ("logit_bias", {"13": 5}), ("tool_choice", "auto"),
        ("tools", [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}])]],
    *[("/v1/chat/completions", field, value, "expected") for field, value in [
        ("tools", "x"), ("response_format", 5), ("frequency_penalty", "x"), ("n", True), ("max_tokens", True),
        ("seed", True), ("top_k", True), ("top_p", True), ("temperature", False), ("stream_options", 5), ("user", 5),
        ("stop", 5), ("model", 7)]],
    *[("/v1/chat/completions", field, value, "not supported yet") for field, value in [
        ("best_of", 2), ("store", True), ("audio", {"voice": "x"}), ("modalities", ["text", "audio"]),
        ("reasoning_effort", "high"), ("functions", [{"name": "f"}]), ("prediction", {"type": "content"})]],
    ("/v1/chat/completions", "min_p", "x", "expected a number"),
    ("/v1/chat/completions", "top_logprobs", 2, "needs \"logprobs\": true"),
    ("/v1/chat/completions", "logprobs", 1, "expected a boolean"),
    ("/v1/chat/completions", "min_p", 2, "expected a number in [0 (off), 1]"),
    ("/v1/chat/completions", "do_sample", 1, "expected a boolean"),
    ("/v1/chat/completions", "max_new_tokens", 2, "disagrees with max_tokens = 1"),
    ("/chat", "top_p", True, "expected a number"),
    ("/chat", "stream", True, "unrecognized request field"),
])
def test_a_field_not_served_as_asked_is_a_400_naming_it(server, route, field, value, says):
    """Every OpenAI request field and extension is in serve.FIELDS: of the wrong type (a boolean is no number),
    not supported yet (accepted only at its "off" value) or disagreeing with another field of its setting, it is
    refused, never silently ignored; /chat (the official route's small body) refuses any other field."""
    status, _, answer = server.post(route, {"messages": _messages(0), "max_tokens": 1, field: value})
    assert status == 400 and answer["error"]["param"] == field, answer
    assert answer["error"]["message"].startswith(f"{field}: ") and says in answer["error"]["message"], answer


def test_the_openai_client_gets_off_values_served_and_the_rest_refused(client, pipe):
    messages = _messages(1)
    got = client.chat.completions.create(
        model="points-e2e", messages=messages, max_tokens=NEW, n=1, logprobs=False, frequency_penalty=0,
        presence_penalty=0.0, logit_bias={}, tools=[], tool_choice="none", parallel_tool_calls=False,
        response_format={"type": "text"}, user="u-1")
    assert got.choices[0].message.content == pipe.chat(_ours(messages), max_new_tokens=NEW)
    for field, extra in [("response_format", {"response_format": {"type": "xml"}}),
                         ("n", {"extra_body": {"n": True}}), ("guided_grammar", {"extra_body": {"guided_grammar": "root ::= x"}}),
                         ("guided_json", {"extra_body": {"guided_json": {"type": "no-such-type"}}}),
                         ("guided_regex", {"extra_body": {"guided_regex": "(unclosed"}})]:
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="points-e2e", messages=messages, max_tokens=NEW, **extra)
        assert refused.value.param == field


def test_extensions_are_honoured_and_unknown_fields_ignored_with_a_log_line(server, client, pipe):
    """SGLang's sampling fields (POINTS-Reader's card sends them) through the openai client's extra_body:
    do_sample false is greedy whatever the temperature, max_new_tokens is max_tokens, a seeded top_k / min_p
    draw is the pipeline's; a field neither OpenAI's nor an extension is ignored and logged."""
    messages = _messages(2)
    greedy = pipe.chat(_ours(messages), max_new_tokens=NEW)

    def ask(**extra_body):
        got = client.chat.completions.create(model="points-e2e", messages=messages, extra_body=extra_body)
        return got.choices[0].message.content
    assert ask(max_new_tokens=NEW, do_sample=False, temperature=1.7, seed=3) == greedy
    want = pipe.chat(_ours(messages), max_new_tokens=NEW, temperature=0.9, top_k=20, min_p=0.05,
                     repetition_penalty=1.1, seed=5)
    assert ask(max_new_tokens=NEW, temperature=0.9, top_k=20, min_p=0.05, repetition_penalty=1.1, seed=5) == want
    assert ask(max_new_tokens=NEW, do_sample=True, seed=5) == pipe.chat(_ours(messages), max_new_tokens=NEW,
                                                                        temperature=1.0, seed=5)
    before = len(server.lines)
    assert ask(max_new_tokens=NEW, skip_special_tokens=True, echo_this_back=[1]) == greedy
    assert _within(10, lambda: any("ignored request field(s) 'skip_special_tokens', 'echo_this_back'" in line
                                   for line in server.lines[before:])), server.lines[before:]


def test_cached_tokens_metrics_and_one_log_line_per_request(server, client, pipe):
    """A conversation asked twice: the second's usage says the prefix cache saved all its prompt but the last
    token (the one whose logits start the reply), with the same reply; /metrics (behind the key) is Prometheus'
    text format, read back by prometheus_client's own parser, counting what the requests did; each request left
    one log line under the id it answered with."""
    from prometheus_client.parser import text_string_to_metric_families

    messages = _messages(11, PHOTO)
    want = pipe.chat(_ours(messages, PHOTO), max_new_tokens=NEW)
    first = client.chat.completions.create(model="points-e2e", messages=messages, max_tokens=NEW)
    second = client.chat.completions.create(model="points-e2e", messages=messages, max_tokens=NEW)
    assert first.choices[0].message.content == second.choices[0].message.content == want
    assert first.usage.prompt_tokens_details.cached_tokens < 8  # (at most the template's opening, cached by others)
    assert second.usage.prompt_tokens_details.cached_tokens == second.usage.prompt_tokens - 1
    assert server.get("/metrics", key=None)[0] == 401
    scrape = urllib.request.Request(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(scrape, timeout=60) as r:
        assert r.status == 200 and r.headers["content-type"].startswith("text/plain"), r.headers
        text = r.read().decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples[("points_requests_total", (("finish_reason", "length"),))] >= 2
    assert samples[("points_prefix_cache_hit_tokens_total", ())] >= second.usage.prompt_tokens - 1
    assert samples[("points_generation_tokens_total", ())] >= 2 * NEW
    assert samples[("points_time_to_first_token_seconds_count", ())] >= 2
    assert samples[("points_vision_encoder_seconds_count", ())] >= 1  # (the first; the second's image was cached)
    assert ("points_rows_busy", ()) in samples and ("points_requests_waiting", ()) in samples
    assert ("points_vision_cache_hits_total", ()) in samples
    for got in (first, second):
        assert _within(10, lambda: any(line.startswith(f"points serve: {got.id} /v1/chat/completions length ")
                                       for line in server.lines)), got.id


def test_an_image_urls_own_pixel_bounds_and_detail(server, client, pipe):
    """min_pixels / max_pixels inside an image_url part (SGLang's and Qwen-VL users' way) and detail "low" are
    that image's bounds: the reply and prompt length are the pipeline's with the image item's own bounds; bounds
    outside [784, the model's max_pixels], a min over the max, or an unknown detail are a 400 naming the field."""
    from conftest import E2E_MAX_PIXELS

    def ask(**image_url):
        messages = _messages(12, PHOTO)
        messages[0]["content"][0]["image_url"].update(image_url)
        return client.chat.completions.create(model="points-e2e", messages=messages, max_tokens=NEW)

    def ours(**item):
        messages = _ours(_messages(12, PHOTO), PHOTO)
        messages[0]["content"][0].update(item)
        return pipe.chat(messages, max_new_tokens=NEW), len(pipe.encode(messages).input_ids[0])
    full = ask()
    for asked, item in [({"max_pixels": 28 * 28 * 16}, {"max_pixels": 28 * 28 * 16}),
                        ({"min_pixels": 28 * 28 * 8, "max_pixels": 28 * 28 * 24}, {"min_pixels": 28 * 28 * 8,
                                                                                   "max_pixels": 28 * 28 * 24})]:
        got = ask(**asked)
        text, tokens = ours(**item)
        assert got.choices[0].message.content == text and got.usage.prompt_tokens == tokens
        assert got.usage.prompt_tokens < full.usage.prompt_tokens
    assert ask(detail="high").usage.prompt_tokens == full.usage.prompt_tokens
    assert ask(detail="low").usage.prompt_tokens == full.usage.prompt_tokens  # (this model's max is under low's)
    got = ask(detail="low", max_pixels=28 * 28 * 16)  # (an explicit max_pixels wins)
    assert got.choices[0].message.content == ours(max_pixels=28 * 28 * 16)[0]
    at = "messages[0].content[0].image_url"
    for image_url, param in [({"max_pixels": 500}, f"{at}.max_pixels"), ({"max_pixels": E2E_MAX_PIXELS + 1}, f"{at}.max_pixels"),
                             ({"min_pixels": "many"}, f"{at}.min_pixels"), ({"max_pixels": True}, f"{at}.max_pixels"),
                             ({"min_pixels": 28 * 28 * 30, "max_pixels": 28 * 28 * 20}, f"{at}.min_pixels"),
                             ({"detail": "ultra"}, f"{at}.detail")]:
        body = {"messages": _messages(12, PHOTO), "max_tokens": NEW}
        body["messages"][0]["content"][0]["image_url"].update(image_url)
        status, _, answer = server.post("/v1/chat/completions", body)
        assert status == 400 and answer["error"]["param"] == param, (image_url, answer)


@pytest.mark.parametrize("stream", [False, True])
def test_logprobs_in_openais_shape_are_the_replys_score(client, pipe, stream):
    """logprobs / top_logprobs: each reply token's log-probability (the model's own distribution, float32) with
    its text, bytes and the n most likely, equal to Pipeline.score of the reply's tokens within 1e-5; streamed,
    the chunks' entries add up to the same list; top_logprobs past 20 is a 400."""
    messages = _messages(13)
    got = client.chat.completions.create(model="points-e2e", messages=messages, max_tokens=NEW, logprobs=True,
                                         top_logprobs=3, stream=stream)
    if stream:
        chunks = list(got)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        content = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    else:
        text, content = got.choices[0].message.content, got.choices[0].logprobs.content
    assert text == pipe.chat(_ours(messages), max_new_tokens=NEW) and len(content) == NEW
    alone = pipe.submit(_ours(messages), max_new_tokens=NEW)
    alone.text()
    score = pipe.score(_ours(messages), alone.token_ids[:NEW], end=False)
    torch.testing.assert_close(torch.tensor([e.logprob for e in content]), torch.tensor(score.logprobs),
                               rtol=0, atol=1e-5)
    assert b"".join(bytes(e.bytes) for e in content).decode("utf-8", "replace") == text
    for e in content:
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0].token == e.token  # (greedy: the most likely)
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="points-e2e", messages=messages, max_tokens=NEW, logprobs=True,
                                       top_logprobs=21)
    assert refused.value.param == "top_logprobs"


@pytest.mark.parametrize("stream", [False, True])
def test_n_choices_share_one_prefill_and_one_vision_encoding(server, client, pipe, tmp_path, stream):
    """n = 3 sampled choices of a question with an image: choice k is the pipeline's reply seeded seed + k;
    usage counts the prompt once and every choice's tokens; the prompt is prefilled and its image encoded once
    (the others restore it from the prefix cache: /metrics counts one encoding and their restored tokens)."""
    from prometheus_client.parser import text_string_to_metric_families

    def scrape():
        request = urllib.request.Request(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"})
        with urllib.request.urlopen(request, timeout=60) as r:
            return {s.name: s.value for f in text_string_to_metric_families(r.read().decode()) for s in f.samples
                    if not s.labels}
    photo = tmp_path / "crop.png"  # (an image no earlier request has had encoded)
    Image.open(PHOTO).crop((10 * stream, 0, 300, 280)).save(photo)
    messages = _messages(14 + stream, photo)
    gen = dict(max_new_tokens=NEW, temperature=1.0, seed=7)
    want = [pipe.chat(_ours(messages, photo), **(gen | {"seed": 7 + k})) for k in range(3)]
    before = scrape()
    got = client.chat.completions.create(model="points-e2e", messages=messages, max_tokens=NEW, temperature=1.0,
                                         seed=7, n=3, stream=stream, stream_options={"include_usage": True} if stream else None)
    if stream:
        chunks = list(got)
        texts = ["".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == k)
                 for k in range(3)]
        usage = chunks[-1].usage
        assert sorted(c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason) == [0, 1, 2]
    else:
        assert [c.index for c in got.choices] == [0, 1, 2]
        texts, usage = [c.message.content for c in got.choices], got.usage
    assert texts == want
    prompt = len(pipe.encode(_ours(messages, photo)).input_ids[0])
    assert usage.prompt_tokens == prompt and usage.completion_tokens == 3 * NEW
    after = scrape()
    assert after["points_vision_encoder_seconds_count"] - before["points_vision_encoder_seconds_count"] == 1
    saved = after["points_prefix_cache_hit_tokens_total"] - before["points_prefix_cache_hit_tokens_total"]
    assert saved >= 2 * (prompt - 1), (saved, prompt)


def test_structured_output_through_the_openai_clients_parse(client, pipe):
    """client.chat.completions.parse with a Pydantic model (response_format json_schema, strict), vLLM's
    guided_choice and guided_regex, streamed too: every reply parses, and equals the pipeline's constrained one."""
    import typing

    pydantic = pytest.importorskip("pydantic")
    pytest.importorskip("llguidance")

    class Line(pydantic.BaseModel):
        item: str = pydantic.Field(max_length=8)
        qty: int

    class Invoice(pydantic.BaseModel):
        title: str = pydantic.Field(max_length=12)
        paid: bool
        currency: typing.Literal["EUR", "USD"]
        lines: list[Line] = pydantic.Field(max_length=2)

    messages = [{"role": "user", "content": "Read the invoice."}]
    got = client.chat.completions.parse(model="points-e2e", messages=messages, max_tokens=200,
                                        response_format=Invoice)
    invoice = got.choices[0].message.parsed
    assert isinstance(invoice, Invoice) and got.choices[0].finish_reason == "stop"
    from openai.lib._pydantic import to_strict_json_schema  # (the schema parse() sends)

    assert got.choices[0].message.content == pipe.chat(messages, max_new_tokens=200, response_format={
        "type": "json_schema", "json_schema": {"name": "Invoice", "schema": to_strict_json_schema(Invoice)}})
    choice = client.chat.completions.create(model="points-e2e", messages=messages, max_tokens=10,
                                            extra_body={"guided_choice": ["yes", "no"]})
    assert choice.choices[0].message.content in ("yes", "no")
    stream = client.chat.completions.create(model="points-e2e", messages=messages, max_tokens=20, stream=True,
                                            extra_body={"guided_regex": "[0-9]{3}-[A-Z]{2}"})
    assert re.fullmatch("[0-9]{3}-[A-Z]{2}", "".join(c.choices[0].delta.content or "" for c in stream if c.choices))


def test_detail_maps_to_documented_bounds():
    from points.tooling.serve import _pixel_bounds

    assert _pixel_bounds({"detail": "low"}, "x", 28 * 28 * 1280) == {"max_pixels": 448 * 448}
    assert _pixel_bounds({"detail": "low"}, "x", 50_000) == {"max_pixels": 50_000}
    assert _pixel_bounds({"detail": "high"}, "x", 10**6) == _pixel_bounds({"detail": "auto"}, "x", 10**6) == {}
    assert _pixel_bounds({"detail": "low", "min_pixels": 1000, "max_pixels": 9000}, "x", 10**6) == {
        "min_pixels": 1000, "max_pixels": 9000}


def test_local_images_only_inside_the_allowed_folder(server, images, pipe):
    inner = images / "inner"
    Image.open(PHOTO).resize((84, 56)).save(inner / "ok.png")
    (inner / "escape.png").symlink_to(images / "photo.png")  # a link out of the folder
    ok = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "ok.png"}},
                                                    {"type": "text", "text": "?"}]}], "max_tokens": NEW}
    status, _, body = server.post("/v1/chat/completions", ok)
    want = pipe.chat([{"role": "user", "content": [{"type": "image", "image": inner / "ok.png"},
                                                   {"type": "text", "text": "?"}]}], max_new_tokens=NEW)
    assert status == 200 and body["choices"][0]["message"]["content"] == want
    ok["messages"][0]["content"][0]["image_url"]["url"] = "escape.png"
    status, _, body = server.post("/v1/chat/completions", ok)
    assert status == 400 and "must lie inside" in body["error"]["message"]


def test_transport_errors(server):
    status, _, body = server.post("/v1/chat/completions", None, raw=b"{not json")
    assert status == 400 and "not JSON" in body["error"]["message"]
    status, _, body = server.post("/v1/chat/completions", None, raw=b"[" * 100_000 + b"]" * 100_000)
    assert status == 400 and "nested too deeply" in body["error"]["message"]
    status, _, body = server.post("/v1/chat/completions", None, raw=b'{"messages": [{"role": "user", "content": "x"}], '
                                                                  b'"temperature": NaN}')
    assert status == 400 and body["error"]["param"] == "temperature"
    for chunked in (False, True):  # refused from Content-Length before the body is read; counted while reading
        status, body = _oversized(server, chunked)
        assert status == 413 and "--max-body-mb" in body["error"]["message"]
    status, _, body = server.get("/v1/nothing")
    assert status == 404 and body["error"]["message"] == "no route /v1/nothing"
    status, _, body = server.get("/v1/chat/completions")
    assert status == 405


def test_a_client_that_leaves_while_sending_its_body_is_not_logged(server):
    """20 clients announce a 1000-byte body, send 10 bytes and leave: no traceback, no internal error in the log
    (at most a line each), and the server answers on."""
    host, port = server.url.removeprefix("http://").split(":")
    before = len(server.lines)
    for _ in range(20):
        with socket.create_connection((host, int(port))) as s:
            s.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\n"
                      "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"messages\"".encode())
    time.sleep(0.5)  # (the server logs a disconnect, if at all, as it happens)
    assert server.get("/v1/models")[0] == 200
    logged = server.lines[before:]
    assert len(logged) <= 20, "".join(logged)
    assert not any(word in line for line in logged for word in ("Traceback", "Exception", "internal error")), logged


@pytest.mark.parametrize("argv, env, named", [
    (["--api-key", ""], None, "--api-key"),
    ([], "", "POINTS_API_KEY"),
    (["--api-key", "clé-1"], "fine", "--api-key"),
    (["--api-key", "two words"], None, "--api-key"),
    ([], "key\n", "POINTS_API_KEY"),
])
def test_an_api_key_that_cannot_work_is_refused_at_start(tmp_path, monkeypatch, capsys, argv, env, named):
    """An empty key (`--api-key "$KEY"` with KEY unset) would serve openly, one outside visible ASCII could never
    match: either is one line naming where it came from, exit 2, before the model loads."""
    from points.tooling import serve

    monkeypatch.delenv("POINTS_API_KEY", raising=False)
    if env is not None:
        monkeypatch.setenv("POINTS_API_KEY", env)
    assert serve.main(["--model", str(tmp_path / "never-loaded"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {named} ") and err.count("\n") == 1, err


def test_the_bearer_scheme_in_any_case(server):
    for scheme in ("bearer", "BEARER", "bEaReR", "Bearer "):
        assert server.get("/v1/models", key=None, headers={"Authorization": f"{scheme} {KEY}"})[0] == 200, scheme
    for value in (f"Basic {KEY}", f"bearer {KEY.upper()}", f"Bearer{KEY}", KEY, "bearer"):
        assert server.get("/v1/models", key=None, headers={"Authorization": value})[0] == 401, value


def test_api_key(server, client):
    for key in (None, "wrong", KEY + "x"):
        status, _, body = server.get("/v1/models", key=key)
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
        status, _, body = server.post("/chat", {"messages": _messages(0)}, key=key)
        assert status == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert server.get("/health", key=None)[0] == 200


def test_a_full_queue_is_429_with_retry_after(server):
    """4 rows and 8 places in the queue: of 24 requests at once some are refused with 429 and Retry-After,
    every other one is answered; none is lost."""
    answers = [None] * 24

    def ask(i):
        answers[i] = server.post("/v1/chat/completions", {"messages": _messages(i), "max_tokens": 60})

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    codes = sorted(a[0] for a in answers)
    assert set(codes) <= {200, 429} and codes.count(429) >= 1 and codes.count(200) >= 4, codes
    assert all(a[1].get("Retry-After") == "1" and a[2]["error"]["code"] == "queue_full" for a in answers if a[0] == 429)


def _burst(served, n: int, body: dict):
    """`n` requests at once: their threads, and their answers as they come (None until then)."""
    answers = [None] * n

    def ask(i):
        answers[i] = served.post("/v1/chat/completions", body, key=None)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    return threads, answers


def test_max_queue_counts_the_requests_beyond_the_rows(e2e_dir):
    """--max-batch 2 --max-queue 2: 2 requests run, 2 wait, the next is refused (429). While the scheduler is
    held (no step: no request changes place) 12 requests arrive at once: with both rows free exactly 4 get in,
    with both rows taken by long requests exactly 2."""
    served = InProcess(e2e_dir, "--max-batch", "2", "--max-queue", "2", "--grace-seconds", "0")
    scheduler, threads = served.server.scheduler, []
    try:
        for long, admitted in ((0, 4), (2, 2)):
            threads += _burst(served, long, {"messages": _messages(9), "max_tokens": 2000})[0]
            assert _within(30, lambda: scheduler.load() == (long, 0))
            with scheduler.paused():
                burst, answers = _burst(served, 12, {"messages": _messages(1), "max_tokens": NEW})
                assert _within(30, lambda: sum(a is not None for a in answers) + len(scheduler.waiting) == 12)
                assert len(scheduler.waiting) == admitted
                assert all(a[0] == 429 for a in answers if a is not None)
            threads += burst
            if not long:
                for t in burst:
                    t.join()
                assert sorted(a[0] for a in answers) == [200] * admitted + [429] * (12 - admitted)
    finally:
        served.stop()  # (--grace-seconds 0: the long requests are ended at once)
        for t in threads:
            t.join()


def _idle_within(server, seconds: float) -> bool:
    """Whether the server has no request prefilling, generating or waiting within `seconds`."""
    return _within(seconds, lambda: _load(server) == (0, 0))


def _load(server) -> tuple[int, int]:
    health = server.get("/health", key=None)[2]
    return health["busy_rows"], health["waiting"]


@pytest.mark.parametrize("after", ["role", "content"])
def test_a_client_that_leaves_mid_stream_frees_its_row(server, client, after):
    """A stream dropped after its first chunk (sent before the request has a row) or after its first piece of
    text: the request leaves the server at once, wherever it was (queued, being prefilled, generating)."""
    assert _idle_within(server, 60)  # (earlier tests' requests finish first)
    stream = client.chat.completions.create(model="points-e2e", messages=_messages(9), max_tokens=2000, stream=True)
    chunks = iter(stream)
    while not next(chunks).choices[0].delta.content and after == "content":
        pass
    stream.close()
    assert _idle_within(server, 10)


def _events(url: str, body: dict, into: list) -> None:
    """A streamed request: each `data:` payload into `into` as it comes, until the server ends the response (a
    transfer cut short as "cut: ...")."""
    import http.client

    host, port = url.removeprefix("http://").split(":")
    c = http.client.HTTPConnection(host, int(port), timeout=120)
    c.request("POST", "/v1/chat/completions", json.dumps(body | {"stream": True}), {"Content-Type": "application/json"})
    try:
        for line in c.getresponse():
            if line.startswith(b"data: "):
                into.append(line[6:].strip().decode())
    except (http.client.HTTPException, OSError) as e:
        into.append(f"cut: {e!r}")
    c.close()


def test_sigterm_finishes_running_requests_ends_the_rest_then_exits_0(e2e_dir):
    """SIGTERM with --grace-seconds 2: a short request running then finishes whole; the long ones are ended by
    the server when the grace period is over: the stream's last chunk has finish_reason "length", then
    `data: [DONE]`; the plain request gets its JSON answer. Exit 0, one line about them, no traceback."""
    served = Served(e2e_dir, "--grace-seconds", "2")
    long, short = {"messages": _messages(9), "max_tokens": 4000}, {"messages": _messages(4), "max_tokens": 12}
    events, got = [], {}
    threads = [threading.Thread(target=_events, args=(served.url, long, events)),
               threading.Thread(target=lambda: got.update(long=served.post("/v1/chat/completions", long, key=None)))]
    for t in threads:
        t.start()
    assert _within(30, lambda: _load(served) == (2, 0))
    threads.append(threading.Thread(target=lambda: got.update(short=served.post("/v1/chat/completions", short,
                                                                                 key=None))))
    threads[-1].start()
    assert _within(30, lambda: _load(served)[0] == 3 or "short" in got)
    assert served.stop() == 0
    for t in threads:
        t.join()
    assert events[-1] == "[DONE]" and json.loads(events[-2])["choices"][0]["finish_reason"] == "length", events[-3:]
    status, _, body = got["long"]
    assert status == 200 and body["choices"][0]["finish_reason"] == "length"
    assert 0 < body["usage"]["completion_tokens"] < 4000
    status, _, body = got["short"]
    assert status == 200 and (body["usage"]["completion_tokens"] == 12 or body["choices"][0]["finish_reason"] == "stop")
    log = "".join(served.lines)
    assert "Traceback" not in log and log.count("ended 2 request(s)") == 1 and "points serve: stopped" in log, log


def test_loopback_by_default_no_key_and_remote_images_when_allowed(e2e_dir, images, pipe, tmp_path):
    """Without --host the server binds 127.0.0.1, without --api-key it needs none; with --allow-remote-images
    it fetches http(s) images, bounded in size (413) and time (400 naming the field). (In this process: the
    address it announces and its exit code are the other tests' `Served`.)"""
    import http.server

    Image.open(PHOTO).resize((70, 42)).save(tmp_path / "web.png")
    (tmp_path / "big.bin").write_bytes(os.urandom(200_000))

    class Files(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **k):
            super().__init__(*a, directory=str(tmp_path), **k)

        def log_message(self, *a):
            pass

    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Files)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    silent = socket.socket()  # accepts connections and never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    served = InProcess(e2e_dir, "--allow-remote-images", "--max-image-mb", "0.1", "--remote-timeout", "1")
    try:
        assert served.url.startswith("http://127.0.0.1:")
        assert served.get("/v1/models", key=None)[0] == 200

        def ask(url):
            return served.post("/v1/chat/completions", {"max_tokens": NEW, "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "?"}]}]}, key=None)

        base = f"http://127.0.0.1:{web.server_address[1]}"
        status, _, body = ask(base + "/web.png")
        want = pipe.chat([{"role": "user", "content": [{"type": "image", "image": tmp_path / "web.png"},
                                                       {"type": "text", "text": "?"}]}], max_new_tokens=NEW)
        assert status == 200 and body["choices"][0]["message"]["content"] == want
        status, _, body = ask(base + "/big.bin")
        assert status == 413 and body["error"]["param"] == "messages[0].content[0].image_url.url"
        status, _, body = ask(f"http://127.0.0.1:{silent.getsockname()[1]}/x.png")
        assert status == 400 and "could not be fetched" in body["error"]["message"]
    finally:
        served.stop()
        web.shutdown()
        silent.close()


def test_two_ray_replicas_answer_alike(e2e_dir, pipe):
    """--replicas 2 under Ray Serve (on the CPU here): concurrent requests spread over both replicas (their
    /health answers come from two processes), every reply equal to Pipeline.chat alone; SIGTERM exits 0."""
    pytest.importorskip("ray.serve")
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "points", "serve", "--model", str(e2e_dir), "--port", str(port),
                             "--replicas", "2", "--max-batch", "2"], stderr=subprocess.PIPE, text=True)
    served = Served.__new__(Served)
    served.proc, served.lines, served.url = proc, [], f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    for line in proc.stderr:
        served.lines.append(line)
        if "replicas under Ray Serve" in line or time.time() > deadline:
            break
    threading.Thread(target=served._drain, daemon=True).start()
    try:
        assert any("replicas under Ray Serve" in line for line in served.lines), "".join(served.lines)
        pids = {served.get("/health", key=None)[2]["pid"] for _ in range(30)}
        assert len(pids) == 2
        convs, got = [_messages(i) for i in range(6)], [None] * 6

        def ask(i):
            got[i] = served.post("/v1/chat/completions", {"messages": convs[i], "max_tokens": NEW}, key=None)

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for (status, _, body), m in zip(got, convs):
            assert status == 200 and body["choices"][0]["message"]["content"] == pipe.chat(_ours(m), max_new_tokens=NEW)
    finally:
        assert served.stop() == 0
