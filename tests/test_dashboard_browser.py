"""The dashboard in a real browser: headless Chromium (Debian's chromium and chromium-driver) through selenium.

The live test serves the demo model with an API key and a cache small
enough that requests sharing a prefix preempt each other until the cache
thrashes.  It then freezes the engine between two steps (its ``step``
answers nothing for a while; commands are still served), so that the page,
``/metrics`` and the snapshot describe one and the same moment.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from kvpage.dashboard.frame import Frame

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
INSTALL = "apt-get install chromium chromium-driver; pip install selenium"
KEY = "browser-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
XSS = "<script>window.__xss = 1</script><img src=x onerror='window.__xss = 2'>"
SCREENSHOT = os.environ.get("KVPAGE_DASHBOARD_SCREENSHOT")  # also keep the live screenshot there (docs/)


def _browser() -> Any:
    missing = [what for what, present in (("chromium", Path(CHROMIUM).exists()),
                                          ("chromium-driver", Path(CHROMEDRIVER).exists()),
                                          ("selenium", _has_selenium())) if not present]
    if missing:
        message = f"{', '.join(missing)} missing: {INSTALL}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)  # .ci/run installs them: missing there is a broken CI, not a skip
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1400,1000"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def _has_selenium() -> bool:
    import importlib.util

    return importlib.util.find_spec("selenium") is not None


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    driver = _browser()
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(what: Callable[[], Any], timeout: float = 30.0, message: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = what()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {message or what}")
        time.sleep(0.05)


def text(driver: Any, selector: str) -> str:
    return str(driver.execute_script("const e = document.querySelector(arguments[0]); return e ? e.textContent : ''",
                                     selector)).strip()


def js_errors(driver: Any) -> list[str]:
    """Errors of the page's own code (a refused request, the 401 before the key, logs as a network error)."""
    return [entry["message"] for entry in driver.get_log("browser")
            if entry["level"] == "SEVERE" and entry.get("source") != "network"]


def grid(driver: Any) -> dict[int, set[str]]:
    """Each page's classes, from the grid's cells (one cell a page: these caches are small)."""
    cells = driver.execute_script("""return [...document.querySelectorAll('#grid rect.cell')].map(
        r => [+r.dataset.first, +r.dataset.last, r.getAttribute('class')])""")
    pages = {}
    for first, last, classes in cells:
        assert first == last, "one cell a page expected"
        pages[first] = set(classes.split())
    return pages


def prometheus(root: str) -> dict[str, float]:
    body = httpx.get(root + "/metrics", timeout=30).text
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^kvpage:(\w+) ([0-9.e+-]+)$", body, re.M)}


STATE_CLASS = {".": "free", "x": "frag", "c": "cached", "u": "used", "s": "shared", "r": "reserved"}


def test_live_dashboard_during_an_eviction_storm(browser: Any, tmp_path: Path) -> None:
    from tests.server.live_server import live_server

    with live_server({"max_model_len": 256, "num_kv_blocks": 16, "block_size": 16}, api_key=KEY) as server:
        llm = server.engine.engine
        browser.get(server.root + "/dashboard")
        wait_for(lambda: text(browser, "#status") == "need API key", message="the key form")
        assert browser.find_element("id", "key-form").is_displayed()
        browser.find_element("id", "api-key").send_keys(KEY)
        browser.find_element("id", "api-key-submit").click()
        wait_for(lambda: text(browser, "#status") == "live", message="the live stream")

        prefix = "The quick brown fox jumps over the lazy dog. " * 4
        prompts = [prefix + (XSS if i == 0 else f"Story {i}:") for i in range(8)]

        def ask(prompt: str, seed: int) -> None:
            with httpx.Client(base_url=server.base_url, headers=AUTH, timeout=300) as http:
                http.post("/completions", json={"prompt": prompt, "max_tokens": 120, "ignore_eos": True,
                                                "temperature": 0.8, "seed": seed})

        clients = [threading.Thread(target=ask, args=(p, i)) for i, p in enumerate(prompts)]
        for client in clients:
            client.start()

        def snapshot() -> dict[str, Any]:
            frame: dict[str, Any] = httpx.get(server.root + "/dashboard/api/snapshot", headers=AUTH,
                                              timeout=30).json()["frame"]
            return frame

        # Until the grid shows sharing and a preemption happened, with the XSS request running.
        def busy() -> dict[str, Any] | None:
            frame = snapshot()
            running = {s["request"] for s in frame["sequences"] if s["status"] == "running"}
            xss = next((s["request"] for s in frame["sequences"] if s["tokens"] > 0 and s["status"] == "running"
                        and s["request"] in running and _is_xss(llm, s["request"])), None)
            return frame if ("s" in frame["pages"] and frame["events"]["preemptions"] and xss and len(running) >= 2
                             ) else None

        wait_for(busy, timeout=120, message="sharing, a preemption and the XSS request running")
        real_step = llm.step
        llm.step = lambda: []  # frozen between two steps: the loop still serves commands and frames
        try:
            frame = snapshot()
            wait_for(lambda: text(browser, "#step") == str(frame["step"]), message="the page to show the frozen step")
            time.sleep(0.3)  # a frame or two more of the same state
            metrics = prometheus(server.root)
            page = {name: int(text(browser, f"#{name}")) for name in
                    ("pages-in-use", "pages-cached", "pages-free", "pages-total", "running-requests",
                     "waiting-requests", "swapped-requests")}
            m = frame["metrics"]
            assert page == {"pages-in-use": m["kv_blocks_used"], "pages-cached": m["kv_blocks_cached"],
                            "pages-free": m["kv_blocks_free"], "pages-total": m["kv_blocks_total"],
                            "running-requests": m["num_requests_running"],
                            "waiting-requests": m["num_requests_waiting"],
                            "swapped-requests": m["num_requests_swapped"]}
            assert (page["pages-in-use"], page["pages-cached"], page["pages-free"], page["running-requests"],
                    page["waiting-requests"]) == (
                metrics["kv_pages_in_use"], metrics["kv_pages_cached_free"], metrics["kv_pages_free"],
                metrics["num_requests_running"], metrics["num_requests_waiting"])
            assert page["pages-in-use"] > 0 and page["running-requests"] >= 2
            cells = grid(browser)
            assert len(cells) == m["kv_blocks_total"]
            for page_id, state in enumerate(frame["pages"]):
                assert STATE_CLASS[state] in cells[page_id], (page_id, state, cells[page_id])

            # Selecting a request highlights exactly its pages, and shows its prompt as text.
            xss = next(s["request"] for s in frame["sequences"]
                       if s["status"] == "running" and _is_xss(llm, s["request"]))
            mine = {p for s in frame["sequences"] if s["request"] == xss for p in s["pages"]}
            browser.find_element("css selector", f'#requests tr.request[data-request="{xss}"]').click()
            wait_for(lambda: {p for p, c in grid(browser).items() if "hl" in c} == mine,
                     message="the selected request's pages highlighted")
            others = {s["request"] for s in frame["sequences"]} - {xss}
            assert others and all(mine != {p for s in frame["sequences"] if s["request"] == r for p in s["pages"]}
                                  for r in others)
            wait_for(lambda: XSS in text(browser, "#details-prompt"), message="the prompt in the details")
            assert browser.execute_script("return window.__xss === undefined")
            assert not browser.execute_script("return document.querySelector('#details script, #details img')")
            tables = browser.find_elements("css selector", "#details .table span.page")
            assert {int(t.get_attribute("data-page")) for t in tables} == mine
            shot = tmp_path / "live.png"
            browser.save_screenshot(str(shot))
            assert shot.stat().st_size > 10_000
            if SCREENSHOT:
                shutil.copy(shot, SCREENSHOT)
        finally:
            llm.step = real_step
        for client in clients:
            client.join(300)
        assert llm.thrashing.num_warnings >= 1, "the run did not thrash: the onset marker has nothing to mark"
        wait_for(lambda: browser.find_elements("css selector", "#series line.onset"),
                 message="the thrashing onset marker")
        wait_for(lambda: browser.find_elements("css selector", "#preemptions tr.preemption"), message="preemptions")
        row = browser.find_element("css selector", "#preemptions tr.preemption").text
        assert re.search(r"recompute", row) and "next tokens" in row
        assert server.wait_until_idle() == 0
        wait_for(lambda: text(browser, "#pages-in-use") == "0", message="the page to show every page back")
        assert js_errors(browser) == []


def _is_xss(llm: Any, request_id: str) -> bool:
    request = llm.scheduler.requests.get(request_id)
    return request is not None and request.prompt is not None and XSS in request.prompt


def test_offline_report_scrubs_through_a_replay(browser: Any, tmp_path: Path) -> None:
    from kvpage.cli import main

    out = tmp_path / "plan"
    assert main(["plan", "--synthetic", "sharegpt", "--num", "60", "--kv-tokens", "2048", "--rate", "30",
                 "--rate-factors", "", "--html", "--out", str(out)]) == 0
    browser.get((out / "dashboard.html").as_uri())
    wait_for(lambda: text(browser, "#status") == "offline", message="offline mode")
    assert text(browser, "h1").startswith("kvpage plan")
    last = int(browser.find_element("id", "scrubber").get_attribute("max"))
    assert last >= 10

    def scrub(position: int) -> tuple[str, dict[int, set[str]]]:
        browser.execute_script("const s = document.getElementById('scrubber'); s.value = arguments[0];"
                               "s.dispatchEvent(new Event('input'));", position)
        time.sleep(0.1)
        return text(browser, "#frame-time"), grid(browser)

    early, late = scrub(1), scrub(last // 2)
    assert early[0] != late[0] and early[1] != late[1]  # the scrubber moved the time and the grid
    assert browser.find_elements("css selector", "#series line.cursor")
    browser.execute_script("const r = document.getElementById('run'); r.value = '1';"
                           "r.dispatchEvent(new Event('change'));")
    seen = set()
    for position in range(0, last + 1, max(1, last // 20)):
        seen |= {c for classes in scrub(position)[1].values() for c in classes}
    assert "reserved" in seen  # contiguous-request: its reservations show
    assert js_errors(browser) == []


def test_offline_page_renders_prompts_as_text(browser: Any, tmp_path: Path) -> None:
    from kvpage import LLM, SamplingParams
    from kvpage.dashboard import write_offline_page

    llm = LLM(device="cpu", num_kv_blocks=8, block_size=16, max_model_len=256)
    engine = llm.engine
    engine.add_request("evil", XSS, SamplingParams(max_tokens=4))
    engine.add_request("</script><b>x</b>", "hello", SamplingParams(max_tokens=4))
    engine.step()
    frame: Frame = engine.frame()
    path = write_offline_page(tmp_path / "page.html", "a <b>title</b>", [("run <i>1</i>", [frame.to_json()])])
    while engine.has_unfinished_requests():
        engine.step()
    browser.get(path.as_uri())
    wait_for(lambda: text(browser, "#status") == "offline", message="offline mode")
    assert text(browser, "h1") == "a <b>title</b>"
    rows = browser.find_elements("css selector", "#requests tr.request")
    assert {row.get_attribute("data-request") for row in rows} == {"evil", "</script><b>x</b>"}
    assert browser.execute_script("return window.__xss === undefined && !document.querySelector('h1 b, td b')")
    assert js_errors(browser) == []
