"""Progress off a terminal: a run piped to a log prints plain lines (issue 16, item 15)."""

import io
import re

from helpers import make_config

from sftlab.recipe import prepare, train
from sftlab.train.callbacks import MetricsCallback
from sftlab.train.loop import Trainer
from sftlab.train.progress import Progress, plain_every_steps

LINE = re.compile(
    r"^train: step (\d+)/(\d+) \(\d+%\) loss \d+\.\d{4} lr \d\.\d\de[-+]\d\d ([\d,]+) tok/s "
    r"elapsed (\d+:\d\d:\d\d) eta (\d+:\d\d:\d\d|\?)$"
)


def _lines(text: str) -> list[re.Match]:
    return [m for m in map(LINE.match, text.splitlines()) if m]


def test_a_run_with_stdout_captured_prints_plain_progress_lines(tmp_path, capsys):
    cfg = make_config(tmp_path, "tiny-llama", train={"max_steps": 6, "progress": True, "log_every": 2})
    train(cfg, log=lambda *_: None)
    out = capsys.readouterr().out
    lines = _lines(out)
    # step 1 (alive, how fast), every max(log_every=2, 5% of 6 steps) = 2 steps, and the last
    assert [int(m[1]) for m in lines] == [1, 2, 4, 6], out
    assert all(m[2] == "6" for m in lines)
    assert all(int(m[3].replace(",", "")) > 0 for m in lines)  # tokens/s measured, not a placeholder
    assert lines[-1][5] == "0:00:00"  # nothing left at the last step


def test_progress_false_prints_nothing(tmp_path, capsys):
    cfg = make_config(tmp_path, "tiny-llama", train={"max_steps": 3, "progress": False})
    train(cfg, log=lambda *_: None)
    assert not _lines(capsys.readouterr().out)


def test_the_clock_adds_a_line_after_30_s(tmp_path, capsys):
    """Steps alone would print only the first and last line (log_every is larger than the run); a fake clock
    that jumps 31 s at step 3 must add a line there, and only there."""
    cfg = make_config(tmp_path, "tiny-llama", train={"max_steps": 6, "progress": True})
    model, tok, data, _ = prepare(cfg, log=lambda *_: None)
    (tmp_path / "run").mkdir()
    trainer = Trainer(
        model=model,
        cfg=cfg.train,
        task="causal-lm",
        train_examples=data.examples,
        pad_id=tok.pad_token_id,
        run_dir=tmp_path / "run",
        log=lambda *_: None,
    )
    clock = lambda: 31.0 if trainer.state.step >= 3 else 0.0  # noqa: E731
    trainer.callbacks = [MetricsCallback(log_every=1000, show_progress=True, clock=clock)]
    trainer.fit()
    lines = _lines(capsys.readouterr().out)
    assert [int(m[1]) for m in lines] == [1, 3, 6]
    assert lines[1][4] == "0:00:31"  # elapsed by the fake clock
    assert lines[1][5] == "0:00:31"  # 3 steps in 31 s, 3 to go


def test_plain_lines_mean_tokens_per_s_since_the_last_line():
    out = io.StringIO()
    t = [0.0]
    p = Progress(100, log_every=10, interactive=False, stream=out, clock=lambda: t[0])
    p.start()
    p.update(1, loss=1.0, lr=1e-3, tokens=100, seconds=1.0)  # first line: 100 tok/s
    for step in range(2, 11):
        t[0] += 1
        p.update(step, loss=1.0, lr=1e-3, tokens=100 + 300 * (step - 1), seconds=float(step))
    p.stop()
    lines = _lines(out.getvalue())
    assert [int(m[1]) for m in lines] == [1, 10]
    assert [m[3] for m in lines] == ["100", "300"]


def test_a_terminal_gets_the_bar_not_lines():
    out = io.StringIO()
    p = Progress(10, interactive=True, stream=out)
    p.start()
    assert p._bar is not None
    p.update(1, loss=1.0, lr=1e-3, tokens=10, seconds=1.0)
    p.stop()
    assert not _lines(out.getvalue())


def test_step_interval_is_log_every_or_5_percent():
    assert plain_every_steps(total=10, log_every=1) == 1
    assert plain_every_steps(total=1000, log_every=1) == 50
    assert plain_every_steps(total=1000, log_every=100) == 100
