"""`sftlab ui` end to end in a real headless browser (Debian's chromium driven by Playwright): fill the Train form,
start a tiny-llama LoRA run, watch its curve and summary appear, find it on the Runs page, and chat with it; the
reply is the one `sftlab generate` gives for the same prompt. Screenshots go to tests/artifacts/ui/ (gitignored).

Skips when gradio, playwright or /usr/bin/chromium is absent (.ci/run installs all three)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from helpers import alpaca_rows, write_jsonl

pytest.importorskip("gradio")
sync_api = pytest.importorskip("playwright.sync_api")

CHROMIUM = os.environ.get("SFTLAB_CHROMIUM", "/usr/bin/chromium")
if not Path(CHROMIUM).is_file():
    pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)", allow_module_level=True)

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts" / "ui"
# Without the background-networking flags Chromium opens connections to Google's services, which are refused here
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
CLI = [sys.executable, "-m", "sftlab.cli.main"]
PROMPT = "Repeat: cat"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`sftlab ui` in a fresh working directory holding the data; yields (url, workdir)."""
    tmp_path = tmp_path_factory.mktemp("ui")
    write_jsonl(tmp_path / "train.jsonl", alpaca_rows(64, seed=1))
    write_jsonl(tmp_path / "eval.jsonl", alpaca_rows(16, seed=2))
    port = _free_port()
    log = open(tmp_path / "ui.log", "wb")
    proc = subprocess.Popen([*CLI, "ui", "--port", str(port)], cwd=tmp_path, stdout=log,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)  # fmt: skip
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"sftlab ui exited {proc.returncode}:\n{(tmp_path / 'ui.log').read_text()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.time() < deadline, (tmp_path / "ui.log").read_text()
            time.sleep(0.5)
        yield url, tmp_path
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture
def page():
    profile = tempfile.mkdtemp(prefix="sftlab-ui-chromium-")
    with sync_api.sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, headless=True, args=BROWSER_ARGS,
            viewport={"width": 1400, "height": 1500},
        )  # fmt: skip
        try:
            yield ctx.pages[0] if ctx.pages else ctx.new_page()
        finally:
            ctx.close()
            shutil.rmtree(profile, ignore_errors=True)


def _field(page, elem_id: str):
    return page.locator(f"#{elem_id}").locator("textarea, input").first


def _steps(metrics: Path) -> list[int]:
    """Train steps in metrics.jsonl so far (a line being written is left out)."""
    try:
        lines = metrics.read_text().splitlines()
    except FileNotFoundError:
        return []
    rows = []
    for line in lines:
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass
    return [r["step"] for r in rows if "loss" in r]


def _wait_for(ok, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not ok():
        assert time.time() < deadline, "timed out"
        time.sleep(0.2)


def _shot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=ARTIFACTS / f"{name}.png", full_page=True)
    print(f"screenshot: {ARTIFACTS / name}.png")


def test_train_watch_compare_and_chat_in_a_browser(server, page):
    url, work = server
    expect = sync_api.expect
    page.goto(url)
    _field(page, "model").wait_for(timeout=60_000)

    # Train: the form, the planner's estimate for it, then Start
    _field(page, "train-file").fill("train.jsonl")
    _field(page, "eval-file").fill("eval.jsonl")
    for elem_id, value in (
        ("steps", "12"),
        ("batch", "4"),
        ("rank", "4"),
        ("eval-every", "6"),
        ("lr", "0.002"),
    ):
        _field(page, elem_id).fill(value)
    _field(page, "output-dir").fill("runs/browser")
    page.click("#estimate")
    expect(_field(page, "plan-text")).to_have_value(re.compile("recommendation"), timeout=60_000)
    page.click("#start")
    expect(_field(page, "command")).to_have_value(
        "sftlab train .sftlab-ui/configs/runs_browser.yaml", timeout=30_000
    )
    expect(_field(page, "status")).to_have_value(
        re.compile(r"^finished: completed, 12 steps"), timeout=180_000
    )
    expect(page.locator("#curve img")).to_be_visible(timeout=30_000)
    expect(page.locator("#summary")).to_contain_text("completed", timeout=30_000)
    expect(_field(page, "log")).to_have_value(re.compile(r"completed: 12 steps"), timeout=30_000)
    _shot(page, "train")

    # what the page started is an ordinary run directory, configured as the form said
    run = work / "runs" / "browser"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 12
    cfg = (run / "config.yaml").read_text()
    assert "name: lora" in cfg and "r: 4" in cfg and "batch_size: 4" in cfg and "lr: 0.002" in cfg
    shown = page.locator("#summary").inner_text()
    assert str(summary["train_loss"])[:6] in shown

    # Runs: the run is listed with its summary
    page.get_by_role("tab", name="Runs").click()
    page.click("#runs-refresh")
    expect(page.locator("#runs-table")).to_contain_text("runs/browser", timeout=30_000)
    expect(page.locator("#runs-curve img")).to_be_visible(timeout=30_000)
    _shot(page, "runs")

    # Chat: the reply is what `sftlab generate` answers (greedy, same template, same model)
    page.get_by_role("tab", name="Chat").click()
    page.click("#chat-refresh")
    expect(_field(page, "chat-run")).to_have_value("runs/browser", timeout=30_000)
    _field(page, "chat-max-new").fill("16")
    _field(page, "chat-input").fill(PROMPT)
    page.click("#chat-send")
    cli = subprocess.run([*CLI, "generate", "runs/browser", PROMPT, "--max-new-tokens", "16"], cwd=work,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    answer = cli.stdout.split(f">>> {PROMPT}\n", 1)[1].strip()
    bubble = page.locator("#chatbot .bot-row").last
    expect(bubble).to_be_visible(timeout=60_000)
    _shot(page, "chat")
    assert " ".join(bubble.inner_text().split()) == (" ".join(answer.split()) or "(empty)")

    # Export: `sftlab merge` writes a plain HF model
    page.get_by_role("tab", name="Export").click()
    expect(_field(page, "merge-run")).to_have_value("runs/browser", timeout=30_000)
    _field(page, "merge-out").fill("merged")
    page.click("#merge")
    expect(_field(page, "merge-log")).to_have_value(re.compile(r"merged model written to merged\n\(exit 0\)$"),
                                                    timeout=120_000)  # fmt: skip
    assert (work / "merged" / "config.json").is_file() and (work / "merged" / "model.safetensors").is_file()


def test_load_yaml_stop_and_resume_from_the_page(server, page):
    url, work = server
    expect = sync_api.expect
    (work / "long.yaml").write_text(
        "model: {name: tiny-llama}\nmethod: {name: prefix, num_virtual_tokens: 3}\n"
        "data: {train: train.jsonl, format: alpaca, max_length: 200}\n"
        "train: {output_dir: runs/long, max_steps: 100000, batch_size: 2, seed: 7}\n"
    )
    page.goto(url)
    _field(page, "config-path").fill("long.yaml")
    page.click("#load-yaml")
    expect(_field(page, "output-dir")).to_have_value("runs/long", timeout=30_000)
    for elem_id, value in (("method", "prefix"), ("vtokens", "3"), ("steps", "100000"), ("batch", "2"),
                           ("train-file", "train.jsonl")):  # fmt: skip
        expect(_field(page, elem_id)).to_have_value(value)
    page.click("#start")
    status, log = _field(page, "status"), _field(page, "log")
    metrics = work / "runs" / "long" / "metrics.jsonl"
    _wait_for(lambda: len(_steps(metrics)) >= 2)
    expect(status).to_have_value(re.compile(r"^running"))
    page.click("#stop")
    stopped = re.compile(r"^stopped at checkpoint step-(\d+): Resume continues from it$")
    expect(status).to_have_value(stopped, timeout=60_000)
    first = int(stopped.match(status.input_value()).group(1))
    assert (work / "runs" / "long" / "checkpoints" / f"step-{first}").is_dir()

    page.click("#resume")
    expect(_field(page, "command")).to_have_value(
        "sftlab train .sftlab-ui/configs/runs_long.yaml --resume", timeout=30_000
    )
    _wait_for(lambda: len(_steps(metrics)) >= first + 2)  # it goes on from there
    expect(log).to_have_value(re.compile(r"--resume\n"))
    page.click("#stop")
    expect(status).to_have_value(stopped, timeout=60_000)
    second = int(stopped.match(status.input_value()).group(1))
    assert second > first
    _shot(page, "stopped")
    steps = _steps(metrics)
    # the resumed process went on from the checkpoint: every step after it once, none repeated. (A Ctrl-C between a
    # step and its metrics row loses that row while the checkpoint has the step: a trainer issue, not the page's.)
    assert [s for s in steps if s > first] == list(range(first + 1, second + 1))
    assert steps == sorted(set(steps))
    run_cfg = (work / "runs" / "long" / "config.yaml").read_text()  # the YAML's other keys came along
    assert "max_length: 200" in run_cfg and "seed: 7" in run_cfg and "num_virtual_tokens: 3" in run_cfg
