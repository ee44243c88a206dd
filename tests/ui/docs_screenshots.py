"""Make README's docs/ui-*.png: `python tests/ui/docs_screenshots.py` from the repo root (needs gradio, playwright,
/usr/bin/chromium, runs/quickstart and runs/bench-multitask). Not a test: it trains runs/ui-demo (tiny-llama LoRA, a
few seconds) and chats with the quickstart's SmolLM2 adapter."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from playwright.sync_api import expect, sync_playwright

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parents[1])]  # test_ui_browser, helpers
from test_ui_browser import BROWSER_ARGS, CHROMIUM, CLI, _field, _free_port  # noqa: E402

DOCS = Path("docs")
PROMPT = (
    'Extract the person described in the sentence as one JSON object with exactly the keys "name", "age", "city" '
    'and "occupation" (age is a number; use null for anything the sentence does not say). Reply with the JSON '
    "object only.\n\nSentence: Marta Kowalski, 29, teaches piano in Krakow."
)


def pick(page, elem_id: str, value: str) -> None:
    box = _field(page, elem_id)
    box.click()
    box.fill(value)
    page.get_by_role("option", name=value, exact=True).click()


def main() -> None:
    port = _free_port()
    server = subprocess.Popen([*CLI, "ui", "--port", str(port), "--state-dir", "/tmp/sftlab-ui-docs"])
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=BROWSER_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url)
            _field(page, "train-file").fill("examples/data/train.jsonl")
            _field(page, "eval-file").fill("examples/data/eval.jsonl")
            for elem_id, value in (("steps", "120"), ("batch", "8"), ("lr", "0.003"), ("eval-every", "20")):
                _field(page, elem_id).fill(value)
            _field(page, "output-dir").fill("runs/ui-demo")
            page.locator("#overwrite input").check()
            page.click("#estimate")
            expect(_field(page, "plan-text")).to_have_value(re.compile("recommendation"), timeout=60_000)
            page.click("#start")
            expect(_field(page, "status")).to_have_value(re.compile("^finished"), timeout=300_000)
            time.sleep(2)
            page.screenshot(path=DOCS / "ui-train.png", full_page=True)

            page.get_by_role("tab", name="Runs").click()
            page.click("#runs-refresh")
            time.sleep(2)
            page.locator("#runs-pick").get_by_role("button").last.click()  # clear the default choice
            for run in (
                "runs/bench-multitask/joint-full",
                "runs/bench-multitask/joint-lora",
                "runs/quickstart",
            ):
                pick(page, "runs-pick", run)
            page.keyboard.press("Escape")
            time.sleep(4)
            page.screenshot(path=DOCS / "ui-runs.png", full_page=True)

            page.get_by_role("tab", name="Chat").click()
            time.sleep(1)
            pick(page, "chat-run", "runs/quickstart")
            _field(page, "chat-max-new").fill("48")
            _field(page, "chat-input").fill(PROMPT)
            page.click("#chat-send")
            expect(page.locator("#chatbot .bot-row").last).to_contain_text("Krakow", timeout=300_000)
            page.screenshot(path=DOCS / "ui-chat.png")
            browser.close()
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(60)


if __name__ == "__main__":
    main()
