"""`sftlab compare`: one run per method with the same budget (steps or time), its rows equal to each run's summary,
resumable after a kill, inference cost against the base model, and clear budget errors."""

import json

import pytest
from helpers import classification_rows, make_config, write_jsonl

from sftlab.errors import ConfigError
from sftlab.plan import compare as cmp
from sftlab.plan.planner import LEARNING_RATES

METHODS = ["full", "lora", "prompt"]


def _cfg(tmp, **train):
    tmp.mkdir(parents=True, exist_ok=True)
    ev = write_jsonl(tmp / "eval.jsonl", classification_rows(8))
    return make_config(
        tmp, "tiny-bert", "seq-cls", n=16, data={"eval": str(ev)}, train={"max_steps": 4, **train}
    )


def _metrics(result):
    keep = ("method", "steps", "eval_loss", "eval_accuracy", "trainable_params", "storage_bytes", "lr")
    return [{k: r[k] for k in keep} for r in result["methods"]]


def test_compare_writes_one_row_per_method_equal_to_each_run_summary(tmp_path):
    cfg = _cfg(tmp_path)
    out = tmp_path / "cmp"
    result = cmp.compare(cfg, METHODS, 3, out, latency_batches=1, log=lambda *_: None)
    assert (out / "compare.png").stat().st_size > 0
    saved = json.loads((out / "compare.json").read_text())
    assert [r["method"] for r in saved["methods"]] == METHODS
    for r in saved["methods"]:
        s = json.loads((out / r["method"] / "summary.json").read_text())
        assert r["steps"] == s["steps"] == 3
        assert (r["eval_loss"], r["eval_accuracy"]) == (s["eval_loss"], s["eval_accuracy"])
        assert r["trainable_params"] == s["trainable_params"]
        assert r["lr"] == 1e-3  # the config sets train.lr: every method uses it
        assert r["latency_ratio"] > 0
    rows = {r["method"]: r for r in result["methods"]}
    assert rows["lora"]["merged"] and not rows["prompt"]["merged"] and not rows["full"]["merged"]
    assert (
        rows["prompt"]["trainable_params"]
        < rows["lora"]["trainable_params"]
        < rows["full"]["trainable_params"]
    )
    assert len(cmp.table_rows(result)) == len(METHODS)


def test_method_learning_rate_defaults_apply_only_when_the_config_sets_none(tmp_path):
    cfg = _cfg(tmp_path)
    raw_cfg = cfg.model_copy(update={"train": cfg.train.model_copy()})
    raw_cfg.train.model_fields_set.discard("lr")  # as a config without train.lr
    for m in ("full", "lora", "prefix"):
        mcfg, why = cmp.method_config(raw_cfg, m, 5, tmp_path / "c")
        assert (mcfg.train.lr, why) == (LEARNING_RATES[m], "method default")
        mcfg, why = cmp.method_config(cfg, m, 5, tmp_path / "c")
        assert (mcfg.train.lr, why) == (1e-3, "config train.lr")
        assert mcfg.method.name == m and mcfg.train.max_steps == 5


def test_a_killed_compare_resumes_only_the_interrupted_method(tmp_path, monkeypatch):
    import sftlab.recipe as recipe
    from sftlab.train.loop import Trainer

    done = cmp.compare(_cfg(tmp_path / "a"), METHODS, 4, tmp_path / "a" / "cmp", latency_batches=1,
                       log=lambda *_: None)  # fmt: skip

    cfg = _cfg(tmp_path / "b")
    out = tmp_path / "b" / "cmp"
    real_train, real_step = recipe.train, Trainer.step
    calls = []

    def train(mcfg, **kw):
        calls.append(mcfg.method.name)
        return real_train(mcfg, **kw)

    def step(self):  # a Ctrl-C in lora's third step, the first time lora trains
        if calls == ["full", "lora"] and self.state.step == 2:
            raise KeyboardInterrupt
        return real_step(self)

    monkeypatch.setattr(Trainer, "step", step)
    monkeypatch.setattr(recipe, "train", train)
    with pytest.raises(KeyboardInterrupt):
        cmp.compare(cfg, METHODS, 4, out, latency_batches=1, log=lambda *_: None)
    assert calls == ["full", "lora"]
    assert not (out / "lora" / "final").exists() and any((out / "lora" / "checkpoints").iterdir())
    full_tree = sorted((p.relative_to(out / "full"), p.stat().st_mtime_ns) for p in (out / "full").rglob("*"))

    logs = []
    again = cmp.compare(cfg, METHODS, 4, out, latency_batches=1, log=logs.append)
    assert calls == ["full", "lora", "lora", "prompt"]  # full was not redone
    assert any("resuming from" in str(m) for m in logs)
    assert (
        sorted((p.relative_to(out / "full"), p.stat().st_mtime_ns) for p in (out / "full").rglob("*"))
        == full_tree
    )
    assert _metrics(again) == _metrics(done)


@pytest.mark.parametrize(
    "text, says",
    [("0", "positive number"), ("-3", "not a budget"), ("0m", "no time"), ("abc", "not a budget"),
     ("5 days", "not a budget")],
)  # fmt: skip
def test_budget_errors_are_clear(text, says):
    with pytest.raises(ConfigError, match=says):
        cmp.parse_budget(text)


@pytest.mark.parametrize(
    "text, budget",
    [("200", cmp.Budget(steps=200)), ("90s", cmp.Budget(seconds=90.0)), ("5m", cmp.Budget(seconds=300.0)),
     ("1.5h", cmp.Budget(seconds=5400.0)), (" 2 min ", cmp.Budget(seconds=120.0))],
)  # fmt: skip
def test_budget_takes_steps_or_a_time(text, budget):
    assert cmp.parse_budget(text) == budget


def test_a_time_budget_stops_every_method_cleanly_and_is_recorded(tmp_path):
    """--budget as a time: each method stops at the first step that reaches it (here: the first, the budget is
    tiny) although max_steps allows 500, with its final eval, a checkpoint and final/; compare.json says so."""
    cfg = _cfg(tmp_path, max_steps=500)
    out = tmp_path / "cmp"
    result = cmp.compare(cfg, ["lora", "prompt"], cmp.parse_budget("0.001s"), out, latency_batches=1,
                         log=lambda *_: None)  # fmt: skip
    saved = json.loads((out / "compare.json").read_text())
    assert saved["budget"] == {"seconds": 0.001} and saved["budget_steps"] is None
    for r in result["methods"]:
        s = json.loads((out / r["method"] / "summary.json").read_text())
        assert r["steps"] == s["steps"] == 1 and s["total_steps"] == 500
        assert r["stopped_by"] == s["stopped_by"] == "max_time" and r["status"] == "completed"
        assert "eval_loss" in s and (out / r["method"] / "final").is_dir()
        assert (out / r["method"] / "checkpoints" / "step-1").is_dir()
    assert "(time)" in cmp.table_rows(result)[0][3]


def test_generation_tokens_per_s_is_measured_against_the_base_model(tmp_path):
    """Generation tasks: every method's greedy generation tokens/s beside the base model's (LoRA merged)."""
    from helpers import alpaca_rows

    ev = write_jsonl(tmp_path / "eval.jsonl", alpaca_rows(4, seed=1))
    cfg = make_config(tmp_path, "tiny-llama", "causal-lm", n=16, data={"eval": str(ev)},
                      train={"max_steps": 2, "batch_size": 2})  # fmt: skip
    result = cmp.compare(cfg, ["lora", "prefix"], 2, tmp_path / "cmp", latency_batches=1, generation_tokens=4,
                         log=lambda *_: None)  # fmt: skip
    assert result["generation"] == {"prompts": 2, "new_tokens": 4, "greedy": True}
    assert result["base"]["generation_tokens_per_s"] > 0 and result["base"]["latency_ms_per_example"] > 0
    rows = {r["method"]: r for r in result["methods"]}
    assert rows["lora"]["merged"] and not rows["prefix"]["merged"]
    for r in rows.values():
        assert r["generation_tokens_per_s"] > 0
        assert 0.05 < r["generation_ratio"] < 20
    assert all(row[7].endswith("x") or row[7].endswith("(merged)") for row in cmp.table_rows(result))


def test_a_classification_compare_has_no_generation_numbers(tmp_path):
    result = cmp.compare(
        _cfg(tmp_path), ["lora"], 1, tmp_path / "cmp", latency_batches=1, log=lambda *_: None
    )
    assert result["generation"] is None and "generation_tokens_per_s" not in result["base"]
    assert "generation_tokens_per_s" not in result["methods"][0]


def test_compare_needs_held_out_data(tmp_path):
    cfg = make_config(tmp_path, "tiny-bert", "seq-cls", n=8)
    with pytest.raises(ConfigError, match="data.eval"):
        cmp.compare(cfg, ["lora"], 2, tmp_path / "c", log=lambda *_: None)


def test_cli_budget_error_is_one_line(tmp_path, capsys):
    from sftlab.cli.main import main

    assert main(["compare", str(tmp_path / "c.yaml"), "--budget", "10 days"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --budget: '10 days' is not a budget")
