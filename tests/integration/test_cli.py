"""The CLI end to end on the shipped canonical config and tiny models."""

import json
from pathlib import Path

import pytest
from helpers import classification_rows, write_jsonl

from sftlab.cli.main import main

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
