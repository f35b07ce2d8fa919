"""An eviction storm on the live dashboard, photographed: the screenshot in docs/dashboard.png.

Serves the demo model with a cache too small for its traffic (``--pages``
pages of 16 tokens): ``--requests`` chat-like requests that share a long
system prompt arrive at once, with long answers, so they preempt each other
by recompute and evict each other's cached prefix pages until the engine
warns that it thrashes.  Headless Chromium (Debian's chromium and
chromium-driver, through selenium) watches ``/dashboard``; once the warning
is on, one request is selected and the page is saved.  What the engine
counted is printed beside it, to read the picture by (docs/dashboard.md).

    python benchmarks/dashboard_storm.py [--pages 96] [--requests 24] [--max-tokens 320] [--out docs/dashboard.png]
"""

from __future__ import annotations

import argparse
import threading
import time
from typing import Any

import httpx
from dashboard_overhead import serve  # noqa: I001 - benchmarks/ is the script's directory
from selenium import webdriver
from selenium.webdriver.chrome.service import Service

SYSTEM = "You are a scribe of the old books. Answer in the manner of the King James Bible, at length. " * 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pages", type=int, default=96)
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--max-tokens", type=int, default=320)
    parser.add_argument("--out", default="docs/dashboard.png")
    args = parser.parse_args()
    root, engine, server = serve({"model": None, "device": "cpu", "num_kv_blocks": args.pages, "block_size": 16,
                                  "max_model_len": 512})
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1000"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    browser.get(root + "/dashboard")

    def ask(i: int) -> None:
        with httpx.Client(base_url=root + "/v1", timeout=600) as http:
            http.post("/completions", json={"prompt": SYSTEM + f"Question {i}: what was in the beginning?",
                                            "max_tokens": args.max_tokens, "ignore_eos": True,
                                            "temperature": 0.9, "seed": i})

    clients = [threading.Thread(target=ask, args=(i,)) for i in range(args.requests)]
    start = time.monotonic()
    for client in clients:
        client.start()
    llm: Any = engine.engine
    while not llm.thrashing.is_thrashing and any(c.is_alive() for c in clients):
        time.sleep(0.2)
    thrashing_at = time.monotonic() - start
    time.sleep(3.0)  # a few seconds of the storm on the charts
    # Select the running request holding the most pages (the frame's last column), then look at once.
    browser.execute_script("""const rows = [...document.querySelectorAll('#requests tr.request')];
        rows.sort((a, b) => +b.lastElementChild.textContent - +a.lastElementChild.textContent);
        if (rows.length) window.kvdash.select(rows[0].dataset.request);""")
    time.sleep(0.3)
    browser.save_screenshot(args.out)
    metrics = llm.get_metrics()
    print(f"thrashing warned {thrashing_at:.1f} s after the burst; at the screenshot: "
          f"{metrics['num_preemptions']} preemptions, {metrics['kv_evictions']} evictions, "
          f"recompute fraction {metrics['recompute_fraction']:.2f}, goodput {metrics['goodput_tokens_per_s']:.0f} "
          f"of {metrics['throughput_tokens_per_s']:.0f} tokens/s computed; screenshot {args.out}")
    for client in clients:
        client.join()
    print(f"all {args.requests} requests done in {time.monotonic() - start:.1f} s; "
          f"{llm.get_metrics()['num_preemptions']} preemptions; pages in use {llm.kv.num_pages_in_use}")
    browser.quit()
    server.should_exit = True
    engine.shutdown(timeout=2)


if __name__ == "__main__":
    main()
