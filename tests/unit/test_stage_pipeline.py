"""`sftlab pipeline` (issue 18 item 2): stages run in order from the previous stage's model, equal running them by
hand, a finished stage is never redone, an interrupted one resumes bit-identically, a LoRA stage is merged first."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from helpers import alpaca_rows, classification_rows, write_jsonl
from safetensors.torch import load_file

from sftlab.cli.main import main
from sftlab.config import build_config
from sftlab.errors import ConfigError, DataError
from sftlab.merged import merge_run
from sftlab.pipeline import load_pipeline, run_pipeline
from sftlab.recipe import train
from sftlab.train.loop import Trainer

ROOT = Path(__file__).resolve().parents[2]
COMMON = {"batch_size": 4, "lr": 1e-3, "schedule": "constant", "progress": False, "threads": 1}


def _quiet(msg):
    pass


@pytest.fixture
def files(tmp_path):
    text = tmp_path / "domain.txt"
    text.write_text(
        "\n".join(
            f"the {w} river runs by the {v} stone" for w in "ab cd ef gh".split() for v in "ij kl".split()
        )
    )
    return {
        "text": str(text),
        "alpaca": str(write_jsonl(tmp_path / "sft.jsonl", alpaca_rows(16))),
        "cls": str(write_jsonl(tmp_path / "cls.jsonl", classification_rows(16))),
    }


def clm_then_sft(files, stage1_method=None, sft=None) -> dict:
    return {
        "stages": [
            {"name": "domain", "model": {"name": "tiny-llama"}, "method": stage1_method or {"name": "full"},
             "data": {"train": files["text"], "max_length": 16},
             "train": {"objective": "clm", "max_steps": 4, **COMMON}},
            {"name": "sft", "model": {"init_from": "previous"}, "method": {"name": "full"},
             "data": {"train": files["alpaca"], "format": "alpaca", "max_length": 64},
             "train": {"max_steps": 6, "save_every": 2, **COMMON, **(sft or {})}},
        ]
    }  # fmt: skip


def write_pipe(path: Path, pipe: dict, out: Path) -> Path:
    path.write_text(yaml.safe_dump({"output_dir": str(out), **pipe}, sort_keys=False))
    return path


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "final" / "model.safetensors")


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def by_hand(stage: dict, run_dir: Path, model_name: str | None = None) -> dict:
    raw = json.loads(json.dumps(stage))
    raw.pop("name")
    raw["model"].pop("init_from", None)
    if model_name:
        raw["model"]["name"] = model_name
    raw["train"]["output_dir"] = str(run_dir)
    return train(build_config(raw), log=_quiet)


def test_mlm_then_classifier_equals_the_two_runs_by_hand(tmp_path, files, capsys):
    pipe = {"stages": [
        {"name": "mlm", "model": {"name": "tiny-bert"}, "data": {"train": files["text"], "max_length": 16},
         "train": {"objective": "mlm", "max_steps": 4, **COMMON}},
        {"name": "cls", "model": {"init_from": "previous", "task": "seq-cls"},
         "method": {"name": "freeze", "trainable_layers": 1},
         "data": {"train": files["cls"], "format": "classification", "max_length": 32},
         "train": {"max_steps": 4, **COMMON}},
    ]}  # fmt: skip
    path = write_pipe(tmp_path / "pipe.yaml", pipe, tmp_path / "pipe")
    assert main(["pipeline", str(path)]) == 0
    assert "completed: pipeline in" in capsys.readouterr().out
    record = json.loads((tmp_path / "pipe" / "pipeline.json").read_text())
    assert record["status"] == "completed"
    assert [(r["name"], r["status"], r["task"]) for r in record["stages"]] == [
        ("mlm", "completed", "masked-lm"), ("cls", "completed", "seq-cls")]  # fmt: skip
    first = tmp_path / "pipe" / "01-mlm"
    assert (
        record["stages"][1]["model"] == str(first / "final")
        and record["stages"][1]["init_from"] == "previous"
    )

    by_hand(pipe["stages"][0], tmp_path / "hand1")
    by_hand(pipe["stages"][1], tmp_path / "hand2", str(tmp_path / "hand1" / "final"))
    assert same(weights(first), weights(tmp_path / "hand1"))
    assert same(weights(tmp_path / "pipe" / "02-cls"), weights(tmp_path / "hand2"))


@pytest.mark.parametrize("stop", [KeyboardInterrupt, RuntimeError])
def test_a_stopped_stage_2_resumes_alone_and_bit_identically(tmp_path, files, monkeypatch, stop):
    pipe = clm_then_sft(files)
    whole = run_pipeline(load_pipeline(write_pipe(tmp_path / "a.yaml", pipe, tmp_path / "a")), log=_quiet)
    assert whole["status"] == "completed"

    real = Trainer._optimizer_step

    def stop_stage_2(self):
        if self.run_dir.name == "02-sft" and self.state.step == 3:
            raise stop("stopped in stage 2")
        return real(self)

    monkeypatch.setattr(Trainer, "_optimizer_step", stop_stage_2)
    path = write_pipe(tmp_path / "b.yaml", pipe, tmp_path / "b")
    with pytest.raises(stop):
        run_pipeline(load_pipeline(path), log=_quiet)
    monkeypatch.undo()
    record = json.loads((tmp_path / "b" / "pipeline.json").read_text())
    status = "interrupted" if stop is KeyboardInterrupt else "failed"
    assert record["status"] == status and [r["status"] for r in record["stages"]] == ["completed", status]
    stage1 = tmp_path / "b" / "01-domain"
    before = {p: p.stat().st_mtime_ns for p in stage1.rglob("*") if p.is_file()}

    lines: list[str] = []
    record = run_pipeline(load_pipeline(path), log=lines.append)
    assert record["status"] == "completed"
    assert f"pipeline: stage 1/2 domain: finished in {stage1}, kept" in lines
    assert any(line.startswith(f"resumed from {tmp_path / 'b' / '02-sft' / 'checkpoints'}") for line in lines)
    assert {p: p.stat().st_mtime_ns for p in stage1.rglob("*") if p.is_file()} == before  # stage 1 untouched
    assert same(weights(tmp_path / "b" / "02-sft"), weights(tmp_path / "a" / "02-sft"))
    sft_rows = [json.loads(x) for x in (tmp_path / "b" / "02-sft" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in sft_rows if "loss" in r] == list(range(1, 7))  # each step logged once

    lines.clear()  # a third run trains nothing
    assert run_pipeline(load_pipeline(path), log=lines.append)["status"] == "completed"
    assert [line for line in lines if "kept" in line] == [
        f"pipeline: stage 1/2 domain: finished in {stage1}, kept",
        f"pipeline: stage 2/2 sft: finished in {tmp_path / 'b' / '02-sft'}, kept",
    ]


def test_a_lora_stage_is_merged_before_the_next_as_sftlab_merge_does_by_hand(tmp_path, files):
    pipe = clm_then_sft(files, {"name": "lora", "r": 4, "target_modules": "all-linear"})
    record = run_pipeline(load_pipeline(write_pipe(tmp_path / "p.yaml", pipe, tmp_path / "p")), log=_quiet)
    merged = tmp_path / "p" / "01-domain.merged"
    assert record["stages"][0]["output"] == str(merged) and record["stages"][1]["model"] == str(merged)
    assert (merged / "config.json").is_file() and not (merged / "adapter_config.json").exists()
    saved = yaml.safe_load((tmp_path / "p" / "02-sft" / "config.yaml").read_text())
    assert saved["model"]["name"] == str(merged)

    by_hand(pipe["stages"][0], tmp_path / "hand1")
    merge_run(tmp_path / "hand1", tmp_path / "hand1-merged")
    by_hand(pipe["stages"][1], tmp_path / "hand2", str(tmp_path / "hand1-merged"))
    assert same(
        load_file(merged / "model.safetensors"), load_file(tmp_path / "hand1-merged" / "model.safetensors")
    )
    assert same(weights(tmp_path / "p" / "02-sft"), weights(tmp_path / "hand2"))
    base = build_config({"model": {"name": "tiny-llama"}, "data": {"train": files["text"], "format": "text"}})
    from sftlab.recipe import prepare

    plain = prepare(base, log=_quiet)[0].state_dict()
    lora_merged = load_file(merged / "model.safetensors")
    changed = [k for k in plain if k in lora_merged and not torch.equal(plain[k], lora_merged[k])]
    assert any("q_proj" in k for k in changed)  # the adapter's update is in the weights stage 2 starts from


def test_a_changed_stage_config_or_a_retrained_previous_stage_is_refused(tmp_path, files):
    pipe = clm_then_sft(files)
    path = write_pipe(tmp_path / "p.yaml", pipe, tmp_path / "p")
    run_pipeline(load_pipeline(path), log=_quiet)
    pipe["stages"][1]["train"]["lr"] = 5e-4
    write_pipe(path, pipe, tmp_path / "p")
    with pytest.raises(
        ConfigError,
        match=r"stages\[1\] \(sft\): .*02-sft holds a run of another config \(train.lr: 0.001 -> 0.0005\)",
    ):
        run_pipeline(load_pipeline(path), log=_quiet)
    pipe["stages"][1]["train"]["lr"] = 1e-3
    pipe["stages"][0]["train"]["max_steps"] = 5
    write_pipe(path, pipe, tmp_path / "p")
    import shutil

    shutil.rmtree(
        tmp_path / "p" / "01-domain"
    )  # stage 1 redone with another config: stage 2 came from the old one
    with pytest.raises(
        ConfigError,
        match=r"stages\[1\] \(sft\): its run in .*02-sft started from another output of stage 'domain'",
    ):
        run_pipeline(load_pipeline(path), log=_quiet)


def _pipe_error(tmp_path, stages, error=ConfigError) -> str:
    path = write_pipe(tmp_path / "bad.yaml", {"stages": stages}, tmp_path / "out")
    with pytest.raises(error) as e:
        run_pipeline(load_pipeline(path), log=_quiet)
    assert not (tmp_path / "out").exists()  # nothing written
    return str(e.value)


def test_bad_pipelines_are_refused_before_anything_runs(tmp_path, files):
    good = clm_then_sft(files)["stages"]
    first = {**good[0], "model": {"init_from": "previous"}}
    assert "stages[0].model.init_from: previous: the first stage has no previous stage" in _pipe_error(
        tmp_path, [first]
    )
    assert "stages[1]: trian: unknown key (did you mean 'train'?)" in _pipe_error(
        tmp_path, [good[0], {"trian": {}}]
    )
    prompt = {**good[0], "method": {"name": "prompt", "num_virtual_tokens": 2}}
    msg = _pipe_error(tmp_path, [prompt, good[1]])
    assert (
        "stages[1].model.init_from: previous: stage 'domain' trains method prompt, which cannot be merged"
        in msg
    )
    out = {**good[1], "train": {**good[1]["train"], "output_dir": "x"}}
    assert "stages[1].train.output_dir: set by the pipeline" in _pipe_error(tmp_path, [good[0], out])
    both = {**good[1], "model": {"init_from": "previous", "name": "tiny-llama"}}
    assert "stages[1].model: name and init_from: previous both say" in _pipe_error(tmp_path, [good[0], both])
    missing = {**good[1], "data": {**good[1]["data"], "train": str(tmp_path / "nope.jsonl")}}
    assert "stages[1] (sft): data.train:" in _pipe_error(tmp_path, [good[0], missing], DataError)
    bad_cfg = {**good[1], "train": {**good[1]["train"], "lr": -1}}
    assert "stages[1] (sft): invalid config" in _pipe_error(tmp_path, [good[0], bad_cfg])


SHIPPED = sorted((ROOT / "examples" / "pipeline").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_pipelines_validate_and_run_on_the_real_files(path, shared_dir, tmp_path, monkeypatch):
    assert path.read_text().startswith(f"# sftlab pipeline examples/pipeline/{path.name}")
    monkeypatch.chdir(ROOT)  # data paths are relative to the repo root
    pipe = load_pipeline(path, str(tmp_path / "pipe"))
    assert len(pipe.stages) == 2 and pipe.stages[1].init_from == "previous"
    for s in pipe.stages:  # a few steps on a little of the real data
        s.cfg.data.limit, s.cfg.train.max_steps, s.cfg.train.epochs = 40, 2, None
        s.cfg.train.eval_every = s.cfg.train.save_every = None
        s.cfg.train.warmup_steps, s.cfg.train.progress, s.cfg.train.threads = 0, False, 1
    assert run_pipeline(pipe, log=_quiet)["status"] == "completed"
