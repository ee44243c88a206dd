"""The CLI end to end on the shipped canonical config and tiny models."""

import json
from pathlib import Path

import pytest
from helpers import classification_rows, make_config, write_jsonl

from sftlab.cli.main import main
from sftlab.config import dump_config

ROOT = Path(__file__).resolve().parents[2]
CANONICAL = ROOT / "configs" / "tiny-llama" / "full.yaml"


@pytest.mark.parametrize("cmd", [[], ["train"], ["eval"], ["generate"], ["merge"], ["convert"]])
def test_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([*cmd, "--help"])
    assert e.value.code == 0
    assert "usage: sftlab" in capsys.readouterr().out


def test_train_eval_generate_canonical_config(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(
        [
            "train",
            str(CANONICAL),
            f"train.output_dir={out}",
            "train.max_steps=6",
            "train.eval_every=3",
            "train.save_every=3",
            "train.progress=false",
            "train.threads=1",
            "method.name=freeze",
            "method.trainable_layers=1",
        ]
    )
    assert rc == 0
    assert "completed: 6 steps" in capsys.readouterr().out
    resolved = (out / "config.yaml").read_text()
    assert "trainable_layers: 1" in resolved and "max_steps: 6" in resolved

    assert main(["eval", str(out)]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["examples"] == 40 and res["eval_loss"] > 0 and res["eval_perplexity"] > 1

    assert main(["generate", str(out), "Reverse the order of the words.", "--max-new-tokens", "5"]) == 0
    assert ">>> Reverse the order of the words." in capsys.readouterr().out

    # resume of a finished run is a no-op that still completes
    assert (
        main(
            [
                "train",
                str(CANONICAL),
                f"train.output_dir={out}",
                "train.max_steps=6",
                "train.progress=false",
                "method.name=freeze",
                "method.trainable_layers=1",
                "train.eval_every=3",
                "train.save_every=3",
                "train.threads=1",
                "--resume",
            ]
        )
        == 0
    )


def test_bad_config_value_exits_2_with_message(tmp_path, capsys):
    rc = main(["train", str(CANONICAL), "train.schedule=cosin", f"train.output_dir={tmp_path}"])
    assert rc == 2
    assert "train.schedule: 'cosin' is not allowed" in capsys.readouterr().err


def test_malformed_record_stops_before_training(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n')
    rc = main(
        ["train", str(CANONICAL), f"data.train={bad}", "data.eval=null", f"train.output_dir={tmp_path / 'r'}"]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert f"{bad}:2" in err and "output" in err
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_seq_cls_eval_reports_accuracy(tmp_path, capsys):
    data = write_jsonl(tmp_path / "cls.jsonl", classification_rows(24))
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "model.name=tiny-bert",
                "model.task=seq-cls",
                f"data.train={data}",
                "data.format=classification",
                f"train.output_dir={out}",
                "train.max_steps=3",
                "train.progress=false",
                "train.threads=1",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["eval", str(out)]) == 0
    res = json.loads(capsys.readouterr().out)
    assert 0.0 <= res["eval_accuracy"] <= 1.0 and res["examples"] == 24


def test_an_os_error_mid_command_is_one_error_line_naming_the_path(tmp_path, capsys, monkeypatch):
    import sftlab.recipe

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device", str(tmp_path / "run" / "checkpoints" / "step-4"))

    monkeypatch.setattr(sftlab.recipe, "train", full_disk)
    cfg = make_config(tmp_path)
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(cfg))
    assert main(["train", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.strip() == f"error: No space left on device: {tmp_path / 'run' / 'checkpoints' / 'step-4'}"


def test_sftlab_warnings_print_as_warning_lines(monkeypatch):
    import warnings

    from sftlab.cli import main as cli_main

    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)
    cli_main._plain_warnings()
    ours = warnings.formatwarning("warmup is longer than the run", UserWarning, "/x/src/sftlab/config.py", 3)
    theirs = warnings.formatwarning("deprecated", FutureWarning, "/x/transformers/utils.py", 7)
    assert ours == "warning: warmup is longer than the run\n"
    assert theirs.startswith("/x/transformers/utils.py:7: FutureWarning: deprecated")
