"""Load generator for kvpage's OpenAI-compatible server, in the manner of ``vllm bench serve``.

Streams ``--num-prompts`` requests to ``/v1/completions`` (``--endpoint chat``: ``/v1/chat/completions``)
through the ``openai`` client: all at once (``--request-rate inf``, the default) or at a mean rate with
gamma-distributed gaps (``--burstiness`` is the shape; 1.0 is Poisson), at most ``--max-concurrency`` in
flight. Prompts are seeded random text of about ``--input-len`` words; with ``ignore_eos`` (the default)
each request generates exactly its ``max_tokens``. Per request: TTFT (until the first chunk with text),
ITL (gaps between chunks with text), TPOT ((E2EL - TTFT) / (output tokens - 1)), E2EL, and the token
counts of the final usage chunk, reported with vLLM's metric names; then the server's ``/metrics`` gauges,
polled for up to ~5 s until no KV page is in use. The exit status is non-zero if a request failed or a
KV page is still in use, so a run is also a check. ``--launch`` runs ``kvpage serve`` on a free loopback
port with the arguments after ``--``, waits for ``/health`` and stops it with SIGINT at the end.

    python benchmarks/serve_load.py [--base-url http://127.0.0.1:8000/v1] [--num-prompts 200]
        [--request-rate 20] [--max-concurrency 32] [--input-len 32 --output-len 32] [--json FILE]
    python benchmarks/serve_load.py --launch [options] -- --device cpu --max-num-seqs 64
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
import openai

WORDS = ("the", "and", "lord", "said", "unto", "him", "of", "God", "house", "king", "land", "people", "day",
         "he", "they", "shall", "for", "that", "is", "with", "a", "his", "all", "upon", "came", "men", "city")
PAGES_IN_USE = "kvpage:kv_pages_in_use"
GAUGES = (PAGES_IN_USE, "kvpage:kv_pages_free", "kvpage:kv_pages_cached_free", "kvpage:num_requests_running",
          "kvpage:num_requests_waiting", "kvpage:num_preemptions_total", "kvpage:recomputed_tokens_total")
TOTALS = (("Successful requests", "completed"), ("Failed requests", "errors"), ("Benchmark duration (s)", "duration"),
          ("Total input tokens", "total_input_tokens"), ("Total generated tokens", "total_output_tokens"),
          ("Request throughput (req/s)", "request_throughput"),
          ("Output token throughput (tok/s)", "output_throughput"),
          ("Total token throughput (tok/s)", "total_token_throughput"))
LATENCIES = (("ttft", "Time to First Token", "TTFT"), ("tpot", "Time per Output Token (excl. 1st token)", "TPOT"),
             ("itl", "Inter-token Latency", "ITL"), ("e2el", "End-to-end Latency", "E2EL"))


@dataclass
class RequestResult:
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    e2el: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""


@dataclass
class Workload:
    prompts: list[str]
    output_lens: list[int]
    arrivals: list[float]  # seconds after the start


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    argv = list(argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    own, server_args = argv[:cut], argv[cut + 1:]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--api-key", default="EMPTY")
    p.add_argument("--model", default=None, help="model name (default: the first of GET /v1/models)")
    p.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    p.add_argument("--num-prompts", type=int, default=200)
    p.add_argument("--request-rate", type=float, default=math.inf, help="requests/s (default inf: all at once)")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the gaps (1.0: Poisson)")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--input-len", type=int, default=32, help="prompt length in words")
    p.add_argument("--output-len", type=int, default=32, help="max_tokens of each request")
    p.add_argument("--range-ratio", type=float, default=0.0, help="lengths uniform in len*[1-r, 1+r]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false")
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout in seconds")
    p.add_argument("--json", dest="json_file", default=None, metavar="FILE", help="write the results as JSON")
    p.add_argument("--launch", action="store_true", help="start `kvpage serve` with the arguments after --")
    p.add_argument("--launch-timeout", type=float, default=600.0, help="seconds to wait for /health")
    args = p.parse_args(own)
    if not 0.0 <= args.range_ratio < 1.0 or min(args.burstiness, args.request_rate, args.num_prompts) <= 0:
        p.error("need 0 <= --range-ratio < 1 and a positive --burstiness, --request-rate and --num-prompts")
    if server_args and not args.launch:
        p.error("arguments after -- are for the server started by --launch")
    return args, server_args


def sample_lengths(rng: random.Random, mean: int, ratio: float, n: int) -> list[int]:
    low, high = max(1, math.floor(mean * (1 - ratio))), max(1, math.ceil(mean * (1 + ratio)))
    return [rng.randint(low, high) for _ in range(n)]


def build_workload(args: argparse.Namespace) -> Workload:
    rng = random.Random(args.seed)
    input_lens = sample_lengths(rng, args.input_len, args.range_ratio, args.num_prompts)
    output_lens = sample_lengths(rng, args.output_len, args.range_ratio, args.num_prompts)
    prompts = [" ".join(rng.choices(WORDS, k=n)) for n in input_lens]
    arrivals, t = [], 0.0
    for _ in range(args.num_prompts):
        arrivals.append(t)
        if not math.isinf(args.request_rate):  # mean gap 1/rate whatever the shape
            t += rng.gammavariate(args.burstiness, 1.0 / (args.request_rate * args.burstiness))
    return Workload(prompts, output_lens, arrivals)


async def open_stream(client: openai.AsyncOpenAI, args: argparse.Namespace, prompt: str, max_tokens: int) -> Any:
    common: dict[str, Any] = {"model": args.model, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
                              "stream_options": {"include_usage": True}, "extra_body": {"ignore_eos": args.ignore_eos}}
    if args.endpoint == "chat":
        return await client.chat.completions.create(messages=[{"role": "user", "content": prompt}], **common)
    return await client.completions.create(prompt=prompt, **common)


def chunk_text(chunk: Any) -> str:
    if not chunk.choices:
        return ""
    choice = chunk.choices[0]
    delta = getattr(choice, "delta", None)
    return (delta.content if delta is not None else choice.text) or ""


async def one_request(client: openai.AsyncOpenAI, args: argparse.Namespace, prompt: str,
                      max_tokens: int) -> RequestResult:
    result, first, usage = RequestResult(), None, None
    start = last = time.perf_counter()
    try:
        async with await open_stream(client, args, prompt, max_tokens) as stream:
            async for chunk in stream:
                now, usage = time.perf_counter(), chunk.usage or usage
                if not chunk_text(chunk):
                    continue
                if first is None:
                    first = result.ttft = now - start
                else:
                    result.itl.append(now - last)
                last = now
        result.e2el = time.perf_counter() - start
        if usage is not None:
            result.prompt_tokens, result.output_tokens = usage.prompt_tokens, usage.completion_tokens
        if first is None or result.output_tokens <= 0:
            result.error = "no text in the response" if first is None else "no usage chunk (or 0 completion tokens)"
    except Exception as exc:  # noqa: BLE001 - any failure is this request's error, reported at the end
        result.error = f"{type(exc).__name__}: {exc}"
    return result


async def run_load(args: argparse.Namespace, work: Workload) -> tuple[list[RequestResult], float]:
    client = openai.AsyncOpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0, timeout=args.timeout)
    limit = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else contextlib.nullcontext()
    start = time.perf_counter()

    async def send(i: int) -> RequestResult:
        await asyncio.sleep(max(0.0, start + work.arrivals[i] - time.perf_counter()))
        async with limit:
            return await one_request(client, args, work.prompts[i], work.output_lens[i])

    results = await asyncio.gather(*(send(i) for i in range(len(work.prompts))))
    duration = time.perf_counter() - start
    await client.close()
    return list(results), duration


def latency_stats(name: str, seconds: list[float]) -> dict[str, float | None]:
    ms = np.array(seconds) * 1000.0
    values = [float(np.mean(ms)), *map(float, np.percentile(ms, [50, 90, 99]))] if len(ms) else [None] * 4
    return {f"{key}_{name}_ms": value for key, value in zip(("mean", "median", "p90", "p99"), values)}


def summarize(results: list[RequestResult], duration: float) -> dict[str, Any]:
    ok = [r for r in results if not r.error]
    total_in, total_out = sum(r.prompt_tokens for r in ok), sum(r.output_tokens for r in ok)
    summary: dict[str, Any] = {
        "completed": len(ok), "errors": len(results) - len(ok), "duration": duration,
        "total_input_tokens": total_in, "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration, "output_throughput": total_out / duration,
        "total_token_throughput": (total_in + total_out) / duration}
    samples = {"ttft": [r.ttft for r in ok], "e2el": [r.e2el for r in ok], "itl": [x for r in ok for x in r.itl],
               "tpot": [(r.e2el - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]}
    for name, _, _ in LATENCIES:
        summary.update(latency_stats(name, samples[name]))
    summary["error_messages"] = [r.error for r in results if r.error][:10]
    return summary


def parse_gauges(text: str) -> dict[str, float | None]:
    """Sum each wanted metric over its label sets in Prometheus text; None where absent."""
    values: dict[str, float | None] = dict.fromkeys(GAUGES)
    for line in text.splitlines():
        match = re.match(r"\s*([^\s{#]+)(\{.*\})?\s+(\S+)", line)
        if match and match.group(1) in values:
            try:
                values[match.group(1)] = (values[match.group(1)] or 0.0) + float(match.group(3))
            except ValueError:
                pass
    return {k: int(v) if v is not None and v.is_integer() else v for k, v in values.items()}


async def server_gauges(root: str, wait_s: float = 5.0) -> dict[str, float | None]:
    """The gauges, polled until no KV page is in use or ``wait_s`` has passed (pages free asynchronously)."""
    deadline = time.monotonic() + wait_s
    async with httpx.AsyncClient(timeout=5.0) as http:
        while True:
            try:
                response = await http.get(f"{root}/metrics")
                gauges = parse_gauges(response.text) if response.status_code == 200 else dict.fromkeys(GAUGES)
            except httpx.HTTPError:
                gauges = dict.fromkeys(GAUGES)
            if gauges[PAGES_IN_USE] == 0 or time.monotonic() >= deadline:
                return gauges
            await asyncio.sleep(0.2)


def print_report(s: dict[str, Any]) -> None:
    def row(label: str, value: Any) -> None:
        text = "null" if value is None else f"{value:.2f}" if isinstance(value, float) else str(value)
        print(f"{label + ':':<40}{text:>12}")

    print(f"{' Serving Benchmark Result ':=^52}")
    for label, key in TOTALS:
        row(label, s[key])
    for name, title, short in LATENCIES:
        print(f"{title:-^52}")
        for key, word in (("mean", "Mean"), ("median", "Median"), ("p90", "P90"), ("p99", "P99")):
            row(f"{word} {short} (ms)", s[f"{key}_{name}_ms"])
    print(f"{'Server metrics (after the run)':-^52}")
    for name in GAUGES:
        row(name, s["server_metrics"][name])
    print("=" * 52)
    missing = " (kvpage:kv_pages_in_use not reported)" if s["pages_in_use_at_end"] is None else ""
    print(f"all pages free: {'yes' if s['all_pages_free'] else 'no'}{missing}")
    for message in s["error_messages"]:
        print(f"error: {message}", file=sys.stderr)


@contextlib.contextmanager
def launched_server(args: argparse.Namespace, server_args: list[str]) -> Iterator[None]:
    """With ``--launch``: run ``kvpage serve`` until /health answers 200, point ``args.base_url`` at it."""
    if not args.launch:
        yield
        return
    with socket.socket() as sock:  # a free port (a small race with other programs is accepted)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "kvpage.cli", "serve", "--host", "127.0.0.1", "--port", str(port), *server_args]
    with tempfile.TemporaryFile() as log:
        # Own session: a Ctrl-C reaches only us and we pass on one SIGINT, not ignored in the child (`&`).
        previous = signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            signal.signal(signal.SIGINT, previous)
        try:
            deadline = time.monotonic() + args.launch_timeout
            while not healthy(port):
                if proc.poll() is not None or time.monotonic() > deadline:
                    stop_server(proc)
                    log.seek(0)
                    tail = "\n".join(log.read().decode(errors="replace").splitlines()[-40:])
                    raise RuntimeError(f"`{' '.join(command)}` did not become healthy; its output ends:\n{tail}")
                time.sleep(0.25)
            args.base_url = f"http://127.0.0.1:{port}/v1"
            yield
        finally:
            stop_server(proc)


def healthy(port: int) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2.0).status_code == 200
    return False


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    if args.model is None:
        try:
            models = httpx.get(f"{args.base_url}/models", headers={"Authorization": f"Bearer {args.api_key}"},
                               timeout=30)
            args.model = models.raise_for_status().json()["data"][0]["id"]
        except (httpx.HTTPError, ValueError, KeyError, IndexError) as exc:
            raise RuntimeError(f"no model from GET {args.base_url}/models ({type(exc).__name__}: {exc})") from exc
    results, duration = asyncio.run(run_load(args, build_workload(args)))
    summary = summarize(results, duration)
    gauges = asyncio.run(server_gauges(args.base_url.rstrip("/").removesuffix("/v1")))
    summary.update(server_metrics=gauges, pages_in_use_at_end=gauges[PAGES_IN_USE],
                   all_pages_free=gauges[PAGES_IN_USE] == 0)
    config = {k: v for k, v in vars(args).items() if k not in ("api_key", "json_file")}
    summary["config"] = {k: (str(v) if isinstance(v, float) and math.isinf(v) else v) for k, v in config.items()}
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    args, server_args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        with launched_server(args, server_args):
            summary = benchmark(args)
    except RuntimeError as exc:
        print(f"serve_load: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("serve_load: interrupted", file=sys.stderr)
        return 130
    if args.json_file:
        with open(args.json_file, "w") as f:
            json.dump(summary, f, indent=2)
    print_report(summary)
    return 0 if summary["errors"] == 0 and summary["all_pages_free"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
