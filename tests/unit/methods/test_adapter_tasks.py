"""Bottleneck adapters: save/load, several task adapters on one base, per-row mixed batches."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import FAMILIES, adamw, logits, mean_loss, random_inputs, tiny_model, train_steps
from transformers import LlamaConfig, LlamaForCausalLM

from sftlab.methods import MethodContext, get_method
from sftlab.methods.adapter import (
    AdapterConfig,
    active_adapter,
    adapter_per_row,
    adapter_state_dict,
    add_adapter,
    delete_adapter,
    disable_adapters,
    load_adapter,
    save_adapter,
    set_adapter,
)
from sftlab.methods.adapter.adapter_map import find_insertion_points


def inputs(task: str, rows: int = 3) -> dict:
    return random_inputs(task, rows, 9, seed=2, pad=None)


def randomise(model, name: str, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_state_dict(model, name).values():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.mark.parametrize("name,task", FAMILIES)
def test_save_then_load_into_fresh_base_gives_identical_logits(tmp_path, name, task):
    spec, ctx = get_method("adapter"), MethodContext(task=task, base_model_name=name)
    cfg = spec.config(placement="houlsby", layer_norm=True, activation="silu", bottleneck_size=6)
    model, batch = tiny_model(name, task), inputs(task)
    spec.apply(model, cfg, ctx)
    randomise(model, "default", seed=0)
    want = logits(model, batch)
    spec.save(model, cfg, tmp_path, ctx)

    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["method"] == "adapter" and saved["model_type"] == model.config.model_type
    assert (
        saved["hidden_size"] == 64
        and saved["bottleneck_size"] == 6
        and saved["base_model_name_or_path"] == name
    )
    from safetensors.torch import load_file

    keys = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert keys == set(adapter_state_dict(model, "default"))  # adapter (+ head) tensors only, no base weights
    assert all(".adapter." in k or k.startswith("modules_to_save.") for k in keys)

    via_contract = tiny_model(name, task)  # the run's reload path: apply, then load
    spec.apply(via_contract, cfg, ctx)
    spec.load(via_contract, cfg, tmp_path, ctx)
    torch.testing.assert_close(logits(via_contract, batch), want, rtol=0, atol=0)

    bare = tiny_model(name, task)  # a bare base: the config comes from adapter_config.json
    load_adapter(bare, tmp_path, name="task")
    torch.testing.assert_close(logits(bare, batch), want, rtol=0, atol=0)


def test_load_onto_wrong_base_is_a_clear_error(tmp_path):
    llama = tiny_model("tiny-llama", "causal-lm")
    add_adapter(llama, "a", AdapterConfig())
    save_adapter(llama, tmp_path, "a", base_model_name="tiny-llama")
    with pytest.raises(ValueError, match=r"model_type 'llama'.*model_type 'gpt2'"):
        load_adapter(tiny_model("tiny-gpt2", "causal-lm"), tmp_path)
    wide = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
        )
    )
    with pytest.raises(ValueError, match=r"hidden_size 64.*hidden_size 32"):
        load_adapter(wide, tmp_path)


def _task_batch(text: str) -> dict:
    ids = torch.tensor([[1] + list(text.encode())[:15]] * 2) + 4
    ids[:, 0] = 1
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _train(model, name: str, batch: dict, steps: int = 10) -> None:
    set_adapter(model, name)
    train_steps(model, batch, "causal-lm", steps, adamw(model, 3e-2))


def test_two_task_adapters_keep_their_own_behaviour(tmp_path):
    model = tiny_model("tiny-llama", "causal-lm")
    base_a, base_b = _task_batch("abababababababab"), _task_batch("the cat sat down")
    probe = inputs("causal-lm")
    base_logits = logits(model, probe)
    for n in ("a", "b"):
        add_adapter(model, n, AdapterConfig(placement="pfeiffer", bottleneck_size=16))
    _train(model, "a", base_a)
    _train(model, "b", base_b)
    set_adapter(model, "a")
    la = (mean_loss(model, base_a, "causal-lm"), mean_loss(model, base_b, "causal-lm"), logits(model, probe))
    set_adapter(model, "b")
    lb = (mean_loss(model, base_a, "causal-lm"), mean_loss(model, base_b, "causal-lm"), logits(model, probe))
    assert la[0] < lb[0] - 0.05 and lb[1] < la[1] - 0.05  # each adapter is better on its own task
    disable_adapters(model)
    torch.testing.assert_close(logits(model, probe), base_logits, rtol=0, atol=0)
    set_adapter(model, "a")  # switching back: no reload, same behaviour
    torch.testing.assert_close(logits(model, probe), la[2], rtol=0, atol=0)
    save_adapter(model, tmp_path / "a", "a")
    save_adapter(model, tmp_path / "b", "b")
    fresh = tiny_model("tiny-llama", "causal-lm")  # each saved separately, each reloads to its own behaviour
    load_adapter(fresh, tmp_path / "b", "b")
    load_adapter(fresh, tmp_path / "a", "a")
    assert active_adapter(fresh) == "a"
    torch.testing.assert_close(logits(fresh, probe), la[2], rtol=0, atol=0)
    set_adapter(fresh, "b")
    torch.testing.assert_close(logits(fresh, probe), lb[2], rtol=0, atol=0)
    delete_adapter(fresh, "a")
    delete_adapter(fresh, "b")  # all gone: original modules back, exact base outputs
    assert not any("adapters" in k or "base_layer" in k for k in fresh.state_dict())
    torch.testing.assert_close(logits(fresh, probe), base_logits, rtol=0, atol=0)


@pytest.mark.parametrize(
    "name,task", [("tiny-llama", "causal-lm"), ("tiny-bert", "seq-cls"), ("tiny-t5", "seq2seq")]
)
def test_mixed_batch_equals_each_row_alone(name, task):
    model, batch = tiny_model(name, task), inputs(task, rows=4)
    for i, n in enumerate(("a", "b")):
        add_adapter(model, n, AdapterConfig(placement="houlsby", bottleneck_size=4), task=task)
        randomise(model, n, seed=i)  # for seq-cls this includes each adapter's own classifier copy
    rows = ["a", "b", None, "a"]
    with adapter_per_row(model, rows):
        mixed = logits(model, batch)
    for i, n in enumerate(rows):
        set_adapter(model, n) if n else disable_adapters(model)
        alone = logits(model, {k: v[i : i + 1] for k, v in batch.items()})
        torch.testing.assert_close(mixed[i : i + 1], alone)
    assert not torch.allclose(mixed[0], mixed[1], atol=1e-3)


def test_per_row_gradients_reach_only_that_rows_adapter():
    model, batch = tiny_model("tiny-llama", "causal-lm"), inputs("causal-lm", rows=3)
    for i, n in enumerate(("a", "b")):
        add_adapter(model, n, AdapterConfig(bottleneck_size=4))
        randomise(model, n, seed=i)  # non-zero W_up so W_down gets gradient too
        for p in adapter_state_dict(model, n).values():
            p.requires_grad_(True)
    params = {n: adapter_state_dict(model, n) for n in ("a", "b")}
    with adapter_per_row(model, ["a", "b", "a"]):
        out = model(**batch).logits  # (3, T, V)
    out[1].pow(2).mean().backward()  # a loss on the "b" row only
    assert all(p.grad is None or not p.grad.any() for p in params["a"].values())
    assert all(p.grad is not None and p.grad.any() for k, p in params["b"].items() if "up." in k)

    model.zero_grad(set_to_none=True)
    with adapter_per_row(model, ["a", "b", "a"]):
        out = model(**batch).logits
    (out[0].pow(2).mean() + out[2].pow(2).mean()).backward()
    mixed_grads = {k: p.grad.clone() for k, p in params["a"].items()}
    assert all(p.grad is None or not p.grad.any() for p in params["b"].values())
    model.zero_grad(set_to_none=True)
    set_adapter(model, "a")  # the same loss with rows 0 and 2 alone through adapter a
    out = model(**{k: v[[0, 2]] for k, v in batch.items()}).logits
    (out[0].pow(2).mean() + out[1].pow(2).mean()).backward()
    for k, p in params["a"].items():
        torch.testing.assert_close(mixed_grads[k], p.grad)


def test_per_row_rejects_wrong_row_count_and_unknown_names():
    model, batch = tiny_model("tiny-llama", "causal-lm"), inputs("causal-lm", rows=3)
    add_adapter(model, "a", AdapterConfig())
    with pytest.raises(KeyError, match="no adapter named 'zzz'"):
        with adapter_per_row(model, ["a", "zzz", "a"]):
            pass
    with pytest.raises(ValueError, match="2 names for a batch of 3 rows"):
        with adapter_per_row(model, ["a", "a"]):
            model(**batch)
    assert len(find_insertion_points(model, "houlsby")) == 4


def test_disable_adapters_as_context_manager_restores_routing():
    model = tiny_model("tiny-llama", "causal-lm")
    ids = torch.randint(4, 200, (2, 12))
    base = model(ids).logits
    add_adapter(model, "a", AdapterConfig(name="adapter"))
    set_adapter(model, "a")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".up." in n:
                p.normal_(std=0.5)
    tuned = model(ids).logits
    assert not torch.allclose(tuned, base)
    with disable_adapters(model):
        torch.testing.assert_close(model(ids).logits, base, rtol=0, atol=0)
    torch.testing.assert_close(model(ids).logits, tuned, rtol=0, atol=0)
    with adapter_per_row(model, ["a", "__base__"]):
        mixed = model(ids).logits
    torch.testing.assert_close(mixed[0], tuned[0])
    torch.testing.assert_close(mixed[1], base[1])
