#!/usr/bin/env python3
"""`points serve` under concurrent clients: generated tokens/s and time to first token (p50 / p95) at 1, 4,
8 and 16 clients, against the same server with --max-batch 1 (the official server's behaviour: one request
at a time per model instance), in the same sitting; or a soak (--soak SECONDS): many clients for a while,
every answer counted, the server's resident memory sampled.

    python tools/bench_serve.py                                   # small preset, bf16, CPU
    python tools/bench_serve.py --preset tiny --dtype float32 --requests 4 --clients 1 4
    python tools/bench_serve.py --preset tiny --soak 120 --clients 32     # the load test
    python tools/bench_serve.py --preset 7b --device cuda --dtype bfloat16 --clients 1 8 16   # a lent GPU

The server is a real `points serve` process on a free loopback port (random weights of the preset in the
released layout, points.tooling.synthetic); the clients are threads using the `openai` package, each
sending --requests streamed requests one after another (prompts of 20-200 words, --max-tokens each,
greedy). Time to first token: from sending a request to its first content chunk. The prefill floor printed
beside it is 2 x the decoder's parameters x the mean prompt length over the matmul rate measured here.
A benchmark, not a test: compare within one run.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from points.io.checkpoint import DTYPES
from points.tooling.measure import machine, matmul_rate
from points.tooling.synthetic import SHAPES, checkpoint_in

WORDS = ("river mountain light question answer window garden music paper story city water stone morning "
         "evening journey number colour").split()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(model: Path, *flags: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "points", "serve", "--model", str(model), "--port",
                             str(_free_port()), *flags], stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        found = re.search(r"http://[0-9.]+:\d+", line)
        if found:
            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
            return proc, found.group(0)
    raise SystemExit(f"the server did not start (exit {proc.wait()})")


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def prompt(rng: random.Random) -> list[dict]:
    words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 200)))
    return [{"role": "user", "content": f"{words}. Summarise."}]


def one(client, name: str, messages, max_tokens: int) -> dict:
    """One streamed request -> its status, time to first token, tokens and time."""
    import openai

    start_t = time.perf_counter()
    first, tokens = None, 0
    try:
        stream = client.chat.completions.create(model=name, messages=messages, max_tokens=max_tokens, stream=True,
                                                stream_options={"include_usage": True})
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content and first is None:
                first = time.perf_counter() - start_t
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
    except openai.APIStatusError as e:
        return {"status": e.status_code, "s": time.perf_counter() - start_t}
    except openai.APIConnectionError:
        return {"status": "connection", "s": time.perf_counter() - start_t}
    return {"status": 200, "ttft": first if first is not None else time.perf_counter() - start_t,
            "tokens": tokens, "s": time.perf_counter() - start_t}


def clients_run(url: str, name: str, clients: int, requests: int | None, seconds: float | None,
                max_tokens: int, seed: int) -> tuple[list[dict], float]:
    """`clients` threads, each sending requests one after another (`requests` each, or until `seconds`)."""
    import openai

    results, lock = [], threading.Lock()
    end = time.perf_counter() + seconds if seconds else None

    def client_loop(k: int):
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
        rng = random.Random(seed * 1000 + k)
        n = 0
        while (requests is not None and n < requests) or (end is not None and time.perf_counter() < end):
            got = one(client, name, prompt(rng), max_tokens)
            with lock:
                results.append(got)
            n += 1
            if got["status"] == 429:
                time.sleep(0.2)  # the server said Retry-After

    threads = [threading.Thread(target=client_loop, args=(k,)) for k in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.perf_counter() - t0


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(SHAPES), default="small")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--requests", type=int, default=4, help="requests per client (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-batch", type=int, default=16, help="the batched server's rows (default: %(default)s)")
    p.add_argument("--no-baseline", action="store_true",
                   help="only the batched server (not the --max-batch 1 one beside it)")
    p.add_argument("--server-flags", default="", help="more flags for the batched server, e.g. "
                   "\"--max-prefill-tokens 256\" (default: none)")
    p.add_argument("--soak", type=float, default=None, metavar="SECONDS",
                   help="instead: the batched server under --clients[0] clients for SECONDS")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    dtype = DTYPES[args.dtype]
    work = args.workdir or Path(tempfile.mkdtemp(prefix="points-bench-serve-"))
    model = checkpoint_in(work, args.preset, dtype)
    info = machine(torch.device(args.device))
    serve_flags = ["--device", args.device, "--dtype", args.dtype]
    result = {"machine": info, "preset": args.preset, "dtype": args.dtype, "max_tokens": args.max_tokens, "rows": []}
    where = info.get("gpu") or f"{info['cpu']}, {info.get('threads')} threads"
    if args.soak:
        proc, url = start(model, *serve_flags, "--max-batch", str(args.max_batch), "--max-queue", "16")
        try:
            samples, stop = [], threading.Event()

            def sample():
                while not stop.wait(1.0):
                    samples.append(rss(proc.pid))

            threading.Thread(target=sample, daemon=True).start()
            got, wall = clients_run(url, model.name, args.clients[0], None, args.soak, args.max_tokens, 1)
            stop.set()
        finally:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=120)
        counts = {str(k): sum(1 for r in got if r["status"] == k) for k in sorted({r["status"] for r in got}, key=str)}
        third = max(1, len(samples) // 3)
        soak = {"clients": args.clients[0], "seconds": wall, "requests": len(got), "by_status": counts,
                "rss_first_third_mb": statistics.mean(samples[:third]) / 2**20,
                "rss_last_third_mb": statistics.mean(samples[-third:]) / 2**20, "rss_max_mb": max(samples) / 2**20,
                "exit_code": code, "tokens_per_s": sum(r.get("tokens", 0) for r in got) / wall,
                "rss_mb_every_10_s": [round(x / 2**20) for x in samples[::10]]}
        result["soak"] = soak
        print(f"points serve soak, preset {args.preset}, {args.dtype} on {where}: {args.clients[0]} clients for "
              f"{wall:.0f} s: {len(got)} requests, by status {counts}; {soak['tokens_per_s']:.1f} tok/s; server RSS "
              f"{soak['rss_first_third_mb']:.0f} MB (first third) -> {soak['rss_last_third_mb']:.0f} MB (last third),"
              f" max {soak['rss_max_mb']:.0f} MB (every 10 s: {soak['rss_mb_every_10_s']}); exit {code} after SIGTERM")
    else:
        import points

        decoder = points.load_decoder(model, dtype=dtype)
        params = sum(m.weight.numel() for n, m in decoder.named_modules()
                     if isinstance(m, torch.nn.Linear) and n != "lm_head")
        d = decoder.cfg
        del decoder
        rate = matmul_rate(2048, d.hidden_size, d.ffn_size, dtype, torch.device(args.device))
        print(f"points serve under concurrent clients: preset {args.preset}, {args.dtype} on {where}, torch "
              f"{torch.__version__}; {args.requests} streamed requests per client, {args.max_tokens} tokens each, "
              f"greedy; matmul rate {rate / 1e9:.0f} GFLOP/s")
        print(f"{'server':16} {'clients':>7} {'tok/s':>8} {'req/s':>7} {'TTFT p50':>9} {'TTFT p95':>9} "
              f"{'prefill floor':>13}  status")
        servers = [(f"--max-batch {args.max_batch}", args.max_batch)] + ([] if args.no_baseline else
                                                                         [("--max-batch 1", 1)])
        for label, batch in servers:
            extra = args.server_flags.split() if batch == args.max_batch else []
            proc, url = start(model, *serve_flags, "--max-batch", str(batch), "--max-queue", "256", *extra)
            try:
                clients_run(url, model.name, 1, 1, None, 4, 99)  # warm-up
                for c in args.clients:
                    got, wall = clients_run(url, model.name, c, args.requests, None, args.max_tokens, c)
                    ok = [r for r in got if r["status"] == 200]
                    tokens = sum(r["tokens"] for r in ok)
                    ttft = [r["ttft"] for r in ok]
                    rng = random.Random(0)
                    mean_words = statistics.mean(len(prompt(rng)[0]["content"].split()) for _ in range(200))
                    floor = 2 * params * (mean_words + 20) / rate  # (+ the template, about 20 tokens)
                    row = {"server": label, "max_batch": batch, "clients": c, "requests": len(got), "ok": len(ok),
                           "seconds": wall, "tokens": tokens, "tokens_per_s": tokens / wall,
                           "requests_per_s": len(ok) / wall, "ttft_p50_s": pct(ttft, 0.5),
                           "ttft_p95_s": pct(ttft, 0.95), "prefill_floor_s": floor}
                    result["rows"].append(row)
                    print(f"{label:16} {c:7d} {row['tokens_per_s']:8.1f} {row['requests_per_s']:7.2f} "
                          f"{row['ttft_p50_s']:8.2f}s {row['ttft_p95_s']:8.2f}s {floor:12.3f}s  "
                          f"{len(ok)}/{len(got)} ok", flush=True)
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=120)
        by = {(r["max_batch"], r["clients"]): r for r in result["rows"]}
        for c in args.clients:
            if (args.max_batch, c) in by and (1, c) in by:
                ratio = by[(args.max_batch, c)]["tokens_per_s"] / by[(1, c)]["tokens_per_s"]
                result.setdefault("ratios", {})[str(c)] = ratio
                print(f"  {c} clients: batched {ratio:.2f}x the one-at-a-time server's tokens/s")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
