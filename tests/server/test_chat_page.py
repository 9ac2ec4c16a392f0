"""The web chat page at `/`, end to end in a real headless browser: Playwright driving the
system's Chromium against `spillover serve` of the demo model, with an API key. It types a
message and sees the streamed answer, stops a long one (and the server aborts it), and sends a
second turn. CI installs the browser (scripts/setup.sh); a missing browser fails, never skips."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.server.conftest import Served, free_port, wait_healthy

CHROMIUM = os.environ.get("SPILLOVER_CHROMIUM", "/usr/bin/chromium")
# No GPU, no sandbox (root in CI), and no traffic to anything but the server under test.
# (and no crash when a container's /dev/shm is small)
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--disable-dev-shm-usage"]
KEY = "page-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def start_server(api_key: str | None, max_model_len: int = 1024) -> tuple[subprocess.Popen[bytes],
                                                                           Served, Any]:
    """`spillover serve` of the demo model in a subprocess; stderr goes to a file (a pipe nobody
    reads would fill up and stall the server)."""
    port = free_port()
    log = tempfile.TemporaryFile()
    cmd = [sys.executable, "-m", "spillover.cli.main", "serve", "--port", str(port), "--device",
           "cpu", "--dtype", "float32", "--max-model-len", str(max_model_len)]
    if api_key:
        cmd += ["--api-key", api_key]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, 240, proc)
    except Exception:
        proc.kill()
        log.seek(0)
        raise RuntimeError(log.read().decode(errors="replace")[-3000:]) from None
    return proc, Served(base, "SmolLM2-135M-Instruct"), log


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


@pytest.fixture(scope="module")
def keyed_server() -> Iterator[Served]:
    proc, served, log = start_server(KEY)
    try:
        yield served
    finally:
        stop_server(proc)
        log.close()


def launch_browser(playwright: Any) -> Any:
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"no browser at {CHROMIUM}: the chat page test needs Chromium. Install it as "
                    "scripts/setup.sh does (as root: apt-get install -y chromium), or point "
                    "SPILLOVER_CHROMIUM at a Chromium binary.")
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = launch_browser(p)
        try:
            yield b
        finally:
            b.close()


def metrics(served: Served) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in httpx.get(f"{served.base}/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name.split("{")[0]] = float(value)
    return out


def settle(served: Served, pred: Any, within: float, what: str) -> dict[str, float]:
    deadline = time.monotonic() + within
    while True:
        m = metrics(served)
        if pred(m):
            return m
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not within {within} s: {m}")
        time.sleep(0.05)


def save_settings(page: Any, extra: str, key: str | None = None) -> None:
    if not page.locator("#settings").is_visible():
        page.click("#settingsBtn")
    if key is not None:
        page.fill("#apiKey", key)
    page.fill("#extra", extra)
    page.click("#saveSettings")
    page.wait_for_selector("#settings", state="hidden")


def answers(page: Any, state: str) -> Any:
    return page.locator(f".msg.assistant[data-state={state}]")


def test_page_needs_no_key_and_fetches_nothing_outside(keyed_server: Served) -> None:
    r = httpx.get(keyed_server.base + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    html = r.text
    assert "<script src" not in html and "<link" not in html and "@import" not in html
    assert "http://" not in html.replace("http://www.w3.org", "") and "https://" not in html
    assert httpx.get(keyed_server.base + "/v1/models").status_code == 401


def test_chat_end_to_end(keyed_server: Served, browser: Any) -> None:
    from playwright.sync_api import expect

    s = keyed_server
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    outside: list[str] = []
    page.on("request", lambda req: None if req.url.startswith(s.base) else outside.append(req.url))
    page.goto(s.base + "/")
    # The API refuses the page without the key: it asks for one and keeps it.
    page.wait_for_selector("#settings[open]")
    assert "API key" in page.inner_text("#settingsNote")
    save_settings(page, '{"max_tokens": 24, "temperature": 0}', key=KEY)
    expect(page.locator("#model")).to_have_text(s.model)
    assert page.evaluate("localStorage.getItem('spillover.apiKey')") == KEY

    # 1. a message, streamed in
    page.fill("#input", "What is the capital of France?")
    page.keyboard.press("Enter")
    answers(page, "done").first.wait_for(timeout=30_000)
    turns = page.evaluate("turns")
    expected = s.client(api_key=KEY).chat.completions.create(
        model=s.model, messages=turns[:1], max_tokens=24, temperature=0).choices[0].message.content
    assert turns[1] == {"role": "assistant", "content": expected} and expected
    foot = page.inner_text(".msg.assistant .foot")
    assert "tokens" in foot and "tok/s" in foot
    used, total = (int(x) for x in page.inner_text("#ctx").split(" / "))
    assert total == 1024 and used > 24
    assert "tok/s" in page.inner_text("#tps") and not page.inner_text("#tps").startswith("–")

    # 2. a long one, stopped: the server aborts it at once
    save_settings(page, '{"max_tokens": 900, "ignore_eos": true}')
    before = metrics(s)
    page.fill("#input", "Tell me a very long story.")
    page.click("#send")
    # (polled from here: the page's CSP forbids the eval that wait_for_function would need)
    long_answer = page.locator(".msg.assistant .body").nth(1)
    deadline = time.monotonic() + 30
    while len(long_answer.inner_text()) < 20:
        assert time.monotonic() < deadline, "the long answer did not start streaming"
        time.sleep(0.05)
    assert metrics(s)["spillover:num_requests_running"] == 1
    page.click("#stop")
    answers(page, "stopped").first.wait_for(timeout=5_000)
    stopped = time.monotonic()
    m = settle(s, lambda m: m["spillover:num_requests_running"] == 0
               and m["spillover:http_requests_client_disconnected_total"]
               > before.get("spillover:http_requests_client_disconnected_total", 0),
               5, "the stopped request's abort")
    assert time.monotonic() - stopped < 2.0
    generated = m["spillover:generation_tokens_total"] - before["spillover:generation_tokens_total"]
    assert 0 < generated < 900
    assert page.is_visible("#send") and not page.is_visible("#stop")

    # 3. a second turn continues the conversation, the stopped answer included
    save_settings(page, '{"max_tokens": 16, "temperature": 0}')
    ctx_before = int(page.inner_text("#ctx").split(" / ")[0])
    page.fill("#input", "Thanks! Now say goodbye.")
    page.keyboard.press("Enter")
    answers(page, "done").nth(1).wait_for(timeout=30_000)
    turns = page.evaluate("turns")
    assert [t["role"] for t in turns] == ["user", "assistant"] * 3
    assert turns[3]["content"] and turns[5]["content"]
    assert int(page.inner_text("#ctx").split(" / ")[0]) > ctx_before
    assert outside == []
    page.close()


def test_markdown_is_rendered_and_html_escaped(keyed_server: Served, browser: Any) -> None:
    page = browser.new_page()
    page.goto(keyed_server.base + "/")
    src = ("# Title\n**bold** and `x<y` [ok](https://example.org) [bad](javascript:alert(1))\n"
           "<img src=x onerror=alert(1)>\n```python\nif a < b:\n    print('<b>')\n```\n"
           "- one\n- two")
    html = page.evaluate("(s) => markdown(s)", src)
    assert "<h1>Title</h1>" in html and "<strong>bold</strong>" in html
    assert "<code>x&lt;y</code>" in html
    assert '<a href="https://example.org"' in html and "javascript:" not in html.split("[bad]")[0]
    assert 'href="javascript' not in html
    assert "<img" not in html and "&lt;img src=x onerror=alert(1)&gt;" in html
    code = "if a &lt; b:\n    print(&#39;&lt;b&gt;&#39;)"
    assert f'<pre><code class="lang-python">{code}</code></pre>' in html
    assert "<ul><li>one</li><li>two</li></ul>" in html
    # models separate list items by blank lines: still one list, numbered on
    html = page.evaluate("(s) => markdown(s)", "1. a\n\n2. b\n   more\n\nafter")
    assert html == "<ol><li>a</li><li>b<br>   more</li></ol><p>after</p>"
    page.close()
