"""The Train page's form: a loaded YAML with the form's values put in, validated as `sftlab train` validates it,
and the planner's estimate for the choice."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from helpers import alpaca_rows, write_jsonl

from sftlab.config import load_config
from sftlab.errors import ConfigError
from sftlab.ui import settings
from sftlab.ui.settings import TrainForm

REPO = Path(__file__).resolve().parents[2]
CANONICAL = REPO / "configs" / "tiny-llama" / "full.yaml"


def test_a_loaded_yaml_runs_unchanged(monkeypatch):
    """Load YAML then Start with no edit: the run gets the same config as `sftlab train THAT.yaml`."""
    monkeypatch.chdir(REPO)  # the shipped config's data paths are relative to the repo root
    form = settings.form_from_config(str(CANONICAL))
    assert (form.model, form.method, form.max_steps, form.output_dir) == (
        "tiny-llama",
        "full",
        100,
        "runs/demo",
    )
    raw = settings.raw_config(form, settings.read_yaml(str(CANONICAL)))
    assert raw == yaml.safe_load(CANONICAL.read_text())


def test_form_values_override_the_yaml_and_a_new_method_starts_from_its_defaults(tmp_path):
    base = {"model": {"name": "x", "dtype": "float32"}, "method": {"name": "lora", "r": 64, "alpha": 8},
            "data": {"train": "a.jsonl", "max_length": 77}, "train": {"lr": 1.0, "warmup_steps": 3}}  # fmt: skip
    form = TrainForm(model="tiny-llama", train_file="b.jsonl", method="prefix", lr=1e-3, max_steps=0,
                     virtual_tokens=4, output_dir="out")  # fmt: skip
    raw = settings.raw_config(form, base)
    assert raw["method"] == {"name": "prefix", "num_virtual_tokens": 4}  # lora's r/alpha would not validate
    assert raw["model"] == {"name": "tiny-llama", "dtype": "float32"}
    assert raw["data"] == {"train": "b.jsonl", "max_length": 77, "format": "alpaca"}
    assert (
        raw["train"]["lr"] == 1e-3 and raw["train"]["warmup_steps"] == 3 and "max_steps" not in raw["train"]
    )
    assert base["method"]["r"] == 64  # the loaded mapping is not changed
    same = settings.raw_config(TrainForm(method="lora", lora_r=16), base)["method"]
    assert same == {"name": "lora", "r": 16, "alpha": 8}  # the same method keeps its other keys


def test_write_config_validates_like_the_cli_and_leaves_no_file_on_error(tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", alpaca_rows(8))
    form = TrainForm(train_file=str(data), output_dir=str(tmp_path / "run"), lora_r=4, max_steps=3)
    path = settings.config_path(tmp_path / "state", form.output_dir)
    cfg = settings.write_config(settings.raw_config(form), path, ["method.alpha=32"])
    assert cfg.method.r == 4 and cfg.method.alpha == 32 and cfg.train.max_steps == 3
    assert load_config(path, ["method.alpha=32"]) == cfg  # what `sftlab train FILE method.alpha=32` runs
    assert path.read_text().startswith(f"# written by `sftlab ui`; run it with: sftlab train {path}\n")

    bad = TrainForm(train_file=str(data), method="lora", lora_r=4, output_dir=str(tmp_path / "run2"))
    bad_path = settings.config_path(tmp_path / "state", bad.output_dir)
    with pytest.raises(ConfigError, match="method.alpah.*alpha"):
        settings.write_config(settings.raw_config(bad), bad_path, ["method.alpah=3"])
    assert not bad_path.exists() and not bad_path.with_suffix(".tmp").exists()


def test_config_path_is_one_file_per_output_dir(tmp_path):
    assert settings.config_path(tmp_path, "runs/a b") == tmp_path / "configs" / "runs_a_b.yaml"
    assert settings.config_path(tmp_path, "runs/a") != settings.config_path(tmp_path, "runs/b")


def test_extra_overrides_name_the_bad_line():
    assert settings.parse_extra("method.alpha=32\n\n# note\n train.seed=3 ") == [
        "method.alpha=32",
        "train.seed=3",
    ]
    with pytest.raises(ConfigError, match=r"extra overrides, line 2: 'alpha 32': expected key=value"):
        settings.parse_extra("train.seed=1\nalpha 32")
    with pytest.raises(ConfigError, match="line 1"):
        settings.parse_extra("=3")


def test_plan_estimate_marks_the_choice_and_the_recommendation(tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", alpaca_rows(16))
    rows, text = settings.plan_estimate(
        TrainForm(train_file=str(data), method="lora", lora_r=16, batch_size=4)
    )
    marks = {r[1]: r[0] for r in rows}
    assert marks["LoRA r=16"].startswith(">") and sum(">" in m for m in marks.values()) == 1
    assert sum("*" in m for m in marks.values()) == 1 and "recommendation (*):" in text
    assert "your choice (>): LoRA r=16, peak" in text and "16 examples" in text
    _, text = settings.plan_estimate(TrainForm(train_file=str(data), method="ptuning"))
    assert "your choice (ptuning) has no estimate of its own" in text
    with pytest.raises(ConfigError, match="data.train: give a training file"):
        settings.plan_estimate(TrainForm(train_file=""))


def test_plan_key():
    keys = ["full", "lora-r8", "lora-r16", "houlsby", "prefix"]
    assert settings.plan_key(TrainForm(method="lora", lora_r=16), keys) == "lora-r16"
    assert settings.plan_key(TrainForm(method="lora", lora_r=4), keys) is None
    assert settings.plan_key(TrainForm(method="adapter"), keys) == "houlsby"
    assert settings.plan_key(TrainForm(method="ptuning"), keys) is None
