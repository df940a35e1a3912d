"""`points serve`: an OpenAI-compatible HTTP server on the continuous-batching scheduler (an ASGI app on
Starlette, served by uvicorn; `pip install 'points[serve]'`).

    points serve --model DIR [--host 127.0.0.1] [--port 8000] [--max-batch 8] [--max-queue 64] [--api-key KEY]
                 [--preset NAME]

Routes: POST /v1/chat/completions (the Chat Completions API, streamed as server-sent events with
"stream": true), GET /v1/models, GET /health (no key needed), and the official WePOINTS server's POST /chat
(its body and its answer). Every request is one row of the scheduler (points.runtime.scheduler), so
concurrent requests decode together; a greedy reply equals `Pipeline.chat` of the same conversation alone.

Presets (an extension): a request's "preset" field names one of the model's presets (POINTS-Reader's
"reader", POINTS-GUI-G's "gui"; GET /v1/models lists them beside the model's "member"), applied as
`Pipeline.chat(..., preset=)` applies it: its system turn, its prompt for a user turn of images only, its
decoding settings as the defaults under the request's own fields. `--preset NAME` is the preset of every
request that names none (on /chat too). A name the model lacks is a 400 naming the field "preset".

Safe by default: it binds 127.0.0.1; with --api-key every route but /health needs `Authorization: Bearer KEY`
(the scheme in any case, the key compared exactly, in constant time; an empty key, or one with a character
outside visible ASCII, is refused at start); a body over --max-body-mb is refused (413) before it is read
whole; images come as `data:image/...;base64,...` URLs (bytes counted before decoding, pixels checked from the
header before decoding: points.io.processor), `http(s)://` only with --allow-remote-images (size and time
bounded), local paths or `file://` only inside --allow-local-images DIR (resolved, links included, never
outside it). A bad request is a 400 JSON error naming the field (`{"error": {"message", "type", "param",
"code"}}`): a field of the wrong type, an OpenAI field not supported yet (FIELDS: every OpenAI field is
listed, with the values accepted), two fields of one setting that disagree. A field that is neither OpenAI's
nor an extension here is ignored with a log line, as vLLM does (the official /chat route refuses it).
Extensions, as SGLang takes them (POINTS-Reader's model card sends them): top_k, min_p, repetition_penalty,
max_new_tokens (max_tokens' other name), do_sample (false: greedy; true: the temperature given, else the
preset's, else 1), preset. logprobs / top_logprobs: the model's own log-probabilities (points.runtime.sampling). n (1-16): the
choices share one prefill and one vision encoding through the prefix cache, choice k seeded seed + k. More than
--max-batch running + --max-queue waiting requests (a request counts its n) is 429 with Retry-After; never a 500 for bad input. SIGTERM: no new
connections, running requests get --grace-seconds to finish, then the server ends them (a stream's last chunk
says finish_reason "length", then `data: [DONE]`) and exits 0. A client that disconnects has its request
cancelled within one step.

For the operator (points.tooling.metrics): every request that ran leaves one line on stderr under its id (the
response's `id`): route, finish reason, prompt / cached / completion tokens, time to first token and in all;
`usage.prompt_tokens_details.cached_tokens` says how many prompt tokens the prefix cache saved; `GET /metrics`
is Prometheus' text format (queue, busy rows, tokens, prefix-cache hits, time to first token, time per output
token, the vision encoder's time), behind the key like every route but /health; under --replicas each replica
counts its own.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

from points.tooling.app import Server
from points.tooling.images import MIB, Images
from points.tooling.protocol import (FIELDS, OFFICIAL_FIELDS, ApiError, Field, generation_of, ignored_fields,
                                     messages_of, pixel_bounds)

# (the request's protocol, the image policy and the app live in rooms of their own; their names stay importable
# from the command's module)
__all__ = ["FIELDS", "OFFICIAL_FIELDS", "ApiError", "Field", "Images", "MIB", "Server", "build", "generation_of",
           "http_server", "ignored_fields", "main", "messages_of", "parser", "pixel_bounds", "run", "run_ray"]

API_KEY = re.compile(r"[!-~]+")  # visible ASCII: a key any client's header can carry unchanged
CLOSE_AFTER_S = 5.0  # SIGTERM: after the grace period, the seconds before connections still open are closed
_pixel_bounds = pixel_bounds


def parser() -> argparse.ArgumentParser:
    from points.tooling.options import add_prefill_option, add_preset_option, add_weight_options

    p = argparse.ArgumentParser(prog="points serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint directory (released layout or ours)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="default: %(default)s (0: any free port)")
    add_weight_options(p)
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    p.add_argument("--max-batch", type=int, default=8, help="rows decoded at once (default: %(default)s)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests that may wait for a row, beyond the --max-batch running; beyond it 429 with "
                        "Retry-After (default: %(default)s)")
    p.add_argument("--max-body-mb", type=float, default=20, help="request body limit, MiB (default: %(default)s)")
    p.add_argument("--max-image-mb", type=float, default=None, help="one image's limit, MiB (default: the body's)")
    p.add_argument("--api-key", default=None,
                   help="require `Authorization: Bearer KEY`, KEY in visible ASCII (default: $POINTS_API_KEY, else "
                        "no key)")
    p.add_argument("--served-model-name", default=None, help="the model's name in the API (default: the directory's)")
    p.add_argument("--allow-remote-images", action="store_true",
                   help="fetch http(s) image URLs (off: a server that fetches what clients name can be aimed at its "
                        "own network)")
    p.add_argument("--allow-local-images", type=Path, default=None, metavar="DIR",
                   help="accept local paths and file:// image URLs inside DIR only")
    p.add_argument("--remote-timeout", type=float, default=10.0, help="seconds for a remote image (default: %(default)s)")
    p.add_argument("--grace-seconds", type=float, default=30.0,
                   help="SIGTERM: how long running requests may take to finish; then they are ended, finish_reason "
                        "\"length\" (default: %(default)s)")
    p.add_argument("--no-prefix-cache", action="store_true", help="prefill every request from scratch")
    p.add_argument("--vision-cache-mb", type=float, default=256,
                   help="image features kept by the image's content, shared by every request (0: none; default "
                        "%(default)s)")
    add_prefill_option(p)
    p.add_argument("--speculative", default=None, metavar="ngram[:K]",
                   help="speculative decoding for every request: K tokens (default 4) drafted from n-gram matches "
                        "in its prompt and output, verified in one forward; greedy output unchanged (a request's "
                        "\"speculative\" field overrides it; default: off)")
    add_preset_option(p, "; the preset of every request whose \"preset\" field names none")
    p.add_argument("--replicas", type=int, default=None,
                   help="N model replicas under Ray Serve (one per GPU on CUDA; pip install 'points[ray]'), routed "
                        "to the least loaded; default: one process, no Ray")
    return p


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    from points.tooling.options import check_weight_options, exit_code

    check_weight_options(p, args)
    for flag, value, low in (("--max-batch", args.max_batch, 1), ("--max-queue", args.max_queue, 1),
                             ("--port", args.port, 0), ("--replicas", args.replicas, 1),
                             ("--max-prefill-tokens", args.max_prefill_tokens, 1)):
        if value is not None and value < low:
            p.error(f"{flag} {value}: expected an integer >= {low}")
    from points.runtime.speculative import drafter  # (imports torch: after --help)

    try:
        drafter(args.speculative)
    except ValueError as e:
        p.error(f"--speculative {args.speculative}: {str(e).split(': ', 1)[-1]}")
    if not 0 <= args.vision_cache_mb < 1 << 30:
        p.error(f"--vision-cache-mb {args.vision_cache_mb:g}: expected a number of MiB >= 0 (0: no cache)")
    if not args.max_body_mb > 0 or (args.max_image_mb is not None and not args.max_image_mb > 0):
        p.error("--max-body-mb and --max-image-mb must be > 0")
    if args.allow_local_images is not None and not args.allow_local_images.is_dir():
        p.error(f"--allow-local-images {args.allow_local_images}: not a directory")
    return exit_code(lambda: _serve(args))


def _serve(args) -> int:
    where = "--api-key" if args.api_key is not None else "POINTS_API_KEY"
    if args.api_key is None:
        args.api_key = os.environ.get("POINTS_API_KEY")
    if args.api_key is not None and not API_KEY.fullmatch(args.api_key):  # (an open server, or a key no one can send)
        raise ValueError(f"{where} is empty: give a key, or none at all to serve without one" if not args.api_key else
                         f"{where} has a character outside visible ASCII (a space, a control or a non-ASCII "
                         "character): no client's Authorization header can carry it")
    try:
        import uvicorn  # noqa: F401
        import starlette  # noqa: F401
        import prometheus_client  # noqa: F401
    except ImportError as e:
        raise ValueError(f"points serve needs the serving extra ({e.name} is missing): pip install "
                         "'points[serve]'") from None
    if args.replicas is not None:
        return run_ray(args)
    return run(build(vars(args)), args.host, args.port, args.grace_seconds)


def build(options: dict) -> Server:
    """The pipeline and the app's state from `points serve`'s options (as a dict: it travels to Ray replicas)."""
    import points

    from points.tooling.options import check_preset, quantize_options

    o = argparse.Namespace(**options)
    check_preset(o.model, o.preset)  # (before the weights load)
    pipe = points.load(o.model, device=o.device, dtype=o.dtype,
                       **quantize_options(o), compile=o.compile,
                       prefix_cache=not o.no_prefix_cache, max_batch=o.max_batch,
                       vision_cache_mb=o.vision_cache_mb, max_prefill_tokens=o.max_prefill_tokens,
                       speculative=o.speculative)
    body = int(o.max_body_mb * MIB)
    images = Images(int(o.max_image_mb * MIB) if o.max_image_mb else body, o.allow_remote_images,
                    o.allow_local_images, o.remote_timeout)
    name = o.served_model_name or Path(o.model).resolve().name
    return Server(pipe, name, api_key=o.api_key, max_body_bytes=body, images=images, max_queue=o.max_queue,
                  preset=o.preset)


def run_ray(args) -> int:
    """--replicas N: the same app in N Ray Serve replicas (each its own model and scheduler) behind Ray's
    proxy, which routes each request to a replica with few requests in flight; SIGTERM shuts Serve down."""
    try:
        import ray
        from ray import serve
    except ImportError:
        raise ValueError("--replicas needs Ray Serve: pip install 'points[ray]'") from None
    options = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    cuda = args.device.startswith("cuda")

    def replica_app():  # runs on each replica
        server = build(options)
        server.scheduler.start()  # (whether or not the proxy runs the app's lifespan)
        return server.app()

    resources = {"num_gpus": 1} if cuda else {"num_cpus": 0}
    deployment = serve.deployment(serve.ingress(replica_app)(type("PointsReplica", (), {})), name="points",
                                  num_replicas=args.replicas, ray_actor_options=resources,
                                  max_ongoing_requests=args.max_batch + args.max_queue)
    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(deployment.bind(), route_prefix="/")
        name = args.served_model_name or Path(args.model).resolve().name
        print(f"points serve: {name} on http://{args.host}:{args.port} ({args.replicas} replicas under Ray Serve, max "
              f"batch {args.max_batch} each, key {'required' if args.api_key else 'not required'})", file=sys.stderr,
              flush=True)
        stop.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        serve.shutdown()
        ray.shutdown()
    print("points serve: stopped", file=sys.stderr, flush=True)
    return 0


def http_server(server: Server, host: str, port: int, grace: float):
    """The app under uvicorn, whose graceful shutdown (SIGTERM, Ctrl-C, `should_exit`) stops accepting
    connections and waits for the running requests; `grace` seconds later the server ends them itself (each
    gets its last chunk or its answer; uvicorn would cancel their tasks: streams cut, a traceback each), and
    CLOSE_AFTER_S later it closes the connections still open (a body still arriving: its task sees a
    disconnect)."""
    import uvicorn

    class Http(uvicorn.Server):
        async def shutdown(self, sockets=None):
            loop = asyncio.get_running_loop()
            timers = [loop.call_later(grace, server.end_requests),
                      loop.call_later(grace + CLOSE_AFTER_S, self.close_connections)]
            try:
                await super().shutdown(sockets)
            finally:
                for timer in timers:
                    timer.cancel()

        def close_connections(self):
            for connection in list(self.server_state.connections):
                connection.transport.close()

    config = uvicorn.Config(server.app(), host=host, port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=grace + 2 * CLOSE_AFTER_S, lifespan="on")
    return Http(config)


def run(server: Server, host: str, port: int, grace: float) -> int:
    """Serve until SIGTERM / Ctrl-C (http_server's graceful shutdown); one line with the address once requests
    are accepted."""
    http = http_server(server, host, port, grace)

    def announce():
        while not http.started and not http.should_exit:
            time.sleep(0.02)
        if http.started:
            bound = http.servers[0].sockets[0].getsockname()
            where = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
            print(f"points serve: {server.name} on http://{where}:{bound[1]} (max batch {server.scheduler.max_batch}, "
                  f"key {'required' if server.api_key else 'not required'})", file=sys.stderr, flush=True)

    threading.Thread(target=announce, daemon=True).start()
    stopped = []
    # uvicorn shuts down gracefully on SIGTERM, then raises the signal again to the handler it found: this one
    # records it, so that a graceful stop exits 0
    previous = signal.signal(signal.SIGTERM, lambda *_: stopped.append(1))
    try:
        http.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
    print("points serve: stopped" + (" (SIGTERM)" if stopped else ""), file=sys.stderr, flush=True)
    return 0
