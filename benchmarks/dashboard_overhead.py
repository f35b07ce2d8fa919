"""What a connected dashboard costs the engine: step time at N running requests, watched and unwatched.

The real server (uvicorn, in this process) runs N decoding requests of a tiny
random model, added on its engine loop with no client waiting for their
tokens, so the step is mostly the engine's own host work, the part a
dashboard competes with.  Windows of ``--window`` seconds alternate between
no dashboard client and one client reading ``/dashboard/api/stream`` (10
frames a second, each parsed as the page would), ``--rounds`` times each;
each window's figure is its median step-to-step interval, and the result
the median, over rounds, of the watched/unwatched ratio of adjacent windows
(the order alternates, so the steps' slow growth with context falls on both).

    python benchmarks/dashboard_overhead.py [--requests 256] [--context 256] [--window 3] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import torch
import uvicorn
from step_overhead import MAX_MODEL_LEN, tiny_model  # noqa: I001 - benchmarks/ is the script's directory

from kvpage import SamplingParams
from kvpage.server.launch import ServeOptions, build_app


def serve(options: dict[str, Any]) -> tuple[str, Any, uvicorn.Server]:
    """The real app under uvicorn on a free loopback port, in a thread: (root url, its AsyncEngine, the server)."""
    app, engine = build_app(options, ServeOptions())
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.01)
    return f"http://127.0.0.1:{sock.getsockname()[1]}", engine, server


class StepIntervals:
    """The engine loop's step-to-step intervals: the engine's ``step`` wrapped to note when each one starts.

    The interval covers everything the loop does per step (the step, telemetry, the dashboard's frame,
    outputs), and its median ignores the VM's bursts (garbage collection, CPU steal) that a window mean picks up.
    """

    def __init__(self, llm: Any) -> None:
        self.starts: list[float] = []
        step = llm.step

        def timed() -> Any:
            self.starts.append(time.perf_counter())
            return step()

        llm.step = timed

    def window(self, seconds: float) -> float:
        """The median step interval (ms) over the next ``seconds``."""
        first = len(self.starts)
        time.sleep(seconds)
        starts = self.starts[first:]
        return statistics.median(b - a for a, b in zip(starts, starts[1:])) * 1e3


def watch(root: str) -> None:
    """The dashboard client, in a process of its own: one line of output per frame.

    It only counts the frames: a browser parses them in its own process, usually on another machine, and
    on a 2-core machine a client that parses 100 kB of JSON a frame takes CPU time from the engine.
    """
    with httpx.Client(base_url=root, timeout=60) as http, http.stream("GET", "/dashboard/api/stream") as stream:
        for chunk in stream.iter_raw():
            for _ in range(chunk.count(b"data: ")):
                print(time.monotonic(), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--window", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--watch", default=None, help=argparse.SUPPRESS)  # run as the client of this server
    args = parser.parse_args()
    if args.watch:
        watch(args.watch)
        return
    with tempfile.TemporaryDirectory() as tmp:
        model = tiny_model(Path(tmp) / "tiny")
        # One torch thread (the tiny model gains nothing from two): the other core serves the server's
        # event loop thread and the client, so the comparison is of the engine's work, not of a crowded CPU.
        torch.set_num_threads(1)
        n, block = args.requests, 16
        root, engine, server = serve({"model": str(model), "device": "cpu", "block_size": block, "max_num_seqs": n,
                                      "num_kv_blocks": n * (MAX_MODEL_LEN // block) + 64,
                                      "max_num_batched_tokens": 16384})
        print(f"python {platform.python_version()}, torch {torch.__version__}, {platform.machine()}, "
              f"{torch.get_num_threads()} threads; {n} requests of {args.context} prompt tokens, tiny model")

        def add_all(llm: Any) -> None:
            params = SamplingParams(max_tokens=MAX_MODEL_LEN - args.context, ignore_eos=True)
            for i in range(n):
                llm.add_request(f"r{i}", [(i * 7 + j) % 250 + 3 for j in range(args.context)], params)

        # Added on the engine loop with no client waiting for their tokens: the step is the engine's own
        # (an HTTP client per request would add 256 response streams to the server's event loop).
        asyncio.run(engine.call(add_all))
        while len(engine.engine.scheduler.running) < n or engine.engine.scheduler.running[-1].num_output_tokens < 2:
            time.sleep(0.1)
        intervals = StepIntervals(engine.engine)
        results: dict[str, list[float]] = {"unwatched": [], "watched": []}
        frame_rates = []
        def watched() -> float:
            client = subprocess.Popen([sys.executable, __file__, "--watch", root], stdout=subprocess.PIPE, text=True)
            time.sleep(1.0)  # connected and streaming
            began = time.monotonic()
            measured = intervals.window(args.window)
            ended = time.monotonic()
            client.terminate()
            received = [float(line) for line in client.communicate()[0].split()]
            frame_rates.append(sum(began <= t <= ended for t in received) / (ended - began))
            return measured

        def unwatched() -> float:
            time.sleep(1.0)  # as long as the client's start, so that both kinds see the same drift
            return intervals.window(args.window)

        # The step slows as contexts grow: rounds alternate the order (ABBA), so the drift falls on both kinds.
        ratios = []
        for round_ in range(args.rounds):
            order = (("unwatched", unwatched), ("watched", watched))
            for kind, measure in order if round_ % 2 == 0 else order[::-1]:
                results[kind].append(measure())
            ratios.append(results["watched"][-1] / results["unwatched"][-1])
        assert len(engine.engine.scheduler.running) == n, "a request finished during the measurement"
        for kind, windows in results.items():
            print(f"{kind:9s}: median step {statistics.median(windows):.2f} ms (windows: "
                  f"{', '.join(f'{w:.1f}' for w in windows)})")
        print(f"watched / unwatched step: median of rounds {statistics.median(ratios):.3f}, mean "
              f"{statistics.mean(ratios):.3f} ({', '.join(f'{r:.3f}' for r in ratios)})")
        print(f"frames received: {statistics.median(frame_rates):.1f}/s")

        def cost(llm: Any) -> tuple[float, float]:
            start = time.perf_counter()
            frame = llm.frame()
            captured = time.perf_counter()
            frame.encoded()
            return (captured - start) * 1e3, frame.encode_s * 1e3

        capture_ms, encode_ms = (statistics.median(c) for c in zip(*(asyncio.run(engine.call(cost))
                                                                    for _ in range(20))))
        pages = engine.engine.kv.num_pages
        print(f"a frame of {pages} pages and {n} requests: capture {capture_ms:.2f} ms (engine loop), JSON "
              f"{encode_ms:.2f} ms (event loop thread); at {statistics.median(frame_rates):.1f} frames/s that is "
              f"{(capture_ms + encode_ms) * statistics.median(frame_rates) / 10:.2f}% of the wall time")
        server.should_exit = True
        engine.shutdown(timeout=2)


if __name__ == "__main__":
    main()
