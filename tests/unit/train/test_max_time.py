"""train.max_time: a wall-clock budget of training steps ends the run cleanly (final eval, checkpoint, final/),
is summed over resumes, and a larger budget (or none) resumes it."""

import json

from helpers import alpaca_rows, make_config, write_jsonl

from sftlab.recipe import train


def _cfg(tmp, **t):
    ev = write_jsonl(tmp / "eval.jsonl", alpaca_rows(4, seed=1))
    return make_config(tmp, n=16, data={"eval": str(ev)}, train={"max_steps": 400, "save_every": 1000, **t})


def test_max_time_stops_cleanly_with_eval_checkpoint_and_final(tmp_path):
    logs = []
    s = train(_cfg(tmp_path, max_time=1e-6), log=logs.append)
    run = tmp_path / "run"
    assert (s["status"], s["steps"], s["total_steps"], s["stopped_by"]) == ("completed", 1, 400, "max_time")
    assert "eval_loss" in s and (run / "final").is_dir()
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-1"]  # save_every 1000: the stop's own
    assert any("train.max_time" in str(m) for m in logs)
    assert json.loads((run / "summary.json").read_text())["stopped_by"] == "max_time"


def test_the_budget_is_summed_over_resumes_and_a_larger_one_continues(tmp_path):
    train(_cfg(tmp_path, max_time=1e-6), log=lambda *_: None)
    again = train(_cfg(tmp_path, max_time=1e-6), resume=True, log=lambda *_: None)
    assert (again["steps"], again["stopped_by"]) == (1, "max_time")  # the budget was spent before the resume
    more = train(_cfg(tmp_path, max_steps=3, max_time=None), resume=True, log=lambda *_: None)
    assert (more["steps"], more["stopped_by"], more["status"]) == (3, None, "completed")


def test_without_max_time_the_run_reports_no_stop_reason(tmp_path):
    s = train(_cfg(tmp_path, max_steps=2), log=lambda *_: None)
    assert (s["steps"], s["stopped_by"]) == (2, None)
