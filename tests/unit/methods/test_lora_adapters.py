"""Named adapters on one base: switch, disable, delete, per-row routing; method save/load round trip."""

from __future__ import annotations

import json

import torch
from _lora_helpers import inputs, randomize
from helpers import logits, tiny_model
from torch.testing import assert_close

from sftlab.methods import MethodContext, get_method
from sftlab.methods.lora import (
    BASE,
    LoraConfig,
    LoraLayer,
    SavedModule,
    adapter_per_row,
    add_adapter,
    delete_adapter,
    disable_adapters,
    load_peft_adapter,
    lora_layers,
    merge_adapter,
    save_adapter,
    set_adapter,
)


def _two_adapters(name: str, task: str):
    model = tiny_model(name, task)
    add_adapter(model, "a", LoraConfig(r=4), task=task)
    add_adapter(model, "b", LoraConfig(r=2, use_dora=True, target_modules="all-linear"), task=task)
    for seed, adapter in ((3, "a"), (4, "b")):
        randomize(
            model,
            keys=(f"lora_B.{adapter}", f"lora_magnitude_vector.{adapter}", f"modules_to_save.{adapter}"),
            seed=seed,
        )
    return model


def _trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_switch_adapters_and_only_active_trains():
    model = _two_adapters("tiny-llama", "causal-lm")
    x = inputs("causal-lm")
    assert all(".a" in n or n.endswith(".a") for n in _trainable(model))  # first added stays active
    out_a = logits(model, x)
    set_adapter(model, "b")
    assert _trainable(model) and all(n.endswith(".b") for n in _trainable(model))
    out_b = logits(model, x)
    assert not torch.allclose(out_a, out_b, atol=1e-4)
    set_adapter(model, "a")
    assert torch.equal(logits(model, x), out_a)


def test_disable_gives_exact_base_outputs_even_after_merge():
    base = tiny_model("tiny-bert", "seq-cls")
    model = _two_adapters("tiny-bert", "seq-cls")
    x = inputs("seq-cls")
    ref = logits(base, x)
    assert not torch.allclose(logits(model, x), ref, atol=1e-4)
    with disable_adapters(model):
        assert torch.equal(logits(model, x), ref)
    merge_adapter(model)
    with disable_adapters(model):  # unmerges first
        assert_close(logits(model, x), ref)


def test_mixed_batch_equals_each_row_alone():
    for name, task in (("tiny-llama", "causal-lm"), ("tiny-bert", "seq-cls"), ("tiny-t5", "seq2seq")):
        model = _two_adapters(name, task)
        x = inputs(task, batch=4)
        rows = ["a", "b", BASE, "a"]
        with adapter_per_row(model, rows):
            mixed = logits(model, x)
        for i, adapter in enumerate(rows):
            xi = {k: v[i : i + 1] for k, v in x.items()}
            if adapter == BASE:
                with disable_adapters(model):
                    alone = logits(model, xi)
            else:
                set_adapter(model, adapter)
                alone = logits(model, xi)
            assert_close(mixed[i : i + 1], alone, msg=f"{name} row {i} ({adapter})")


def test_delete_adapter_restores_plain_modules():
    base = tiny_model("tiny-llama", "causal-lm")
    model = tiny_model("tiny-llama", "causal-lm")
    add_adapter(model, "p", LoraConfig(r=4, init="pissa"))
    add_adapter(model, "q", LoraConfig(r=4, target_modules=["k_proj"]))
    delete_adapter(model, "p")  # PiSSA put part of W into A0/B0: deleting puts it back
    assert {p.rsplit(".", 1)[-1] for p, _ in lora_layers(model)} == {"k_proj"}
    delete_adapter(model, "q")
    assert not any(isinstance(m, (LoraLayer, SavedModule)) for m in model.modules())
    x = inputs("causal-lm")
    assert_close(logits(model, x), logits(base, x))
    assert {n for n, _ in model.named_parameters()} == {n for n, _ in base.named_parameters()}


def test_method_save_load_round_trip(tmp_path):
    spec = get_method("lora")
    ctx = MethodContext(task="seq-cls", base_model_name="tiny-bert")
    cfg = spec.config(r=4, alpha=8, use_dora=True)
    model = tiny_model("tiny-bert", "seq-cls")
    spec.apply(model, cfg, ctx)
    randomize(model)
    spec.save(model, cfg, tmp_path, ctx)
    conf = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (
        conf["peft_type"] == "LORA"
        and conf["task_type"] == "SEQ_CLS"
        and conf["modules_to_save"] == ["classifier"]
    )
    assert conf["base_model_name_or_path"] == "tiny-bert" and conf["target_modules"] == ["query", "value"]
    fresh = tiny_model("tiny-bert", "seq-cls")
    spec.apply(fresh, cfg, ctx)
    spec.load(fresh, cfg, tmp_path, ctx)
    x = inputs("seq-cls")
    assert torch.equal(logits(fresh, x), logits(model, x))


def test_pissa_round_trip_through_method_files(tmp_path):
    ctx = MethodContext(task="causal-lm")
    cfg = LoraConfig(r=4, init="pissa")
    spec = get_method("lora")
    model = tiny_model("tiny-llama", "causal-lm")
    spec.apply(model, cfg, ctx)
    randomize(model, keys=("lora_A", "lora_B"), std=0.05)
    spec.save(model, cfg, tmp_path, ctx)
    fresh = tiny_model("tiny-llama", "causal-lm")
    spec.apply(
        fresh, cfg, ctx
    )  # PiSSA again on the fresh base, then load swaps in the converted rank-8 adapter
    spec.load(fresh, cfg, tmp_path, ctx)
    x = inputs("causal-lm")
    assert_close(logits(fresh, x), logits(model, x), rtol=1e-4, atol=1e-5)
    assert next(layer for _, layer in lora_layers(fresh)).lora_A["default"].shape[0] == 8


def test_second_named_adapter_saved_and_loaded_by_name(tmp_path):
    model = _two_adapters("tiny-gpt2", "causal-lm")
    save_adapter(model, tmp_path, name="b")
    set_adapter(model, "b")
    x = inputs("causal-lm")
    ref = logits(model, x)
    fresh = tiny_model("tiny-gpt2", "causal-lm")
    load_peft_adapter(fresh, tmp_path, name="b")
    assert_close(logits(fresh, x), ref)
