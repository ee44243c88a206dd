"""A run directory is replaced only by a run that started, never one sftlab did not write, and a failed resume
leaves it as it was; `sftlab merge` never overwrites a model or reports one it did not write."""

import json
from pathlib import Path

import pytest
from helpers import file_tree, make_config

from sftlab.cli.main import main
from sftlab.recipe import train
from sftlab.rundir import ASIDE, MANIFEST
from sftlab.train.loop import Trainer

QUIET = dict(log=lambda *_: None)


def _good_run(tmp_path: Path, **train_kw):
    cfg = make_config(tmp_path, train={"max_steps": 2, "save_every": 1, **train_kw})
    assert train(cfg, **QUIET)["status"] == "completed"
    return cfg, Path(cfg.train.output_dir)


def _bad_data(tmp_path: Path) -> str:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n')
    return str(bad)


# -- 1. --overwrite keeps the old run until the new one has started ------------------------------------------


def test_overwrite_with_malformed_data_keeps_the_old_run(tmp_path):
    cfg, run = _good_run(tmp_path)
    before = file_tree(run)
    assert "final/model.safetensors" in before and any(k.startswith("checkpoints/step-") for k in before)
    new = cfg.model_copy(deep=True)
    new.data.train = _bad_data(tmp_path)
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        train(new, overwrite=True, **QUIET)
    assert file_tree(run) == before


def test_overwrite_that_fails_before_its_first_checkpoint_restores_the_old_run(tmp_path, monkeypatch):
    cfg, run = _good_run(tmp_path)
    before = file_tree(run)

    def crash(self):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(Trainer, "step", crash)
    with pytest.raises(RuntimeError, match="out of memory"):
        train(cfg, overwrite=True, **QUIET)
    assert file_tree(run) == before
    assert not (run / ASIDE).exists()


def test_overwrite_that_starts_replaces_the_old_run(tmp_path):
    cfg, run = _good_run(tmp_path, max_steps=3)
    new = cfg.model_copy(deep=True)
    new.train.max_steps = 1
    assert train(new, overwrite=True, **QUIET)["status"] == "completed"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-1"]  # the old step-2/3 are gone
    assert not (run / ASIDE).exists()
    assert json.loads((run / "summary.json").read_text())["steps"] == 1


# -- 2. only what sftlab wrote -------------------------------------------------------------------------------


def test_overwrite_refuses_a_directory_sftlab_did_not_write(tmp_path):
    cfg = make_config(tmp_path)
    run = Path(cfg.train.output_dir)
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "mine.bin").write_bytes(b"precious")
    (run / "config.yaml").write_text("experiment: theirs\n")
    before = file_tree(run)
    with pytest.raises(FileExistsError, match=rf"{run} is not an sftlab run .*config.yaml, checkpoints"):
        train(cfg, overwrite=True, **QUIET)
    assert file_tree(run) == before


def test_training_into_a_foreign_config_yaml_refuses_and_leaves_it(tmp_path):
    cfg = make_config(tmp_path)
    run = Path(cfg.train.output_dir)
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("my: own config\n")
    with pytest.raises(FileExistsError, match="not an sftlab run"):
        train(cfg, **QUIET)
    assert (run / "config.yaml").read_text() == "my: own config\n"
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml"]


def test_a_run_from_before_the_manifest_can_still_be_overwritten(tmp_path):
    cfg, run = _good_run(tmp_path)
    (run / MANIFEST).unlink()
    assert train(cfg, overwrite=True, **QUIET)["status"] == "completed"
    assert (run / MANIFEST).is_file()


# -- 3. a failed --resume leaves config.yaml as it was -------------------------------------------------------


@pytest.mark.parametrize("change", ["method", "data"])
def test_failed_resume_leaves_config_yaml_byte_identical(tmp_path, change):
    cfg, run = _good_run(tmp_path)
    before = file_tree(run)
    new = cfg.model_copy(deep=True)
    new.train.max_steps = 4
    if change == "method":
        new = make_config(tmp_path, method={"name": "lora"}, train={"max_steps": 4, "save_every": 1})
        match = "checkpoint does not match the model"
    else:
        new.data.train = _bad_data(tmp_path)
        match = "bad.jsonl:2"
    with pytest.raises(ValueError, match=match):
        train(new, resume=True, **QUIET)
    assert file_tree(run) == before


# -- 4. sftlab merge -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora")
    cfg = make_config(tmp, method={"name": "lora"}, train={"max_steps": 1})
    train(cfg, **QUIET)
    return Path(cfg.train.output_dir)


def test_merge_refuses_an_existing_runs_final_and_force_replaces_it(tmp_path, lora_run, capsys):
    target = tmp_path / "other" / "final"
    target.mkdir(parents=True)
    (target / "adapter_model.safetensors").write_bytes(b"a trained adapter")
    assert main(["merge", str(lora_run), str(target)]) == 2
    assert f"{target} is not empty" in capsys.readouterr().err
    assert [p.name for p in target.iterdir()] == ["adapter_model.safetensors"]

    assert main(["merge", str(lora_run), str(target), "--force"]) == 0
    assert f"merged model written to {target}" in capsys.readouterr().out
    names = {p.name for p in target.iterdir()}
    assert {"config.json", "model.safetensors"} <= names and "adapter_model.safetensors" not in names
    assert not any(p.name.startswith(".") for p in target.parent.iterdir())  # no temp dir left


def test_merge_onto_a_file_refuses_and_writes_nothing(tmp_path, lora_run, capsys):
    target = tmp_path / "merged"
    target.write_text("not a directory")
    for extra in ([], ["--force"]):
        assert main(["merge", str(lora_run), str(target), *extra]) == 2
        out = capsys.readouterr()
        assert "is a file" in out.err and "merged model written" not in out.out
    assert target.read_text() == "not a directory"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_merge_reports_success_only_with_the_files(tmp_path, lora_run, capsys, monkeypatch):
    from transformers import PreTrainedModel

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", lambda self, *a, **k: None)
    target = tmp_path / "merged"
    assert main(["merge", str(lora_run), str(target)]) == 2
    out = capsys.readouterr()
    assert "merged model written" not in out.out and "model.safetensors" in out.err
    assert not target.exists() and list(tmp_path.iterdir()) == []
