"""The time model (plan/timing.py): a step's work split by kind, each kind at its measured rate.

The split is checked against the FLOP count it refines (same total), and each kind against the reason it exists:
a frozen base does no weight gradients, LoRA and adapters do thin products, prompt/prefix tuning take the masked
attention path, prefix tuning's queries span the packed row, the optimizer's work follows the trainable count.
"""

from __future__ import annotations

import math

import pytest

from sftlab.plan.activations import Bytes
from sftlab.plan.candidates import candidates
from sftlab.plan.estimate import Settings, estimate, example_flops, method_config, step_work
from sftlab.plan.model import resolve, shape_of, with_method
from sftlab.plan.structure import head_matmul, outside_matmul, read_blocks
from sftlab.plan.timing import ProbeShape, Rates, Work, calibrate, step_seconds
from sftlab.plan.workload import stated

SOURCE = "tiny-llama"


def _work(key: str, batch: int = 4):
    src = resolve(SOURCE, "causal-lm")
    cand = next(c for c in candidates(2, "causal-lm") if c.key == key)
    model = with_method(src, method_config(cand))
    shape = shape_of(src.config)
    blocks = read_blocks(model, shape.family)
    head, other = head_matmul(model, "causal-lm"), outside_matmul(model, "causal-lm")
    w = stated("causal-lm", 64, 32, 0.5, None)
    s = Settings(batch_size=batch)
    from sftlab.methods._targets import count_parameters

    trainable = count_parameters(model)[0]
    work = step_work(shape, blocks, head, other, "causal-lm", w, s, cand, Bytes(4, 4, True), trainable)
    _, train = example_flops(shape, blocks, head, other, "causal-lm", w.mean_tokens, 0, 0.5, cand)
    return work, train * batch, trainable


@pytest.mark.parametrize("key", ["full", "freeze", "lora-r16", "houlsby", "pfeiffer", "prompt"])
def test_the_kinds_of_work_add_up_to_the_flop_count(key):
    work, flops, _ = _work(key)
    total = work.gemm + work.wgrad + sum(work.thin.values()) + work.attention
    assert total == pytest.approx(flops, rel=1e-9)


def test_each_kind_follows_what_the_method_trains():
    full, _, full_trainable = _work("full")
    freeze, _, _ = _work("freeze")
    lora, _, lora_trainable = _work("lora-r16")
    prompt, _, _ = _work("prompt")
    prefix, _, _ = _work("prefix")
    assert full.wgrad > freeze.wgrad > 0 and lora.wgrad == 0  # a frozen base computes no weight gradients
    assert not full.thin and set(lora.thin) == {16}  # LoRA's products at its rank
    assert freeze.block_tokens_forward > 0 == full.block_tokens_forward  # blocks below run forward only
    assert not full.masked_attention and prompt.masked_attention and prefix.masked_attention
    # prefix tuning packs rows but attends through a mask: each query reads the whole row (4 x 32 tokens) + 16
    assert prefix.attention > 3 * lora.attention
    assert full.trainable == full_trainable > lora.trainable == lora_trainable


def _rates(**kw) -> Rates:
    base = dict(gemm=1e11, wgrad=5e10, attention_varlen=2e10, attention_masked=1e10, bandwidth=2e10,
                optimizer_s_per_param=1e-9, block_elementwise_train=4e-5, block_elementwise_forward=1e-5,
                thin={16: 2e10})  # fmt: skip
    return Rates(**{**base, **kw})


def test_step_seconds_is_each_kind_at_its_rate():
    w = Work(gemm=1e11, wgrad=1e11, thin={16: 2e10}, attention=1e10, masked_attention=True,
             elementwise_bytes=2e10, block_tokens_train=1e4, block_tokens_forward=1e4, trainable=10**9)  # fmt: skip
    assert step_seconds(w, _rates()) == pytest.approx(1 + 2 + 1 + 1 + 1 + 0.4 + 0.1 + 1)
    w.masked_attention = False
    assert step_seconds(w, _rates()) == pytest.approx(7.0)
    assert step_seconds(w, _rates(wgrad=1e11)) == pytest.approx(6.0)  # weight grads at the GEMM rate


def test_estimate_uses_the_calibrated_model_when_rates_are_given():
    from sftlab.plan.device import Device, Throughput

    src = resolve(SOURCE, "causal-lm")
    cand = next(c for c in candidates(2, "causal-lm") if c.key == "lora-r16")
    w, s = stated("causal-lm", 64, 32, 0.5, None), Settings(batch_size=4)
    dev, tput = Device("cpu", 8 << 30, 1, "cpu", "detected"), Throughput(1e10, "x")
    flops = estimate(src, cand, w, s, dev, tput)
    assert flops.time_model == "flops" and flops.tokens_per_s == pytest.approx(1e10 / flops.flops_train)
    cal = estimate(src, cand, w, s, dev, tput, rates=_rates())
    assert cal.time_model == "calibrated"
    assert cal.time_per_epoch_s == pytest.approx(w.tokens / cal.tokens_per_s)
    slower = estimate(src, cand, w, s, dev, tput, rates=_rates(gemm=1e10))
    assert slower.tokens_per_s < cal.tokens_per_s


def test_calibrate_measures_every_rate_on_this_cpu():
    ps = ProbeShape(rows=128, hidden=64, ffn=128, heads=4, head_dim=16, length=32, examples=4, extra_keys=0,
                    causal=True)  # fmt: skip
    r = calibrate(ps, threads=1, thin_widths=(8, 16))
    values = [r.gemm, r.wgrad, r.attention_varlen, r.attention_masked, r.bandwidth, r.optimizer_s_per_param,
              r.block_elementwise_train, r.block_elementwise_forward, *r.thin.values()]  # fmt: skip
    assert all(math.isfinite(v) and v > 0 for v in values) and set(r.thin) == {8, 16}
    assert r.thin_rate(12) in (r.thin[8], r.thin[16])  # the nearest probed width
    assert "GFLOP/s" in r.describe()
