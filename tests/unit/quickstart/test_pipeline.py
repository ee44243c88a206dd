"""`sftlab quickstart` end to end on tiny-llama (fast), and on the real SmolLM2 when cached (slow)."""

import json
from pathlib import Path

import pytest

import sftlab.quickstart.pipeline as pipeline
from sftlab.cli.main import main
from sftlab.demo_model import DEMO_DIRNAME, cache_root, is_complete
from sftlab.methods import get_method
from sftlab.models import load_tokenizer
from sftlab.quickstart.pipeline import (
    DEFAULT_LORA,
    MARKER,
    QuickstartOptions,
    build_run_config,
    max_new_tokens_for,
    measure,
    prepare_output_dir,
    resolve_model,
    run_quickstart,
)
from sftlab.quickstart.task import make_splits, prompt_and_reference
from sftlab.runs import load_run

TINY = dict(model="tiny-llama", steps=2, n_train=8, n_eval=4, progress=False, threads=1)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("qs") / "run"
    report = run_quickstart(QuickstartOptions(output_dir=str(out), **TINY), log=lambda m: None)
    return out, report


def test_run_dir_layout(tiny_run):
    out, report = tiny_run
    for name in ("config.yaml", "metrics.jsonl", "loss.png", "summary.json", MARKER, "predictions.jsonl",
                 "final/adapter_model.safetensors", "final/adapter_config.json", "final/sftlab.json"):  # fmt: skip
        assert (out / name).is_file(), name
    assert len((out / "data/train.jsonl").read_text().splitlines()) == 8
    assert len((out / "data/eval.jsonl").read_text().splitlines()) == 4
    assert json.loads((out / MARKER).read_text()) == json.loads(json.dumps(report))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 2
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    cfg_text = (out / "config.yaml").read_text()
    assert "name: lora" in cfg_text and "all-linear" in cfg_text and "max_steps: 2" in cfg_text
    assert report["trainable_params"] == summary["trainable_params"] > 0
    assert 0 < report["trainable_share"] < 1


def test_metrics_come_from_the_scorer_on_the_saved_adapter(tiny_run):
    out, report = tiny_run
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    _, eval_recs = make_splits(8, 4, seed=0)
    refs = [prompt_and_reference(r)[1] for r in eval_recs]
    assert [r["reference"] for r in rows] == refs
    assert report["before"]["n"] == report["after"]["n"] == 4
    prompts = [prompt_and_reference(r)[0] for r in eval_recs]
    # "after" is the reloaded final adapter: generating again from the run dir gives the same text; "before" is
    # the bare base model (the adapter's layers switched off) on the same prompts.
    model, tok, cfg = load_run(out)
    again = pipeline.generate(model, tok, cfg.data, prompts, max_new_tokens=report["max_new_tokens"])
    assert again == [r["after"] for r in rows]
    with get_method("lora").route(model, ["__base__"] * len(prompts)):
        base = pipeline.generate(model, tok, cfg.data, prompts, max_new_tokens=report["max_new_tokens"])
    assert base == [r["before"] for r in rows]
    assert len(report["examples"]) == 3 and report["examples"][0]["reference"] == refs[0]


def test_report_scores_the_generated_text_against_the_references(tmp_path, monkeypatch):
    """The report's before/after numbers are the scorer's verdict on what was generated: a model that answers
    every reference exactly scores 1.0, one that answers something else 0.0."""
    calls = []

    def scripted(model, tok, data_cfg, prompts, max_new_tokens, batch_size=1):
        calls.append(prompts)
        _, recs = make_splits(8, 4, seed=0)
        refs = {prompt_and_reference(r)[0]: prompt_and_reference(r)[1] for r in recs}
        return ["no idea"] * len(prompts) if len(calls) == 1 else [refs[p] for p in prompts]

    monkeypatch.setattr(pipeline, "generate", scripted)
    report = run_quickstart(QuickstartOptions(output_dir=str(tmp_path / "run"), **TINY), log=lambda m: None)
    assert len(calls) == 2
    assert report["before"]["exact"] == 0.0 and report["after"]["exact"] == 1.0
    assert report["after"]["fields"] == 1.0 and report["before"]["fields"] < 1.0


def test_measure_scores_generations(monkeypatch):
    _, recs = make_splits(4, 5, seed=1)
    refs = [prompt_and_reference(r)[1] for r in recs]
    cfg = build_run_config("tiny-llama", Path("unused"), QuickstartOptions())
    # Perfect answers (one wrapped in a code fence: not exact, but every field right).
    fake = [refs[0], refs[1], refs[2], refs[3], f"```json\n{refs[4]}\n```"]
    seen = {}

    def fake_generate(model, tok, data_cfg, prompts, max_new_tokens, batch_size):
        seen.update(prompts=prompts, max_new_tokens=max_new_tokens)
        return fake

    monkeypatch.setattr(pipeline, "generate", fake_generate)
    res = measure(None, None, cfg, recs, max_new_tokens=17)
    assert (res.exact, res.fields, res.n) == (0.8, 1.0, 5)
    assert seen == {"prompts": [prompt_and_reference(r)[0] for r in recs], "max_new_tokens": 17}


def test_max_new_tokens_is_just_above_the_longest_reference():
    tok = load_tokenizer("tiny-llama")  # one token per byte
    _, recs = make_splits(2, 10)
    longest = max(len(prompt_and_reference(r)[1].encode()) for r in recs)
    assert max_new_tokens_for(tok, recs) == longest + pipeline.GEN_MARGIN


def test_build_run_config_defaults_and_flags(tmp_path):
    cfg = build_run_config("tiny-llama", tmp_path, QuickstartOptions())
    assert cfg.method.name == "lora" and cfg.method.r == DEFAULT_LORA["r"] and cfg.train.epochs == 1.0
    assert cfg.train.max_steps is None and cfg.data.format == "messages"
    assert cfg.data.train == str(tmp_path / "data" / "train.jsonl")
    cfg = build_run_config("tiny-llama", tmp_path, QuickstartOptions(steps=1, lr=3e-4))
    assert cfg.train.max_steps == 1 and cfg.train.lr == 3e-4 and cfg.train.warmup_steps == 0


def test_output_dir_replaces_only_a_quickstart_run(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a quickstart run"):
        prepare_output_dir(other)
    assert (other / "notes.txt").read_text() == "mine"
    old = prepare_output_dir(tmp_path / "qs")
    (old / "stale.txt").write_text("x")
    again = prepare_output_dir(tmp_path / "qs")
    assert not (again / "stale.txt").exists() and (again / MARKER).is_file()


def test_fallback_to_tiny_model_when_the_demo_model_is_unavailable(monkeypatch):
    monkeypatch.setattr(pipeline, "obtain_demo_model", lambda log: None)
    msgs = []
    assert resolve_model(None, msgs.append) == "tiny-llama"
    assert any("unavailable" in m and "tiny-llama" in m for m in msgs)
    assert resolve_model("tiny-gpt2", msgs.append) == "tiny-gpt2"  # an explicit model is used as given


def test_cli_prints_before_after_table(tmp_path, capsys):
    out = tmp_path / "cli"
    rc = main(["quickstart", "--model", "tiny-llama", "--steps", "1", "--n-train", "4", "--n-eval", "3",
               "--output-dir", str(out), "--lr", "1e-3"])  # fmt: skip
    assert rc == 0
    text = capsys.readouterr().out
    report = json.loads((out / MARKER).read_text())
    assert "exact match" in text and "fields correct" in text and "trainable" in text and "tokens/s" in text
    assert f"{report['before']['exact']:.0%}" in text and f"{report['after']['fields']:.0%}" in text
    assert report["train"]["lr"] == 1e-3 and report["steps"] == 1
    assert main(["quickstart", "--steps", "0"]) == 2  # validated flags, no run


@pytest.mark.slow
def test_real_model_reaches_90_percent_exact_match(tmp_path):
    if not is_complete(cache_root() / DEMO_DIRNAME):
        pytest.skip("SmolLM2-135M-Instruct is not cached (run `sftlab quickstart` once)")
    report = run_quickstart(QuickstartOptions(output_dir=str(tmp_path / "qs"), progress=False), log=print)
    assert report["model"] == "smollm2-135m-instruct" and report["after"]["n"] == 100
    assert report["before"]["exact"] < 0.5
    assert report["after"]["exact"] >= 0.9
