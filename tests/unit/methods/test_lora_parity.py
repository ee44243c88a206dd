"""LoRA / rsLoRA / DoRA / PiSSA against PEFT 0.21: same tensors give the same logits, files load both ways."""

from __future__ import annotations

import json

import pytest
import torch
from _lora_helpers import inputs, randomize
from helpers import FAMILIES, PEFT_TASK, logits, tiny_model
from torch.testing import assert_close

from sftlab.methods.lora import LoraConfig, add_adapter, load_peft_adapter, lora_layers, save_adapter

peft = pytest.importorskip("peft")

VARIANTS = {"plain": {}, "rslora": {"use_rslora": True}, "dora": {"use_dora": True}}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("name,task", FAMILIES)
def test_peft_saved_adapter_loads_with_same_logits_and_back(tmp_path, name, task, variant):
    # PEFT builds and saves an adapter with a non-zero update.
    pcfg = peft.LoraConfig(task_type=PEFT_TASK[task], r=4, lora_alpha=12, **VARIANTS[variant])
    pm = peft.get_peft_model(tiny_model(name, task), pcfg)
    randomize(pm)
    pm.eval()
    x = inputs(task)
    ref = logits(pm, x)
    pm.save_pretrained(tmp_path / "peft")

    # sftlab loads PEFT's files onto a fresh base: same logits.
    ours = tiny_model(name, task)
    cfg = load_peft_adapter(ours, tmp_path / "peft")
    assert cfg.use_dora == (variant == "dora") and cfg.use_rslora == (variant == "rslora")
    assert_close(logits(ours, x), ref)
    assert not torch.allclose(
        logits(tiny_model(name, task), x), ref, atol=1e-3
    )  # the update is really non-zero

    # sftlab saves; PEFT loads those files onto a fresh base: same logits again.
    save_adapter(ours, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(tiny_model(name, task), tmp_path / "ours").eval()
    assert_close(logits(back, x), ref)


@pytest.mark.parametrize("name,task", [("tiny-llama", "causal-lm"), ("tiny-gpt2", "causal-lm")])
def test_same_tensors_same_logits_as_peft_layers(name, task):
    """Copy sftlab's A/B/m into a PEFT model made by get_peft_model (no files involved)."""
    ours = tiny_model(name, task)
    add_adapter(ours, "default", LoraConfig(r=4, alpha=8, use_dora=True), task=task)
    randomize(ours)
    pm = peft.get_peft_model(
        tiny_model(name, task), peft.LoraConfig(task_type=PEFT_TASK[task], r=4, lora_alpha=8, use_dora=True)
    ).eval()
    mods = dict(pm.base_model.model.named_modules())
    with torch.no_grad():
        for path, layer in lora_layers(ours):
            pl = mods[path]
            pl.lora_A["default"].weight.copy_(layer.lora_A["default"])
            pl.lora_B["default"].weight.copy_(layer.lora_B["default"])
            pl.lora_magnitude_vector["default"].weight.copy_(layer.lora_magnitude_vector["default"])
    x = inputs(task)
    assert_close(logits(ours, x), logits(pm, x))


@pytest.mark.parametrize("name,task", [("tiny-llama", "causal-lm"), ("tiny-gpt2", "causal-lm")])
def test_pissa_saved_converted_loads_in_peft_on_unmodified_base(tmp_path, name, task):
    ours = tiny_model(name, task)
    add_adapter(
        ours, "default", LoraConfig(r=4, alpha=8, init="pissa", use_dora=(name == "tiny-gpt2")), task=task
    )
    randomize(ours, keys=("lora_A", "lora_B"), std=0.05)  # "training" moved A and B away from their SVD init
    x = inputs(task)
    save_adapter(ours, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16 and cfg["init_lora_weights"] is True
    back = peft.PeftModel.from_pretrained(tiny_model(name, task), tmp_path).eval()
    assert_close(logits(back, x), logits(ours, x), rtol=1e-4, atol=1e-5)


def test_all_linear_target_spec_reads_back_in_peft(tmp_path):
    ours = tiny_model("tiny-bert", "seq-cls")
    add_adapter(ours, "default", LoraConfig(r=2, target_modules="all-linear"), task="seq-cls")
    randomize(ours)
    save_adapter(ours, tmp_path)
    back = peft.PeftModel.from_pretrained(tiny_model("tiny-bert", "seq-cls"), tmp_path).eval()
    n_peft = sum(1 for n, _ in back.named_modules() if n.endswith("lora_A.default"))
    assert (
        n_peft == len(list(lora_layers(ours))) == 13
    )  # 2 layers x 6 Linear + pooler.dense; not the classifier
    x = inputs("seq-cls")
    assert_close(logits(back, x), logits(ours, x))


def test_resized_embeddings_saved_with_adapter_load_in_peft(tmp_path):
    """Added tokens (PEFT #1457): the resized embedding and head train in full and travel with the adapter."""

    def resized():
        m = tiny_model("tiny-llama", "causal-lm")
        m.resize_token_embeddings(270)  # 10 new tokens, randomly initialised differently each time
        return m

    ours = resized()
    add_adapter(ours, "default", LoraConfig(r=4, modules_to_save=["embed_tokens", "lm_head"]))
    randomize(ours)
    save_adapter(ours, tmp_path)
    x = {"input_ids": torch.tensor([[5, 265, 7, 269, 9]])}  # uses new token ids
    back = peft.PeftModel.from_pretrained(resized(), tmp_path).eval()
    assert_close(logits(back, x), logits(ours, x))
    mine = resized()
    load_peft_adapter(mine, tmp_path)
    assert torch.equal(logits(mine, x), logits(ours, x))
