"""Per-task evaluation of a multi-task run (train/task_eval.py): per-task rows in metrics.jsonl equal to
evaluating each task's examples alone, generated metrics scored as hand-computed, the summary's per-task table,
tasks.png; one-task runs unchanged."""

import contextlib
import json
from pathlib import Path

import pytest
import torch
from helpers import alpaca_rows, classification_rows, write_jsonl
from safetensors.torch import load_file

import sftlab.train.task_eval as task_eval_mod
from sftlab.config import build_config
from sftlab.data import IGNORE
from sftlab.data.tasks import load_tasks
from sftlab.models import build_tiny
from sftlab.recipe import train
from sftlab.train.eval_loss import eval_loss
from sftlab.train.objective import Objective
from sftlab.train.task_eval import TaskEval, TaskSpec, prompt_and_reference, task_specs

QUIET = {"progress": False, "threads": 1}
QUIET_LOG = {"log": lambda *_: None}


def _raw(tmp: Path, **train_kw) -> dict:
    tmp.mkdir(parents=True, exist_ok=True)
    sst = lambda n, seed: [  # noqa: E731
        {"sentence": r["text"], "label": int(r["label"] == "pos")} for r in classification_rows(n, seed=seed)
    ]
    files = {
        "a": write_jsonl(tmp / "a.jsonl", alpaca_rows(16)),
        "a_eval": write_jsonl(tmp / "a_eval.jsonl", alpaca_rows(5, seed=7)),
        "c": write_jsonl(tmp / "c.jsonl", sst(14, 2)),
        "c_eval": write_jsonl(tmp / "c_eval.jsonl", sst(6, 4)),
    }
    tasks = [
        {"name": "a", "train": str(files["a"]), "eval": str(files["a_eval"]), "metric": "f1"},
        {"name": "c", "train": str(files["c"]), "eval": str(files["c_eval"]), "format": "classification",
         "columns": {"text": "sentence"}, "label_names": ["negative", "positive"], "system_prompt": "Sentiment?"},
    ]  # fmt: skip
    return {
        "model": {"name": "tiny-llama"},
        "data": {"max_length": 128, "tasks": tasks, "mixing": "equal"},
        "train": {"output_dir": str(tmp / "run"), "max_steps": 4, "batch_size": 4, "lr": 1e-3, "eval_every": 2,
                  "eval_generate_limit": 3, **QUIET, **train_kw},
    }  # fmt: skip


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_per_task_rows_equal_each_task_evaluated_alone(tmp_path):
    cfg = build_config(_raw(tmp_path))
    summary = train(cfg, **QUIET_LOG)
    run = tmp_path / "run"
    evals = [r for r in _rows(run) if "eval_loss" in r]
    # per eval: the overall row (keys as a one-task run's), then one row per task, in data.tasks order
    assert [(r["step"], r.get("task")) for r in evals] == [
        (2, None),
        (2, "a"),
        (2, "c"),
        (4, None),
        (4, "a"),
        (4, "c"),
    ]
    assert set(evals[3]) == {"step", "eval_loss", "eval_tokens", "eval_perplexity"}
    a, c = evals[4], evals[5]
    assert a["eval_generated"] == 3 and c["eval_generated"] == 3  # train.eval_generate_limit
    assert 0 <= a["eval_exact"] <= a["eval_f1"] <= 1 and 0 <= c["eval_accuracy"] <= 1
    assert (a["eval_examples"], c["eval_examples"]) == (5, 6)

    # the final weights, each task's eval examples evaluated alone
    model, tok = build_tiny("tiny-llama")
    model.load_state_dict(load_file(str(run / "final" / "model.safetensors")))
    _, eval_data = load_tasks(cfg.data, tok, "causal-lm", cfg.train.seed, lambda *_: None)
    objective = Objective(model, "causal-lm", cfg.perf)
    for row, part in zip((a, c), eval_data.parts):
        alone = eval_loss(objective, part.examples, 4, tok.pad_token_id)
        assert row["eval_tokens"] == alone["eval_tokens"]
        assert row["eval_loss"] == pytest.approx(alone["eval_loss"], rel=1e-5)
    joint = eval_loss(
        objective, eval_data.examples, 4, tok.pad_token_id
    )  # the overall row: all tasks together
    assert evals[3]["eval_loss"] == pytest.approx(joint["eval_loss"], rel=1e-5)
    assert evals[3]["eval_tokens"] == joint["eval_tokens"] == a["eval_tokens"] + c["eval_tokens"]

    # summary.json: the per-task table (mixture plan + last and best evals), the overall row as before
    assert summary["eval_loss"] == evals[3]["eval_loss"]
    table = {t["task"]: t for t in summary["tasks"]}
    assert table["a"]["metric"] == "f1" and table["c"]["metric"] == "accuracy"
    assert table["a"]["eval"] == {k: v for k, v in a.items() if k not in ("task", "eval_examples")}
    assert table["c"]["eval_examples"] == 6 and table["c"]["eval"]["step"] == 4
    best = min((r for r in evals if "task" not in r), key=lambda r: r["eval_loss"])
    assert table["a"]["best_eval"]["step"] == best["step"]
    assert (run / "tasks.png").stat().st_size > 0 and (run / "loss.png").exists()


def test_a_one_task_run_logs_no_task_rows(tmp_path):
    from helpers import make_config

    cfg = make_config(tmp_path, data={"eval_fraction": 0.25}, train={"max_steps": 2, "eval_every": 1})
    summary = train(cfg, **QUIET_LOG)
    evals = [r for r in _rows(tmp_path / "run") if "eval_loss" in r]
    assert [set(r) for r in evals] == [{"step", "eval_loss", "eval_tokens", "eval_perplexity"}] * 2
    assert "tasks" not in summary and not (tmp_path / "run" / "tasks.png").exists()


def _stub_answers(calls: list):
    """generate_ids that answers from the prompt's text: 'Repeat: w' -> 'w' (half the reference 'w w'), a
    sentiment question -> 'positive'; each answer followed by the chat terminator and junk after it."""

    def fake(model, tokenizer, prompts, max_new_tokens, batch_size, reserved_positions):
        calls.append((len(prompts), max_new_tokens))
        out = []
        for p in prompts:
            text = tokenizer.decode(p)
            if "Repeat: " in text:
                word = text.split("Repeat: ")[1].split("<")[0]
                answer = f"{word}<|im_end|></s> trailing junk"
            else:
                answer = "positive<|im_end|>\nmore"
            out.append(tokenizer(answer, add_special_tokens=False)["input_ids"])
        return out

    return fake


@pytest.mark.parametrize("limit", [4, 100])
def test_generated_metrics_hand_computed(tmp_path, monkeypatch, limit):
    cfg = build_config(_raw(tmp_path, eval_generate_limit=limit))
    model, tok = build_tiny("tiny-llama")
    _, eval_data = load_tasks(cfg.data, tok, "causal-lm", 0, lambda *_: None)
    calls = []
    monkeypatch.setattr(task_eval_mod, "generate_ids", _stub_answers(calls))
    routed = []
    route = lambda i, rows: contextlib.nullcontext(routed.append((i, rows)))  # noqa: E731
    te = TaskEval(task_specs(cfg.data, "causal-lm"), tok, limit, route=route)
    objective = Objective(model, "causal-lm")
    overall, (a, c) = te.evaluate(objective, eval_data.examples, 8, tok.pad_token_id)
    n_a, n_c = min(limit, 5), min(limit, 6)
    # task a: every answer is 'w' against 'w w': exact 0, F1 = 2 * 1 * 1/2 / (1 + 1/2) = 2/3
    assert (a["eval_exact"], a["eval_f1"], a["eval_generated"]) == (0.0, pytest.approx(2 / 3), n_a)
    # task c: 'positive' is right exactly for the positive labels among the first n_c eval records
    labels = [json.loads(line)["label"] for line in (tmp_path / "c_eval.jsonl").read_text().splitlines()]
    assert c["eval_accuracy"] == pytest.approx(sum(labels[:n_c]) / n_c) and c["eval_generated"] == n_c
    assert 0 < sum(labels[:n_c]) < n_c  # the data has both labels: the score can be neither 0 nor 1
    # the prompts generated for: at most `limit` per task; room for the longest reference plus a few tokens
    refs = [[prompt_and_reference(ex, "causal-lm")[1] for ex in p.examples[:limit]] for p in eval_data.parts]
    assert calls == [(n_a, max(map(len, refs[0])) + 8), (n_c, max(map(len, refs[1])) + 8)]
    assert routed == [(0, n_a), (1, n_c)]  # each generated batch inside its task's route
    assert set(overall) == {"eval_loss", "eval_tokens", "eval_perplexity"}


def test_no_generation_with_limit_zero(tmp_path, monkeypatch):
    cfg = build_config(_raw(tmp_path, eval_generate_limit=0))
    model, tok = build_tiny("tiny-llama")
    _, eval_data = load_tasks(cfg.data, tok, "causal-lm", 0, lambda *_: None)
    calls = []
    monkeypatch.setattr(task_eval_mod, "generate_ids", _stub_answers(calls))
    te = TaskEval(task_specs(cfg.data, "causal-lm"), tok, cfg.train.eval_generate_limit)
    _, rows = te.evaluate(Objective(model, "causal-lm"), eval_data.examples, 4, tok.pad_token_id)
    assert calls == [] and all("eval_generated" not in r for r in rows)


def test_prompt_and_reference():
    # causal: the last supervised span is the reference, everything before it the prompt (earlier answers kept)
    ex = {
        "input_ids": [1, 5, 6, 7, 8, 9, 10, 11],
        "labels": [IGNORE, IGNORE, 6, IGNORE, IGNORE, 9, 10, IGNORE],
    }
    assert prompt_and_reference(ex, "causal-lm") == ([1, 5, 6, 7, 8], [9, 10])
    assert prompt_and_reference({"input_ids": [3, 4], "labels": [3, 4]}, "causal-lm") is None  # format text
    assert prompt_and_reference({"input_ids": [3, 4, 2], "labels": [7, 8, 2]}, "seq2seq") == (
        [3, 4, 2],
        [7, 8, 2],
    )


def test_task_specs_from_the_config(tmp_path):
    raw = _raw(tmp_path)
    raw["data"]["tasks"].append({"name": "plain", "train": raw["data"]["tasks"][0]["train"]})
    cfg = build_config(raw)
    assert task_specs(cfg.data, "causal-lm") == [
        TaskSpec("a", "f1", True),
        TaskSpec("c", "accuracy", True),
        TaskSpec("plain", None, False),
    ]
    assert task_specs(cfg.data, "seq-cls")[1] == TaskSpec(
        "c", "accuracy", False
    )  # a head's argmax, no generation


def test_eval_with_generation_leaves_training_unchanged(tmp_path):
    with_eval = build_config(_raw(tmp_path / "x", eval_every=1, eval_generate_limit=2))
    without = build_config(_raw(tmp_path / "y", eval_every=None))
    for cfg in (with_eval, without):
        train(cfg, **QUIET_LOG)
    a = load_file(str(tmp_path / "x" / "run" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "y" / "run" / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resumed_final_eval_reuses_the_logged_task_rows(tmp_path, monkeypatch):
    """A run whose last step was evaluated and checkpointed, then interrupted, resumes with no second eval; its
    per-task rows (the summary's table) come back with the checkpoint's state."""
    from sftlab.train.loop import Trainer

    cfg = build_config(_raw(tmp_path, save_every=4))
    real = Trainer._loop

    def interrupted(self):
        real(self)
        raise KeyboardInterrupt  # after the last step's eval and checkpoint, before final/

    monkeypatch.setattr(Trainer, "_loop", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, **QUIET_LOG)
    monkeypatch.setattr(Trainer, "_loop", real)
    before = _rows(tmp_path / "run")
    summary = train(cfg, resume=True, **QUIET_LOG)
    assert _rows(tmp_path / "run") == before  # nothing evaluated (or logged) twice
    last = [r for r in before if r.get("step") == 4 and "task" in r]
    table = {t["task"]: t for t in summary["tasks"]}
    assert [table[r["task"]]["eval"]["eval_loss"] for r in last] == [r["eval_loss"] for r in last]
