"""Screenshots of the web chat page (docs/chat_page_desktop.png, docs/chat_page_narrow.png):
starts `spillover serve` of the demo model, has one conversation in headless Chromium, and
shoots it at 1280x800 and 390x844.

    python scripts/chat_page_screenshots.py [--out docs] [--chromium /usr/bin/chromium]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from playwright.sync_api import sync_playwright

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PROMPTS = ["Write a Python function that reverses a string, with a one-line explanation.",
           "Now give me three short tips for naming functions, as a list."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs", help="folder for the two PNG files")
    ap.add_argument("--chromium", default="/usr/bin/chromium", help="Chromium binary")
    args = ap.parse_args()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "spillover.cli.main", "serve", "--port",
                               str(port), "--device", "cpu", "--max-model-len", "2048"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the server did not start")
            time.sleep(0.5)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, args=ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            # greedy and bounded, so the pictures are the same each run
            page.add_init_script("localStorage.setItem('spillover.extra', "
                                 "'{\"temperature\": 0, \"max_tokens\": 160}')")
            page.goto(base + "/")
            for n, prompt in enumerate(PROMPTS):
                page.fill("#input", prompt)
                page.keyboard.press("Enter")
                page.locator(".msg.assistant[data-state=done]").nth(n).wait_for(timeout=120_000)
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out / "chat_page_desktop.png"))
            page.set_viewport_size({"width": 390, "height": 844})
            page.locator("main").evaluate("m => m.scrollTop = m.scrollHeight")
            page.screenshot(path=str(out / "chat_page_narrow.png"))
            browser.close()
        print(f"wrote {out / 'chat_page_desktop.png'} and {out / 'chat_page_narrow.png'}")
    finally:
        server.terminate()
        server.wait(30)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    sys.exit(main())
