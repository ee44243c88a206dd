"""train.report_to (issue 22 item 2): a local TensorBoard event file and an MLflow file store receive the run's
metrics.jsonl rows, its config and a final summary (read back here); metrics.jsonl and loss.png stay; a tracker whose
package is missing is a ConfigError before any step."""

from __future__ import annotations

import json
import sys

import pytest
from helpers import make_config

from sftlab.errors import ConfigError
from sftlab.files import read_jsonl
from sftlab.recipe import train
from sftlab.train import trackers


def _train(tmp_path, report_to, **train_cfg):
    cfg = make_config(
        tmp_path, data={"eval_fraction": 0.25},
        train={"max_steps": 4, "eval_every": 2, "report_to": report_to, **train_cfg},
    )  # fmt: skip
    summary = train(cfg, log=lambda *_: None)
    assert summary["status"] == "completed"
    run = tmp_path / "run"
    assert (run / "metrics.jsonl").is_file() and (run / "loss.png").is_file()  # the default record stays
    return run, read_jsonl(run / "metrics.jsonl", "metrics")


def test_tensorboard_event_file_holds_the_logged_metrics(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, rows = _train(tmp_path, ["tensorboard"])
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    train_rows = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    assert len(train_rows) == 4 and len(evals) == 2
    loss = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert loss == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in train_rows]
    assert [(e.step, e.value) for e in acc.Scalars("eval/loss")] == [
        (r["step"], pytest.approx(r["eval_loss"], rel=1e-6)) for r in evals
    ]
    assert {"train/lr", "eval/perplexity"} <= set(acc.Tags()["scalars"])
    texts = set(acc.Tags()["tensors"])  # add_text is stored as tensors
    assert {"config/text_summary", "summary/text_summary"} <= texts
    summary = acc.Tensors("summary/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"status": "completed"' in summary and '"steps": 4' in summary


def test_mlflow_file_store_receives_metrics_params_and_summary(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    import mlflow

    store = f"file://{tmp_path / 'mlruns'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps file stores behind this switch
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "sftlab-test")
    run, rows = _train(tmp_path, ["mlflow"])
    client = mlflow.tracking.MlflowClient(store)
    (exp_run,) = client.search_runs([client.get_experiment_by_name("sftlab-test").experiment_id])
    assert exp_run.info.status == "FINISHED" and exp_run.info.run_name == "run"
    history = client.get_metric_history(exp_run.info.run_id, "train/loss")
    train_rows = [r for r in rows if "loss" in r]
    assert [(m.step, m.value) for m in history] == [(r["step"], pytest.approx(r["loss"])) for r in train_rows]
    evals = client.get_metric_history(exp_run.info.run_id, "eval/loss")
    assert [m.step for m in evals] == [r["step"] for r in rows if "eval_loss" in r]
    params = exp_run.data.params
    assert params["model.name"] == "tiny-llama" and params["train.max_steps"] == "4"
    assert exp_run.data.tags["status"] == "completed"
    summary = json.loads((tmp_path / "mlruns").joinpath(
        exp_run.info.experiment_id, exp_run.info.run_id, "artifacts", "summary.json").read_text())  # fmt: skip
    assert summary["steps"] == 4 and summary["train_loss"] == pytest.approx(train_rows[-1]["loss"])


class _Fake:
    """Records the calls a tracker gets (for wandb and trackio, which are not installed for the tests)."""

    calls: list = []

    def start(self, run_dir, name, config):
        self.calls.append(("start", name, config["model"]["name"]))

    def log(self, metrics, step):
        self.calls.append(("log", step, dict(metrics)))

    def finish(self, summary, status):
        self.calls.append(("finish", status, summary["steps"]))


def test_every_metrics_row_reaches_the_tracker_once_in_order(tmp_path, monkeypatch):
    _Fake.calls = []
    monkeypatch.setitem(trackers.BACKENDS, "wandb", _Fake)
    monkeypatch.setitem(sys.modules, "wandb", object())  # "installed"
    run, rows = _train(tmp_path, ["wandb"])
    logged = [c for c in _Fake.calls if c[0] == "log"]
    expected = [(r["step"], trackers.metric_row(r)) for r in rows if trackers.metric_row(r)]
    assert [(step, m) for _, step, m in logged] == expected
    assert _Fake.calls[0] == ("start", "run", "tiny-llama") and _Fake.calls[-1] == ("finish", "completed", 4)


def test_metric_names():
    assert trackers.metric_row({"step": 3, "loss": 1.5, "lr": 0.1, "epoch": 0.5}) == {
        "train/loss": 1.5, "train/lr": 0.1, "train/epoch": 0.5}  # fmt: skip
    assert trackers.metric_row({"step": 2, "eval_loss": 2.0, "eval_perplexity": 7.4, "eval_tokens": 9}) == {
        "eval/loss": 2.0, "eval/perplexity": 7.4, "eval/tokens": 9.0}  # fmt: skip
    assert trackers.metric_row({"step": 2, "task": "qa", "eval_f1": 0.5}) == {"eval/qa/f1": 0.5}
    assert trackers.metric_row({"step": 2, "warning": "flat", "grad_norm": float("nan")}) == {}


@pytest.mark.parametrize("name", ["wandb", "trackio", "tensorboard", "mlflow"])
def test_a_missing_tracker_package_is_a_config_error_before_training(tmp_path, monkeypatch, name):
    monkeypatch.setitem(sys.modules, trackers._PACKAGES[name], None)  # import fails as if not installed
    cfg = make_config(tmp_path, train={"max_steps": 2, "report_to": [name]})
    with pytest.raises(
        ConfigError, match=rf"train.report_to: {name} needs the .* pip install 'sftlab\[{name}\]'"
    ):
        train(cfg, log=lambda *_: None)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_report_to_names_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="train.report_to"):
        make_config(tmp_path, train={"report_to": ["tensorbord"]})
