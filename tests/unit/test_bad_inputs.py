"""Issue 16, item 12: inputs that gave tracebacks give one clear error naming the key/file (or, for generation
beyond a model's positions, a capped run with a warning), and a failed command leaves the run directory as it was.

(a) data.max_length / --max-new-tokens beyond a model's position table, (b) an unknown model name offline,
(c) an output directory sftlab cannot write into, (d) truncated or garbled safetensors in final/, (e) a broken
final/sftlab.json, adapter_config.json or metrics.jsonl."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from helpers import file_tree, make_config

from sftlab.cli.main import main
from sftlab.errors import ModelError, RunDirError
from sftlab.generate import generate
from sftlab.models import build_tiny, position_limit
from sftlab.recipe import train

QUIET = dict(log=lambda *_: None)


# -- (a) lengths beyond the model's positions --------------------------------------------------------------


def test_position_limits_of_each_family():
    """Learned position tables have a hard limit (RoBERTa's starts after padding_idx, BART's after its offset);
    rotary (LLaMA) and relative (T5) positions have none."""
    from transformers import BartConfig, BartModel, RobertaConfig, RobertaModel

    assert position_limit(build_tiny("tiny-gpt2")[0]) == 512
    assert position_limit(build_tiny("tiny-bert")[0]) == 512
    assert position_limit(build_tiny("tiny-llama")[0]) is None
    assert position_limit(build_tiny("tiny-t5")[0]) is None
    small = dict(
        num_hidden_layers=1, num_attention_heads=2, intermediate_size=8, hidden_size=8, vocab_size=20
    )
    roberta = RobertaModel(RobertaConfig(max_position_embeddings=66, **small))
    assert position_limit(roberta) == 64
    with pytest.raises((IndexError, RuntimeError)):  # the limit is real: one token more crashes
        roberta(torch.ones(1, 65, dtype=torch.long) * 3)
    roberta(torch.ones(1, 64, dtype=torch.long) * 3)
    bart = BartModel(
        BartConfig(
            d_model=8, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
            encoder_ffn_dim=8, decoder_ffn_dim=8, vocab_size=20, max_position_embeddings=32,
        )
    )  # fmt: skip
    assert position_limit(bart) == 32


@pytest.mark.parametrize(
    "model,task,key",
    [("tiny-gpt2", "causal-lm", "n_positions=512"), ("tiny-bert", "seq-cls", "max_position_embeddings=512")],
)
def test_max_length_beyond_positions_is_refused_before_training(tmp_path, model, task, key):
    rows = [{"text": "word " * 150}] * 4 if task == "causal-lm" else None  # 750 tokens: past 512 when kept
    cfg = make_config(
        tmp_path, model=model, task=task, fmt="text" if rows else None, rows=rows, data={"max_length": 600}
    )
    with pytest.raises(ModelError, match=rf"data\.max_length=600 .*{key}.*at most 512"):
        train(cfg, **QUIET)
    assert not Path(cfg.train.output_dir).exists()


def test_virtual_tokens_count_against_the_positions(tmp_path):
    cfg = make_config(
        tmp_path,
        model="tiny-gpt2",
        method={"name": "prefix", "num_virtual_tokens": 16},
        data={"max_length": 500},
    )
    with pytest.raises(ModelError, match=r"data\.max_length=500 plus the 16 virtual tokens .*at most 496"):
        train(cfg, **QUIET)
    ok = make_config(
        tmp_path / "ok", model="tiny-gpt2", method={"name": "prefix", "num_virtual_tokens": 16},
        data={"max_length": 496}, train={"max_steps": 1},
    )  # fmt: skip
    assert train(ok, **QUIET)["status"] == "completed"


def test_cli_train_max_length_error_is_one_line(tmp_path, capsys):
    cfg = make_config(tmp_path, model="tiny-gpt2")
    args = ["train", f"data.train={cfg.data.train}", "model.name=tiny-gpt2", "data.max_length=1000"]
    assert main([*args, f"train.output_dir={tmp_path / 'run'}", "train.progress=false"]) == 2
    err = capsys.readouterr().err
    assert "error: data.max_length=1000 is beyond the model's positions" in err and "Traceback" not in err


def _no_eos_gpt2():
    """tiny-gpt2 that generates until max_new_tokens, whatever the random model says; `model.lengths` records
    the length of every sequence it generated (prompt + new tokens)."""
    model, tok = build_tiny("tiny-gpt2")
    model.generation_config.eos_token_id = None
    model.lengths, plain = [], model.generate

    def recorded(**kw):
        out = plain(**kw)
        model.lengths.append(out.shape[1])
        return out

    model.generate = recorded
    return model, tok


def test_generate_caps_new_tokens_to_the_positions_with_a_warning(caplog):
    model, tok = _no_eos_gpt2()
    prompt = "hello world"
    width = len(tok(prompt)["input_ids"])
    with caplog.at_level(logging.WARNING, logger="sftlab.generate"):
        generate(model, tok, None, [prompt], max_new_tokens=1000, chat=False)
    assert model.lengths == [512]  # prompt + capped reply fill the positions, no more
    assert any(
        f"max_new_tokens=1000 capped to {512 - width}" in r.getMessage()
        and "n_positions=512" in r.getMessage()
        for r in caplog.records
    )


def test_generate_with_virtual_tokens_and_a_prompt_that_fills_the_model():
    model, tok = _no_eos_gpt2()
    generate(model, tok, None, ["hi"], max_new_tokens=1000, chat=False, reserved_positions=500)
    assert model.lengths == [512 - 500]
    with pytest.raises(ModelError, match=r"prompt: 600 tokens leave no room to generate: tiny-gpt2 has 512"):
        generate(model, tok, None, ["x" * 600], max_new_tokens=5, chat=False)


# -- (b) an unknown model name offline ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["not/a-model", "/no/such/dir"])
def test_unknown_model_offline_says_what_it_is_not(tmp_path, capsys, monkeypatch, name):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = make_config(tmp_path)
    rc = main(
        [
            "train", f"model.name={name}", f"data.train={cfg.data.train}",
            f"train.output_dir={tmp_path / 'run'}", "train.progress=false",
        ]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert (
        f"error: model.name: '{name}' is not a local directory, not a built-in tiny name (tiny-llama, " in err
    )
    assert "not a .gguf file, and the Hugging Face hub is offline (HF_HUB_OFFLINE=1)" in err
    assert not (tmp_path / "run").exists()


def test_a_directory_that_is_not_a_model_is_named(tmp_path):
    from sftlab.hub import load_tokenizer

    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelError, match="is a directory but not a model's: no config.json"):
        load_tokenizer(str(tmp_path))


# -- (c) an output directory sftlab cannot write into --------------------------------------------------------


def test_unwritable_output_dir_is_refused_before_loading_anything(tmp_path, monkeypatch):
    """Simulated (tests may run as root, whom permissions do not stop): the probe file cannot be created."""
    import sftlab.rundir as rundir

    def denied(*_, **kw):
        raise PermissionError(13, "Permission denied", str(kw.get("dir")))

    cfg = make_config(tmp_path, train={"output_dir": str(tmp_path / "ro" / "run")})
    (tmp_path / "ro").mkdir()
    loaded = []
    monkeypatch.setattr(rundir.tempfile, "mkstemp", denied)
    monkeypatch.setattr("sftlab.recipe.load_tokenizer", lambda *a: loaded.append(a))
    with pytest.raises(
        RunDirError, match=rf"train\.output_dir: {tmp_path}/ro/run: not writable \(it would be "
    ):
        train(cfg, **QUIET)
    assert loaded == [] and list((tmp_path / "ro").iterdir()) == []


def test_read_only_output_dir_for_real(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("this user writes through directory permissions (root)")
        cfg = make_config(tmp_path / "cfg")
        rc = main(
            ["train", f"data.train={cfg.data.train}", "model.name=tiny-llama",
             f"train.output_dir={ro / 'run'}", "train.progress=false"]
        )  # fmt: skip
        err = capsys.readouterr().err
        assert rc == 2 and f"train.output_dir: {ro / 'run'}: not writable" in err
    finally:
        ro.chmod(0o755)


def test_output_dir_under_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    cfg = make_config(tmp_path, train={"output_dir": str(tmp_path / "f" / "run")})
    with pytest.raises(RunDirError, match=r"train\.output_dir: .*/f/run: .*/f is a file, not a directory"):
        train(cfg, **QUIET)


def test_merge_into_an_unwritable_parent_is_refused(tmp_path, runs, monkeypatch, capsys):
    import sftlab.rundir as rundir

    def denied(*_, **kw):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(rundir.tempfile, "mkstemp", denied)
    assert main(["merge", str(runs["lora"]), str(tmp_path / "merged")]) == 2
    assert f"OUT_DIR (its parent): {tmp_path}: not writable" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


# -- (d, e) damaged files in a run's final/ and logs ---------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A LoRA run and a full fine-tuning run of tiny-gpt2 (one step each), to copy and damage."""
    out = {}
    for method in ("lora", "full"):
        tmp = tmp_path_factory.mktemp(method)
        cfg = make_config(tmp, model="tiny-gpt2", method={"name": method}, train={"max_steps": 1})
        assert train(cfg, **QUIET)["status"] == "completed"
        out[method] = Path(cfg.train.output_dir)
    return out


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _garble_header(p: Path) -> None:
    p.write_bytes(os.urandom(64) + p.read_bytes()[64:])


def _break_json(p: Path) -> None:
    p.write_text(p.read_text()[:-5])


DAMAGE = [  # (run, file in final/, damage, message)
    ("lora", "adapter_model.safetensors", _truncate, "not a valid safetensors file (truncated?)"),
    ("lora", "adapter_model.safetensors", _garble_header, "not a valid safetensors file (truncated?)"),
    ("full", "model.safetensors", _truncate, "not a valid safetensors file (truncated?)"),
    ("lora", "sftlab.json", _break_json, "broken run info"),
    ("full", "sftlab.json", lambda p: p.write_text("[1, 2]"), "broken run info: expected a JSON object"),
    ("lora", "adapter_config.json", _break_json, "broken JSON file"),
    ("full", "config.json", _break_json, "broken JSON file"),
]
COMMANDS = {
    "eval": lambda run, tmp: ["eval", str(run)],
    "generate": lambda run, tmp: ["generate", str(run), "hello"],
    "merge": lambda run, tmp: ["merge", str(run), str(tmp / "merged")],
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize(
    "which,name,damage,message", DAMAGE, ids=[f"{d[0]}-{d[1]}-{d[2].__name__}" for d in DAMAGE]
)
def test_damaged_final_files_are_named(tmp_path, runs, capsys, command, which, name, damage, message):
    if command == "merge" and which == "full":
        pytest.skip("a full fine-tuning run has nothing to merge")
    run = tmp_path / "run"
    shutil.copytree(runs[which], run)
    damage(run / "final" / name)
    before = file_tree(run)
    rc = main(COMMANDS[command](run, tmp_path))
    err = capsys.readouterr().err
    assert rc == 2, err
    assert f"error: {run / 'final' / name}" in err and message in err
    assert file_tree(run) == before and not (tmp_path / "merged").exists()


def test_label_names_of_the_wrong_type_are_named(tmp_path, runs):
    from sftlab.runs import load_run

    run = tmp_path / "run"
    shutil.copytree(runs["lora"], run)
    info = run / "final" / "sftlab.json"
    info.write_text(json.dumps({**json.loads(info.read_text()), "label_names": "pos"}))
    with pytest.raises(RunDirError, match=r"sftlab\.json: label_names: expected a list of strings or null"):
        load_run(run)


def test_broken_metrics_log_on_resume_is_named(tmp_path):
    cfg = make_config(tmp_path, train={"max_steps": 2, "save_every": 1})
    assert train(cfg, **QUIET)["status"] == "completed"
    metrics = Path(cfg.train.output_dir) / "metrics.jsonl"
    lines = metrics.read_text().splitlines(keepends=True)
    metrics.write_text(lines[0] + '{"step": 2, "loss": \n' + "".join(lines[1:]))
    resumed = cfg.model_copy(deep=True)
    resumed.train.max_steps = 3
    with pytest.raises(RunDirError, match=rf"{metrics}:2: broken metrics log"):
        train(resumed, resume=True, **QUIET)


def test_a_metrics_row_cut_short_by_a_kill_is_dropped_on_resume(tmp_path):
    cfg = make_config(tmp_path, train={"max_steps": 2, "save_every": 1})
    assert train(cfg, **QUIET)["status"] == "completed"
    metrics = Path(cfg.train.output_dir) / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 3, "lo')  # no newline: the write was cut short
    resumed = cfg.model_copy(deep=True)
    resumed.train.max_steps = 3
    assert train(resumed, resume=True, **QUIET)["status"] == "completed"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
