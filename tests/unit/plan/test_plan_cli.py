"""`sftlab plan` end to end: offline from a config.json alone, counted data, --write-config that trains, errors."""

from __future__ import annotations

import json

import pytest
from helpers import alpaca_rows, write_jsonl

from sftlab.cli.main import main
from sftlab.config import load_config
from sftlab.data import load_data
from sftlab.models import byte_tokenizer

# Llama-2-7B's published config.json (meta-llama/Llama-2-7b-hf), by hand: no download, no weights.
LLAMA2_7B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "hidden_act": "silu",
    "torch_dtype": "float16", "bos_token_id": 1, "eos_token_id": 2,
}  # fmt: skip


def plan_json(capsys, *args: str) -> dict:
    assert main(["plan", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture
def llama7b(tmp_path):
    path = tmp_path / "llama-2-7b" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(LLAMA2_7B))
    return path


def test_plan_a_7b_model_offline_from_its_config_json_alone(llama7b, capsys):
    out = plan_json(capsys, "--model", str(llama7b), "--examples", "10000", "--seq-len", "512",
                    "--device", "cuda:24GB", "--batch-size", "4")  # fmt: skip
    assert "config only, no weights" in out["model"]["source"]
    rows = {r["key"]: r for r in out["candidates"]}
    assert rows["full"]["total_params"] == 6_738_415_616  # Llama-2-7B's published parameter count
    h, f, layers = 4096, 11008, 32
    assert rows["lora-r16"]["trainable_params"] == layers * 16 * (4 * 2 * h + 3 * (h + f))
    assert rows["full"]["memory"]["weights"] == 6_738_415_616 * 2  # bf16 on CUDA
    assert rows["full"]["fits"] is False and rows["lora-r16"]["fits_checkpointed"] is True
    q, lo = rows["qlora-r16"], rows["lora-r16"]  # NF4 base: 4.13 bits a linear weight instead of 16
    assert q["available"] is True and q["trainable_params"] == lo["trainable_params"]
    assert q["memory"]["weights"] < 0.4 * lo["memory"]["weights"]
    assert rows["lora-r16"]["inference_extra_flops_per_token_merged"] == 0
    # 13.5 GB vs 160 MB: LoRA's own parameters are fp32 over the bf16 base (what final/ saves)
    assert rows["full"]["storage_per_task"] > 80 * rows["lora-r16"]["storage_per_task"]
    rec = out["recommendation"]
    assert rec["choice"] in rows and rec["choice"] != "full" and rec["reasons"]
    assert all(r["factor"] for r in rec["reasons"])


def test_data_is_counted_with_sftlabs_own_encoder(tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", alpaca_rows(40))
    out = plan_json(capsys, "--model", "tiny-llama", "--data", str(data), "--max-length", "64",
                    "--throughput", "0.01")  # fmt: skip
    cfg = load_config(overrides=["model.name=tiny-llama", f"data.train={data}", "data.max_length=64"])
    train, _ = load_data(cfg.data, byte_tokenizer(), "causal-lm")
    lengths = [len(ex["input_ids"]) for ex in train.examples]
    w = out["workload"]
    assert w["examples"] == len(lengths) == 40
    assert w["mean_tokens"] == pytest.approx(sum(lengths) / 40) and w["max_tokens"] == max(lengths)
    assert w["supervised_share"] == pytest.approx(train.stats["supervised_tokens"] / train.stats["tokens"])
    full = next(r for r in out["candidates"] if r["key"] == "full")
    assert full["time_per_epoch_s"] == pytest.approx(
        full["flops_per_token"]["train"] * w["tokens_per_epoch"] / 1e10
    )


def test_write_config_loads_and_trains_two_steps(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = write_jsonl(tmp_path / "train.jsonl", alpaca_rows(16))
    out = tmp_path / "plan.yaml"
    assert main(["plan", "--model", "tiny-llama", "--data", str(data), "--throughput", "0.01",
                 "--needs", "many-tasks", "--write-config", str(out)]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "recommendation: LoRA r=16" in printed and "maintainability (4):" in printed
    text = out.read_text()
    assert text.startswith("# written by `sftlab plan") and "# run: sftlab train" in text
    cfg = load_config(out, ["train.max_steps=2", "train.progress=false", "train.threads=1"])
    assert cfg.method.name == "lora" and cfg.method.r == 16 and cfg.train.lr == 2e-4
    assert main(["train", str(out), "train.max_steps=2", "train.progress=false", "train.threads=1"]) == 0
    summary = json.loads((tmp_path / "runs" / "lora-r16" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 2


def test_write_config_of_another_candidate(tmp_path, capsys):
    out = tmp_path / "prefix.yaml"
    assert main(["plan", "--model", "tiny-gpt2", "--examples", "100", "--seq-len", "64", "--throughput", "0.01",
                 "--write-config", str(out), "--method", "prefix"]) == 0  # fmt: skip
    cfg = load_config(out)
    assert (
        cfg.method.name == "prefix" and cfg.method.num_virtual_tokens == 16 and cfg.model.name == "tiny-gpt2"
    )
    assert "placeholder" in out.read_text()  # no --data: data.train must be pointed at the data


@pytest.mark.parametrize(
    "args,message",
    [
        (["--model", "tiny-llama", "--examples", "10", "--seq-len", "8", "--device", "tpu:8GB"], "--device"),
        (["--model", "tiny-llama"], "--data FILE"),
        (["--model", "tiny-llama", "--data", "missing.jsonl"], "missing.jsonl"),
        (
            ["--model", "tiny-llama", "--examples", "10", "--seq-len", "8", "--method", "full"],
            "--write-config",
        ),
        (["--model", "no/such-model-offline", "--examples", "10", "--seq-len", "8"], "offline"),
    ],
)
def test_bad_input_is_one_error_line(args, message, capsys):
    assert main(["plan", *args, "--throughput", "0.01"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_an_unreadable_config_is_one_error_line(tmp_path, capsys):
    bad = tmp_path / "config.json"
    bad.write_text(json.dumps({"model_type": "no-such-architecture", "hidden_size": 8}))
    assert main(["plan", "--model", str(bad), "--examples", "4", "--seq-len", "8", "--throughput", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0] and "cannot read this config" in err[0], err
    bad.write_text("{not json")
    assert main(["plan", "--model", str(bad), "--examples", "4", "--seq-len", "8", "--throughput", "1"]) == 2
    assert str(bad) in capsys.readouterr().err


def test_counting_data_needs_the_tokenizer(llama7b, tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", alpaca_rows(4))
    assert main(["plan", "--model", str(llama7b), "--data", str(data), "--throughput", "1"]) == 2
    err = capsys.readouterr().err
    assert "tokenizer" in err and "--examples N --seq-len L" in err


def test_the_table_prints_every_candidate_and_the_reasons(capsys):
    assert main(["plan", "--model", "tiny-t5", "--examples", "200", "--seq-len", "64", "--throughput", "0.01",
                 "--device", "cpu:1GB", "--needs", "low-latency"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    for label in ("full", "LoRA r=64", "DoRA r=16", "adapter (Houlsby)", "adapter (Pfeiffer)", "prefix (16)",
                  "prompt (16)", "NF4 base + LoRA r=16"):  # fmt: skip
        assert label in out
    assert "recommendation: LoRA r=16" in out and "application (3): low latency" in out


def test_a_gguf_file_is_planned_from_its_metadata(tmp_path, capsys):
    pytest.importorskip("gguf")
    from fixtures.gguf_writer import write_llama_gguf
    from transformers import LlamaForCausalLM

    from sftlab.models import tiny_config

    tok = byte_tokenizer()
    model = LlamaForCausalLM(tiny_config("tiny-llama", len(tok), "causal-lm")).eval()
    path = write_llama_gguf(model, tok, tmp_path / "tiny.gguf")
    out = plan_json(
        capsys, "--model", str(path), "--examples", "10", "--seq-len", "16", "--throughput", "0.01"
    )
    full = next(r for r in out["candidates"] if r["key"] == "full")
    assert "GGUF metadata" in out["model"]["source"]
    assert full["total_params"] == sum(p.numel() for p in model.parameters())
