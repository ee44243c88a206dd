"""The planner's numbers against the real thing: parameter counts after each method's apply() on real tiny models,
activation bytes against what autograd keeps, FLOPs per token against torch's FlopCounterMode."""

from __future__ import annotations

import pytest
import torch
from helpers import FAMILIES, tiny_model
from torch.utils.flop_counter import FlopCounterMode

from sftlab.config import PerfConfig
from sftlab.data.batching import collate, collate_packed
from sftlab.methods import MethodContext, get_method
from sftlab.methods._targets import count_parameters
from sftlab.models import byte_tokenizer
from sftlab.plan.activations import Bytes, Pass, pass_activation_bytes
from sftlab.plan.candidates import candidates
from sftlab.plan.estimate import example_flops, method_config
from sftlab.plan.model import meta_model, resolve, shape_of, with_method
from sftlab.plan.structure import head_matmul, outside_matmul, read_blocks
from sftlab.train import patches
from sftlab.train.objective import Objective

AVAILABLE = [c for c in candidates(2, "causal-lm") if c.available]


def _real(name: str, task: str, cand) -> torch.nn.Module:
    model = tiny_model(name, task)
    spec = get_method(cand.method["name"])
    spec.apply(model, method_config(cand), MethodContext(task, byte_tokenizer(), name))
    return model


@pytest.mark.parametrize("name,task", FAMILIES)
def test_parameter_counts_on_the_meta_model_equal_the_real_model(name, task):
    """Every candidate, applied by its own apply() to the meta model, counts what it counts on the real model."""
    source = resolve(name, task)
    for cand in candidates(2, task):
        if not cand.available:
            continue
        meta = with_method(source, method_config(cand))
        assert all(p.is_meta for p in meta.parameters()), cand.key  # no storage was allocated
        assert count_parameters(meta) == count_parameters(_real(name, task, cand)), (name, cand.key)


def test_a_70b_config_is_planned_on_the_meta_device_without_storage():
    from transformers import LlamaConfig

    from sftlab.plan.model import ModelSource

    cfg = LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                      num_key_value_heads=8, vocab_size=128256)  # fmt: skip
    source = ModelSource("llama-70b", cfg, "causal-lm", None, "config", False)
    lora = next(c for c in AVAILABLE if c.key == "lora-r16")
    model = with_method(source, method_config(lora))
    trainable, total = count_parameters(model)
    base = count_parameters(meta_model(source))[1]
    assert base == 70_553_706_496  # Llama-3-70B's published size
    # r * (d_in + d_out) per adapted linear: q, k, v, o, gate, up, down of 80 blocks
    h, kv, f = 8192, 1024, 28672
    per_block = 16 * ((h + h) * 2 + (h + kv) * 2 + (h + f) * 3)
    assert trainable == 80 * per_block and total == base + trainable


# -- activations: the formula against the tensors autograd keeps ------------------------------------------------


def saved_bytes(model: torch.nn.Module, objective: Objective, batch: dict) -> int:
    """Bytes of the distinct storages autograd saves for backward during objective(batch), parameters and
    buffers excluded."""
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in own:
            seen[s.data_ptr()] = max(seen.get(s.data_ptr(), 0), s.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        objective(batch)
    return sum(seen.values())


def _examples(task: str, n: int, length: int, share: float) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        ids = torch.randint(4, 250, (length,), generator=g).tolist()
        if task == "causal-lm":
            k = round(length * (1 - share))
            out.append({"input_ids": ids, "labels": [-100] * k + ids[k:]})
        elif task == "seq-cls":
            out.append({"input_ids": ids, "labels": i % 2})
        else:
            out.append({"input_ids": ids, "labels": ids[: length // 2]})
    return out


@pytest.mark.parametrize("name,task", FAMILIES)
def test_activation_formula_matches_what_autograd_keeps(name, task):
    """Per family and method, pass_activation_bytes is within 12% of the storages saved for backward by sftlab's
    own training forward (Objective inside the training patches; packed rows where training packs)."""
    n, length = 4, 48
    shape = shape_of(resolve(name, task).config)
    errors = {}
    for cand in AVAILABLE:
        model = _real(name, task, cand).train()
        packed = task == "causal-lm" and not (cand.prefix_tokens or cand.virtual_tokens)
        exs = _examples(task, n, length, 0.5)
        batch = collate_packed(exs, task) if packed else collate(exs, 0, task)
        perf = PerfConfig(onednn_gemm=False)
        with patches.applied(model, perf, malloc=False):
            got = saved_bytes(model, Objective(model, task, perf), batch)
        vt = cand.virtual_tokens  # prompt tuning: virtual positions in front of the (source) sequence
        if task == "seq2seq":
            p = Pass(n * (length // 2), length // 2, 1.0, n * (length + vt), length + vt, cand.prefix_tokens)
        else:
            share = 0.5 if task == "causal-lm" else 1.0
            p = Pass(n * (length + vt), length + vt, share, prefix=cand.prefix_tokens, trim_last_mlp=not vt)
        blocks = read_blocks(model, shape.family)
        est = pass_activation_bytes(shape, blocks, p, Bytes(4, 4, True), task)
        errors[cand.key] = est / got - 1
    assert all(abs(e) < 0.12 for e in errors.values()), {k: f"{e:+.1%}" for k, e in errors.items()}


def test_a_block_below_every_trainable_part_keeps_nothing():
    source = resolve("tiny-llama")
    freeze = next(c for c in AVAILABLE if c.key == "freeze")
    blocks = read_blocks(with_method(source, method_config(freeze)), "llama")
    assert [b.grads for b in blocks] == [False, True]
    pfeiffer = next(c for c in AVAILABLE if c.key == "pfeiffer")
    blocks = read_blocks(with_method(source, method_config(pfeiffer)), "llama")
    assert [b.entry for b in blocks] == ["out", "in"]  # the first adapter sits after block 0's MLP


# -- FLOPs: the forward formula against a counted forward -------------------------------------------------------


@pytest.mark.parametrize("name,task", FAMILIES)
def test_forward_flops_per_token_equal_flop_counter(name, task):
    """2N per token for the matmul weights a token passes, plus 4*q*s per block for attention, equals what
    FlopCounterMode counts on the model's plain forward (eager attention, whose products it can see; every
    position through the head, as a plain forward computes it)."""
    model = tiny_model(name, task)
    model.set_attn_implementation("eager")
    length, target, batch = 40, 12, 3
    g = torch.Generator().manual_seed(0)
    inputs = {"input_ids": torch.randint(4, 250, (batch, length), generator=g)}
    if task == "seq2seq":
        inputs["decoder_input_ids"] = torch.randint(4, 250, (batch, target), generator=g)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(**inputs)
    source = resolve(name, task)
    meta, shape = meta_model(source), shape_of(source.config)
    full = candidates(2, task)[0]
    fwd, train = example_flops(
        shape, read_blocks(meta, shape.family), head_matmul(meta, task), outside_matmul(meta, task), task,
        length, target if task == "seq2seq" else 0, 1.0, full, trim=False,
    )  # fmt: skip
    assert fwd == counter.get_total_flops() / batch
    assert train == pytest.approx(3 * fwd, rel=0.01)  # full: backward = input + weight gradients = 2x forward
    lora = next(c for c in candidates(2, task) if c.key == "lora-r8")
    peft = with_method(source, method_config(lora))
    _, train_lora = example_flops(
        shape, read_blocks(peft, shape.family), head_matmul(peft, task), outside_matmul(peft, task), task,
        length, target if task == "seq2seq" else 0, 1.0, lora, trim=False,
    )  # fmt: skip
    assert (
        2 * fwd < train_lora < train
    )  # frozen base: input gradients only, plus the LoRA's own (4N + 6N_lora)
