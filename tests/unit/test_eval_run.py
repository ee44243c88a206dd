"""`sftlab eval` end to end on tiny runs (issue 22 item 1): generation metrics with the run's template and batched
answers equal to one-at-a-time ones, references grouped by prompt, --base the same way; seq-cls predictions, confusion
matrix and per-class scores with the run's own label names for every method, base included."""

from __future__ import annotations

import json
import sys

import pytest
from helpers import classification_rows, make_config, write_jsonl

from sftlab.cli.main import main
from sftlab.data import encode_prompt
from sftlab.errors import DataError
from sftlab.eval.run import EvalOptions, evaluate_run
from sftlab.generate import Answers, generate_ids
from sftlab.hub import load_model
from sftlab.recipe import train
from sftlab.runs import load_run


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lm")
    rows = [{"instruction": f"Repeat: {w}", "input": "", "output": f"{w} {w}"} for w in ("cat", "dog", "sun")]
    rows += [
        {"instruction": "Repeat: cat", "input": "", "output": "cat cat cat"}
    ]  # a second reference for cat
    rows += [
        {"instruction": "Describe", "input": "a long prompt " * 2, "output": "long"}
    ]  # prompts of two lengths
    cfg = make_config(tmp, rows=rows, method={"name": "lora", "r": 4}, train={"max_steps": 3})
    train(cfg, log=lambda *_: None)
    return tmp / "run", rows


def _one_at_a_time(model, tok, data_cfg, prompt, max_new):
    ids = encode_prompt(tok, data_cfg, prompt)
    (new,) = generate_ids(model, tok, [ids], max_new_tokens=max_new, batch_size=1)
    return Answers(tok).text(new)


def test_generation_eval_answers_every_prompt_once_with_the_runs_template(lm_run, tmp_path):
    run, rows = lm_run
    res = evaluate_run(
        run, EvalOptions(metrics=["exact", "f1", "bleu", "loss"], batch_size=3, base=True, out=str(tmp_path))
    )
    assert res["records"] == 5 and res["prompts"] == 4 and res["examples"] == 5
    preds = _rows(tmp_path / "predictions.jsonl")
    assert [r["prompt"] for r in preds] == [
        "Repeat: cat",
        "Repeat: dog",
        "Repeat: sun",
        "Describe\n\n" + rows[4]["input"],
    ]
    assert preds[0]["references"] == ["cat cat", "cat cat cat"]
    model, tok, cfg = load_run(run)
    max_new = res["generation"]["max_new_tokens"]
    for (
        r
    ) in preds:  # batched (3 a batch, longest first, left-padded) == each prompt alone through the template
        assert r["prediction"] == _one_at_a_time(model, tok, cfg.data, r["prompt"], max_new)
    assert res["exact"] == pytest.approx(sum(r["scores"]["exact"] for r in preds) / 4)
    assert "eval_loss" in res and "eval_perplexity" in res["base"]
    # --base: the base model, the same prompts, the same way
    base, _ = load_model(cfg.model.name, "causal-lm", tokenizer=tok)
    base_preds = _rows(tmp_path / "predictions_base.jsonl")
    assert [r["prompt"] for r in base_preds] == [r["prompt"] for r in preds]
    for r in base_preds:
        assert r["prediction"] == _one_at_a_time(base.eval(), tok, cfg.data, r["prompt"], max_new)
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["bleu"] == res["bleu"] and saved["base"]["bleu"] == res["base"]["bleu"]


def test_eval_cli_prints_the_before_after_table_and_writes_under_the_run(lm_run, capsys):
    run, _ = lm_run
    capsys.readouterr()
    assert main(["eval", str(run), "--generate", "--max-new-tokens", "3", "--base"]) == 0
    out = capsys.readouterr().out
    table, doc = out[: out.index("{")], json.loads(out[out.index("{") :])
    assert table.splitlines()[0].split() == ["metric", "base", "fine-tuned"]
    assert [line.split()[0] for line in table.splitlines()[1:]] == ["exact", "f1"]  # --generate's defaults
    assert doc["generation"]["max_new_tokens"] == 3 and doc["out"] == str(run / "eval")
    assert len(_rows(run / "eval" / "predictions.jsonl")) == doc["prompts"] == 4


def test_eval_cli_refuses_bad_metric_requests(lm_run, tmp_path, capsys, monkeypatch):
    run, _ = lm_run
    with pytest.raises(SystemExit):
        main(["eval", str(run), "--metrics", "exact,blue"])
    assert (
        "expected a comma-separated list of exact, f1, acc, bleu, chrf, rouge, loss (got 'exact,blue')"
        in (capsys.readouterr().err)
    )
    monkeypatch.setitem(sys.modules, "sacrebleu", None)
    assert main(["eval", str(run), "--metrics", "bleu"]) == 2
    assert "needs the 'sacrebleu' package" in capsys.readouterr().err


METHODS = {"lora": {"r": 4}, "adapter": {"reduction_factor": 8}, "prefix": {"num_virtual_tokens": 4}}


@pytest.mark.parametrize("method", METHODS)
def test_seq_cls_predictions_use_the_runs_label_names_for_every_method(tmp_path, capsys, method):
    rows = classification_rows(40)
    ev = write_jsonl(tmp_path / "eval.jsonl", rows[24:])
    cfg = make_config(
        tmp_path, "tiny-bert", "seq-cls", rows=rows[:24], method={"name": method, **METHODS[method]},
        data={"eval": str(ev), "label_names": ["pos", "neg"]}, train={"max_steps": 4, "eval_every": 4, "lr": 3e-2},
    )  # fmt: skip
    summary = train(cfg, log=lambda *_: None)
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run"), "--base"]) == 0
    out = capsys.readouterr().out
    printed = json.loads(out[out.index("{") :])
    saved = json.loads((tmp_path / "run" / "eval" / "eval.json").read_text())
    assert printed["per_class"] == saved["per_class"]
    for side, doc in (("model", saved), ("base", saved["base"])):
        assert doc["confusion_matrix"]["labels"] == ["pos", "neg"], side
        assert set(doc["per_class"]) == {"pos", "neg"}, side
        matrix = doc["confusion_matrix"]["rows_true_columns_predicted"]
        assert sum(map(sum, matrix)) == 16 and [sum(r) for r in matrix] == [
            sum(r["label"] == name for r in rows[24:]) for name in ("pos", "neg")
        ]
        assert doc["accuracy"] == pytest.approx(doc["eval_accuracy"])  # predictions agree with the objective
    assert saved["eval_accuracy"] == summary["eval_accuracy"]
    preds = _rows(tmp_path / "run" / "eval" / "predictions.jsonl")
    assert [p["label"] for p in preds] == [r["label"] for r in rows[24:]]
    assert {p["prediction"] for p in preds} <= {"pos", "neg"}
    assert {p["prediction"] for p in _rows(tmp_path / "run" / "eval" / "predictions_base.jsonl")} <= {
        "pos",
        "neg",
    }
    assert sum(p["correct"] for p in preds) == round(saved["accuracy"] * 16)


def test_seq_cls_eval_refuses_generation_metrics(tmp_path, capsys):
    cfg = make_config(tmp_path, "tiny-bert", "seq-cls", train={"max_steps": 1})
    train(cfg, log=lambda *_: None)
    assert main(["eval", str(tmp_path / "run"), "--metrics", "bleu"]) == 2
    assert "a seq-cls run predicts a class, it does not generate" in capsys.readouterr().err


def test_eval_data_may_be_a_datasets_yaml_name_from_the_run_dir(lm_run, tmp_path, monkeypatch):
    run, rows = lm_run
    held = write_jsonl(tmp_path / "held.jsonl", [{"q": "Repeat: sun", "a": "sun sun"}])
    (run / "datasets.yaml").write_text(
        f"held:\n  file: {held}\n  format: alpaca\n  columns: {{instruction: q, output: a}}\n"
    )
    monkeypatch.chdir(tmp_path)
    res = evaluate_run(run, EvalOptions(data="held", generate=True, max_new_tokens=2, write=False))
    assert res["data"] == str(held) and res["prompts"] == 1
    with pytest.raises(
        DataError, match="--data: .hled. is neither a file nor a dataset name.*known names: held"
    ):
        evaluate_run(run, EvalOptions(data="hled", generate=True, write=False))


def test_overwriting_a_run_replaces_its_evaluation_too(tmp_path, capsys):
    """RUN/eval/ is sftlab's (the run's manifest lists it): a run started over with --overwrite does not keep the old
    run's eval.json, which would describe another model."""
    cfg = make_config(tmp_path, "tiny-bert", "seq-cls", train={"max_steps": 1})
    train(cfg, log=lambda *_: None)
    assert main(["eval", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "eval" / "eval.json").is_file()
    train(cfg, overwrite=True, log=lambda *_: None)
    assert not (tmp_path / "run" / "eval").exists() and (tmp_path / "run" / "final").is_dir()
