"""The UI's run-directory reader: finds runs, reads a run still being written, lines up eval results."""

from __future__ import annotations

import json
from pathlib import Path

from sftlab.ui import rundirs


def _run(d: Path, rows: list[dict] | None = None, summary: dict | None = None, **files: dict) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.yaml").write_text("model: {name: tiny-llama}\nmethod: {name: lora, r: 4}\n")
    if rows is not None:
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if summary is not None:
        (d / "summary.json").write_text(json.dumps(summary))
    for name, data in files.items():
        (d / f"{name}.json").write_text(json.dumps(data))
    return d


def test_find_runs_nested_but_not_inside_a_run(tmp_path):
    a = _run(tmp_path / "a", [{"step": 1, "loss": 2.0}])
    b = _run(tmp_path / "group" / "b", summary={"status": "completed"})
    _run(tmp_path / "a" / "checkpoints" / "step-1", [{"step": 1, "loss": 1.0}])  # a checkpoint is not a run
    (tmp_path / "compare").mkdir()
    (tmp_path / "compare" / "config.yaml").write_text("x: 1\n")  # a config without a run's files
    assert set(rundirs.find_runs(tmp_path)) == {a, b}
    assert rundirs.find_runs(tmp_path / "missing") == []
    assert rundirs.find_runs(a) == [a]


def test_metrics_of_a_run_being_written(tmp_path):
    run = _run(tmp_path / "r", [{"step": 1, "loss": 3.0}, {"step": 1, "eval_loss": 2.5, "eval_tokens": 9},
                                {"step": 2, "loss": 2.0}, {"step": 2, "task": "a", "eval_loss": 9.0}])  # fmt: skip
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')  # the trainer is mid-line
    train, evals = rundirs.read_metrics(run)
    assert [r["step"] for r in train] == [1, 2] and [r["eval_loss"] for r in evals] == [2.5]
    view = rundirs.load_view(run)
    assert view.summary is None and view.status == "unfinished"
    row = view.row(tmp_path)
    assert row["run"] == "r" and row["method"] == "lora" and row["steps"] == 2 and row["train_loss"] == 2.0
    assert row["eval_loss"] == 2.5
    assert rundirs.load_view(_run(tmp_path / "new")).status == "starting"


def test_summary_wins_over_metrics(tmp_path):
    run = _run(tmp_path / "r", [{"step": 1, "loss": 3.0}], {"status": "early-stopped", "steps": 7,
               "train_loss": 0.123456789, "tokens_per_s": 1234.56, "trainable_share": 0.0123456})  # fmt: skip
    row = rundirs.load_view(run).row()
    assert (row["status"], row["steps"], row["train_loss"], row["tokens_per_s"], row["trainable_share"]) == (
        "early-stopped",
        7,
        0.1235,
        1235.0,
        0.0123,
    )
    (run / "summary.json").write_text('{"status": ')  # half-written: treated as absent
    assert rundirs.load_view(run).status == "unfinished"


def test_eval_table_lines_up_runs(tmp_path):
    a = _run(tmp_path / "a", eval={"bleu": 61.6, "exact": {"match": 0.5}, "n": 80})
    b = _run(tmp_path / "b", eval={"bleu": 9.0, "rouge_l": 0.4, "model": "x", "greedy": True},
             quickstart={"after": {"exact": 1.0}, "examples": [{"score": 1.0}, {"score": 0.0}],
                         "method": {"r": 16}, "max_new_tokens": 41})  # fmt: skip
    c = _run(tmp_path / "c", summary={"status": "completed"})
    (c / "eval" / "sst2").mkdir(parents=True)  # `sftlab eval`'s default --out: RUN/eval/[TASK/]eval.json
    (c / "eval" / "sst2" / "eval.json").write_text(json.dumps({"accuracy": 0.9, "base": {"accuracy": 0.5},
                                                               "generation": {"max_new_tokens": 8}}))  # fmt: skip
    header, rows = rundirs.eval_table([a, b, c], tmp_path)
    assert header == ["metric", "a", "b", "c"]
    table = {r[0]: r[1:] for r in rows}
    assert table == {"eval: bleu": [61.6, 9.0, None], "eval: exact.match": [0.5, None, None],
                     "eval: n": [80, None, None], "eval: rouge_l": [None, 0.4, None],
                     "quickstart: after.exact": [None, 1.0, None], "eval/sst2/eval: accuracy": [None, None, 0.9],
                     "eval/sst2/eval: base.accuracy": [None, None, 0.5]}  # fmt: skip


def test_flatten():
    data = {"a": {"b": 1}, "c": [1, 2], "d": [{"x": 1}, {"x": 2}]}
    assert rundirs.flatten(data) == {"a.b": 1, "c": "1, 2", "d.0.x": 1, "d.1.x": 2}
    assert rundirs.flatten(data, records=False) == {"a.b": 1, "c": "1, 2"}


def test_curves_figure_draws_train_and_eval_per_run(tmp_path):
    a = rundirs.load_view(_run(tmp_path / "a", [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0},
                                                {"step": 2, "eval_loss": 2.2}]))  # fmt: skip
    b = rundirs.load_view(_run(tmp_path / "b", [{"step": 1, "loss": 4.0}]))
    fig = rundirs.curves_figure([a, b], tmp_path)
    lines = {ln.get_label(): list(ln.get_ydata()) for ln in fig.axes[0].get_lines()}
    assert lines == {"a train": [3.0, 2.0], "a eval": [2.2], "b train": [4.0]}
    empty = rundirs.curves_figure([rundirs.load_view(_run(tmp_path / "c"))])
    assert [t.get_text() for t in empty.axes[0].texts] == ["no metrics yet"]
