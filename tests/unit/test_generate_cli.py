"""`sftlab generate` (issue 22 item 1): a model name or directory as well as a run directory, prompts from a file
answered in batches and written as jsonl, each answer the same as the prompt's alone."""

from __future__ import annotations

import json

import pytest
from helpers import make_config, write_jsonl

from sftlab.cli.main import main
from sftlab.recipe import train


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gen")
    cfg = make_config(tmp, train={"max_steps": 3})
    train(cfg, log=lambda *_: None)
    prompts = write_jsonl(
        tmp / "prompts.jsonl",
        [
            {"prompt": "Repeat: cat"},
            {"instruction": "Repeat: a much longer prompt here", "input": "and more"},
            {
                "messages": [
                    {"role": "user", "content": "Repeat: sun"},
                    {"role": "assistant", "content": "ref"},
                ]
            },
        ],
    )
    return tmp / "run", prompts


def _rows(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_prompts_file_in_batches_equals_one_at_a_time_and_is_written_as_jsonl(full_run, tmp_path, capsys):
    run, prompts = full_run
    out = tmp_path / "out.jsonl"
    args = ["generate", str(run), "--prompts", str(prompts), "--max-new-tokens", "4"]
    assert main([*args, "--batch-size", "3", "--output", str(out)]) == 0
    batched = _rows(out.read_text())
    assert [r["where"] for r in batched] == [f"{prompts}:{i}" for i in (1, 2, 3)]
    assert batched[1]["prompt"] == "Repeat: a much longer prompt here\n\nand more"
    assert batched[2]["prompt"] == [{"role": "user", "content": "Repeat: sun"}]  # the reference turn dropped
    capsys.readouterr()
    assert main([*args, "--batch-size", "1"]) == 0  # no --output: jsonl on stdout
    assert _rows(capsys.readouterr().out) == batched
    # the same prompt as an argument: the same answer
    assert main(["generate", str(run), "Repeat: cat", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out == f">>> Repeat: cat\n{batched[0]['completion']}\n\n"


def test_a_model_directory_generates_like_the_run_that_wrote_it(full_run, capsys):
    run, prompts = full_run  # a full fine-tune's final/ is a plain HF model directory (with the tokenizer)
    capsys.readouterr()
    assert main(["generate", str(run), "--prompts", str(prompts), "--max-new-tokens", "4"]) == 0
    from_run = _rows(capsys.readouterr().out)
    assert main(["generate", str(run / "final"), "--prompts", str(prompts), "--max-new-tokens", "4"]) == 0
    assert _rows(capsys.readouterr().out) == from_run
    assert main(["generate", "tiny-llama", "hello", "--max-new-tokens", "2"]) == 0  # a built-in model by name
    assert capsys.readouterr().out.startswith(">>> hello\n")


def test_bad_prompt_inputs_are_one_error_line(full_run, tmp_path, capsys):
    run, _ = full_run
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok"}, {"question": "where?"}])
    assert main(["generate", str(run), "--prompts", str(bad)]) == 2
    err = capsys.readouterr().err
    assert (
        f"{bad}:2: prompt: expected a non-empty `prompt` string, a `messages` list or an alpaca `instruction`"
        in err
    )
    assert "record has question" in err
    assert main(["generate", str(run)]) == 2
    assert "give prompts as arguments or --prompts FILE" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["generate", str(tmp_path / "empty"), "hi"]) == 2
    assert (
        "neither a run directory (no config.yaml) nor a model directory (no config.json)"
        in capsys.readouterr().err
    )
