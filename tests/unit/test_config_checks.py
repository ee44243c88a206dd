"""Bad config and command-line values are clear errors naming the key (issue 16, items 8-10): strict bools, finite
numbers, output/data paths, gradient clipping, betas, seeds, duplicate YAML keys, eval/generate options, freeze
blocks beyond the model, and a warmup longer than the run (a warning)."""

import os
import typing
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import make_config

from sftlab.cli.main import build_parser
from sftlab.config import SEED_MAX, ConfigError, RunConfig, build_config, load_config
from sftlab.methods import MethodConfigBase, get_method, method_names
from sftlab.strict import StrictModel

BASE = {"model": {"name": "tiny-llama"}, "data": {"train": "x.jsonl"}}


def _with(section: str, **values) -> dict:
    raw = {k: dict(v) for k, v in BASE.items()}
    raw.setdefault(section, {}).update(values)
    return raw


def _bool_fields() -> list[tuple[str, dict, str]]:
    """(dotted key, raw config sections around it, field) for every bool field of the run config and every
    method's config, so a bool added later is checked too."""
    out = []
    for section, field in RunConfig.model_fields.items():
        model = field.annotation
        if section == "method" or not (isinstance(model, type) and issubclass(model, StrictModel)):
            continue
        for name, f in model.model_fields.items():
            if bool in typing.get_args(f.annotation) or f.annotation is bool:
                out.append((f"{section}.{name}", {}, name))
    for m in method_names():
        cfg = get_method(m).config
        for name, f in cfg.model_fields.items():
            if name in MethodConfigBase.model_fields and m != "lora":
                continue  # a field every method has: checked once
            if bool in typing.get_args(f.annotation) or f.annotation is bool:
                extra = {"name": m, **({"trainable_layers": 1} if m == "freeze" else {})}
                out.append((f"method.{name}", extra, name))
    return out


def _bool_config(section: str, extra: dict, name: str, value) -> dict:
    raw = _with(section, **extra, **{name: value})
    if (section, name) == ("method", "per_task"):  # one adapter per task needs tasks
        raw["data"] = {"tasks": [{"name": "a", "train": "x.jsonl"}]}
    return raw


BOOLS = _bool_fields()


def test_the_bool_fields_are_found():
    keys = {k for k, _, _ in BOOLS}
    assert {"model.trust_remote_code", "data.train_on_prompt", "perf.packing", "method.use_dora"} <= keys
    assert len(keys) >= 19


@pytest.mark.parametrize("key,extra,name", BOOLS, ids=[k for k, _, _ in BOOLS])
def test_every_bool_takes_only_true_or_false(key, extra, name):
    section = key.split(".")[0]
    for ok in (True, False):
        cfg = build_config(_bool_config(section, extra, name, ok))
        assert getattr(getattr(cfg, section), name) is ok
    for bad in ("yes", "true", "no", 1, 0, "1"):
        with pytest.raises(ConfigError, match=rf"{key}: must be true(,| or) false.* \(got {bad!r}\)"):
            build_config(_bool_config(section, extra, name, bad))


def test_yaml_booleans_still_work(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text(
        "model: {name: tiny-llama}\ndata: {train: x.jsonl, train_on_prompt: true}\n"
        "train: {progress: false}\nperf: {packing: null, fused_loss: no}\n"
    )
    cfg = load_config(p, ["train.group_by_length=false"])
    assert (
        cfg.data.train_on_prompt is True
        and cfg.train.progress is False
        and cfg.train.group_by_length is False
    )
    assert cfg.perf.packing is None and cfg.perf.fused_loss is False


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("train.max_steps", True, "must be a number, not true/false"),
        ("train.lr", float("inf"), "finite number"),
        ("train.lr", float("nan"), "finite number"),
        ("data.eval_fraction", float("nan"), "finite number"),
    ],
)
def test_numbers_are_finite_numbers(key, value, message):
    section, name = key.split(".")
    with pytest.raises(ConfigError, match=rf"{key}: .*{message}"):
        build_config(_with(section, **{name: value}))


# -- item 10: max_grad_norm, betas, seed -------------------------------------------------------------------------


@pytest.mark.parametrize("value", [-1, 0, -0.5])
def test_max_grad_norm_must_be_positive_or_null(value):
    with pytest.raises(ConfigError, match=rf"train\.max_grad_norm: must be > 0 or null \(got {value}\)"):
        build_config(_with("train", max_grad_norm=value))


def test_max_grad_norm_null_or_positive_loads():
    assert build_config(_with("train", max_grad_norm=None)).train.max_grad_norm is None
    assert build_config(_with("train", max_grad_norm=0.5)).train.max_grad_norm == 0.5


@pytest.mark.parametrize("betas", [[0.9, 1.0], [1.5, 0.999], [-0.1, 0.999], [0.9, -1e-9]])
def test_betas_outside_0_1_are_refused(betas):
    with pytest.raises(ConfigError, match=r"train\.betas: each beta must be in \[0, 1\)"):
        build_config(_with("train", betas=betas))


def test_betas_inside_0_1_load():
    assert build_config(_with("train", betas=[0.0, 0.999])).train.betas == (0.0, 0.999)


@pytest.mark.parametrize("seed", [-1, SEED_MAX + 1, 2**64 + 1])
def test_seed_outside_numpys_range_is_refused(seed):
    with pytest.raises(ConfigError, match=rf"train\.seed: must be in \[0, {SEED_MAX}\] \(got {seed}\)"):
        build_config(_with("train", seed=seed))


def test_the_largest_seed_is_one_every_seeded_library_takes():
    assert build_config(_with("train", seed=SEED_MAX)).train.seed == SEED_MAX
    torch.manual_seed(SEED_MAX)
    np.random.seed(SEED_MAX)
    np.random.default_rng(SEED_MAX)
    with pytest.raises(ValueError):
        np.random.seed(SEED_MAX + 1)  # why the bound is numpy's


# -- item 9: paths -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["train.output_dir", "data.train", "data.eval"])
@pytest.mark.parametrize("value", ["", "   "])
def test_empty_paths_are_refused(key, value):
    section, name = key.split(".")
    with pytest.raises(ConfigError, match=rf"{key}: must be a path, not empty"):
        build_config(_with(section, **{name: value}))


def test_tilde_is_your_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cfg = build_config(
        {**_with("train", output_dir="~/runs/x"), "data": {"train": "~/d.jsonl", "eval": "~/e"}}
    )
    home = tmp_path / "home"
    assert cfg.train.output_dir == str(home / "runs" / "x")
    assert (cfg.data.train, cfg.data.eval) == (str(home / "d.jsonl"), str(home / "e"))


def test_training_into_tilde_writes_under_home_not_a_tilde_folder(tmp_path, monkeypatch):
    from sftlab.recipe import train

    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    cfg = make_config(tmp_path, train={"max_steps": 1, "output_dir": "~/run"})
    assert train(cfg, log=lambda *_: None)["status"] == "completed"
    assert (home / "run" / "final").is_dir()
    assert not (cwd / "~").exists() and list(cwd.iterdir()) == []


@pytest.fixture
def layout(tmp_path, monkeypatch):
    """cwd/ with a config in cwd/configs/ and a data file beside it."""
    cwd = tmp_path / "cwd"
    (cwd / "configs").mkdir(parents=True)
    (cwd / "configs" / "beside.jsonl").write_text("{}\n")
    (cwd / "here.jsonl").write_text("{}\n")
    monkeypatch.chdir(cwd)
    return cwd


def _config(cwd: Path, train: str) -> Path:
    p = cwd / "configs" / "run.yaml"
    p.write_text(yaml.safe_dump({**BASE, "data": {"train": train}, "train": {"output_dir": "runs/a"}}))
    return p


def test_relative_paths_resolve_against_the_working_directory(layout):
    cfg = load_config(_config(layout, "here.jsonl"))
    assert cfg.data.train == "here.jsonl" and Path(cfg.data.train).resolve() == layout / "here.jsonl"
    assert Path(cfg.train.output_dir).resolve() == layout / "runs" / "a"  # not configs/runs/a
    # the same value as an override means the same file
    assert load_config(_config(layout, "x"), ["data.train=here.jsonl"]).data == cfg.data


def test_a_data_path_that_exists_only_beside_the_config_names_the_path_to_write(layout):
    with pytest.raises(
        ConfigError,
        match=r"run\.yaml: data\.train: 'beside\.jsonl' does not exist from the working directory .*"
        rf"resolve against the working directory.*did you mean '{os.path.join('configs', 'beside.jsonl')}'",
    ):
        load_config(_config(layout, "beside.jsonl"))
    assert load_config(_config(layout, "configs/beside.jsonl")).data.train == "configs/beside.jsonl"


# -- item 10: duplicate YAML keys --------------------------------------------------------------------------------


def test_a_duplicate_key_names_file_and_line(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text(
        "model: {name: tiny-llama}\ndata: {train: x.jsonl}\ntrain:\n  lr: 1.0e-4\n  max_steps: 5\n  lr: 1\n"
    )
    with pytest.raises(ConfigError, match=rf"{p}:6: duplicate key 'lr' \(first on line 4\)"):
        load_config(p)
    p.write_text("model: {name: tiny-llama}\ndata: {train: x.jsonl}\nmodel: {name: tiny-gpt2}\n")
    with pytest.raises(ConfigError, match=rf"{p}:3: duplicate key 'model' \(first on line 1\)"):
        load_config(p)
    with pytest.raises(ConfigError, match=r"duplicate key 'a'"):
        load_config(None, ["model.name=tiny-llama", "data.train=x", "method={name: lora, a: 1, a: 2}"])


def test_yaml_merge_keys_may_still_be_overridden(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text(
        "data: {train: x.jsonl}\nmodel:\n  <<: {name: tiny-gpt2, task: causal-lm}\n  name: tiny-llama\n"
    )
    assert load_config(p).model.name == "tiny-llama"


# -- item 10: eval/generate options ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv,message",
    [
        (["eval", "RUN", "--batch-size", "0"], "argument --batch-size: must be a positive integer (got 0)"),
        (["eval", "RUN", "--batch-size", "-3"], "argument --batch-size: must be a positive integer (got -3)"),
        (["generate", "RUN", "hi", "--temperature", "-1"], "argument --temperature: must be >= 0 (got -1)"),
        (
            ["generate", "RUN", "hi", "--temperature", "nan"],
            "argument --temperature: 'nan' is not a finite number",
        ),
        (["generate", "RUN", "hi", "--top-p", "0"], "argument --top-p: must be in (0, 1] (got 0)"),
        (["generate", "RUN", "hi", "--top-p", "1.5"], "argument --top-p: must be in (0, 1] (got 1.5)"),
        (
            ["generate", "RUN", "hi", "--max-new-tokens", "0"],
            "argument --max-new-tokens: must be a positive integer",
        ),
    ],
)
def test_bad_eval_and_generate_options_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_good_generate_options_parse():
    args = build_parser().parse_args(["generate", "RUN", "hi", "--temperature", "0.7", "--top-p", "0.9"])
    assert (args.temperature, args.top_p, args.max_new_tokens) == (0.7, 0.9, 128)


@pytest.mark.parametrize(
    "kw,message",
    [
        ({"temperature": -1.0}, r"temperature must be >= 0"),
        ({"temperature": float("nan")}, r"temperature must be >= 0"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"max_new_tokens": 0}, r"max_new_tokens must be a positive integer"),
    ],
)
def test_generate_checks_its_arguments(kw, message):
    from helpers import tiny_model

    from sftlab.generate import generate
    from sftlab.models import byte_tokenizer

    with pytest.raises(ConfigError, match=message):
        generate(tiny_model("tiny-llama", "causal-lm"), byte_tokenizer(), None, ["hi"], **kw)


# -- item 10: freeze blocks beyond the model; warmup beyond the run ----------------------------------------------


def test_trainable_layers_beyond_the_model_names_the_key_and_the_count(tmp_path):
    from sftlab.recipe import prepare

    cfg = make_config(tmp_path, method={"name": "freeze", "trainable_layers": 5})
    with pytest.raises(ConfigError, match=r"method\.trainable_layers: 5 is more blocks than the model has "
                       r"\(model\.layers: 2\); use at most 2"):  # fmt: skip
        prepare(cfg, log=lambda *_: None)
    cfg = make_config(tmp_path, method={"name": "freeze", "trainable_layers": 2, "train_head": False})
    model = prepare(cfg, log=lambda *_: None)[0]
    assert all(p.requires_grad for n, p in model.named_parameters() if n.startswith("model.layers."))


@pytest.mark.parametrize("train_kw", [{"max_steps": 3}, {"max_steps": None, "epochs": 1, "batch_size": 16}])
def test_warmup_not_shorter_than_the_run_warns(tmp_path, train_kw):
    from sftlab.recipe import prepare
    from sftlab.train.loop import Trainer

    cfg = make_config(
        tmp_path, n=32, train={"warmup_steps": 4, "output_dir": str(tmp_path / "r"), **train_kw}
    )
    model, tok, data, _ = prepare(cfg, log=lambda *_: None)

    def trainer(c):
        return Trainer(model=model, cfg=c, task="causal-lm", train_examples=data.examples, pad_id=0,
                       run_dir=tmp_path / "r", log=lambda *_: None)  # fmt: skip

    with pytest.warns(
        UserWarning, match=r"train\.warmup_steps: 4 is not shorter than the run \([23] steps\)"
    ):
        trainer(cfg.train)
    ok = cfg.train.model_copy(update={"warmup_steps": 1})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainer(ok)
