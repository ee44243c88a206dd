"""--measure: real steps in a subprocess per method; the memory estimate against the measured peak RSS.

On the built-in tiny models (0.1M parameters) a training process's resident memory is mostly the runtime and the
allocator, not the model: a 15% bound on them would test noise. So the bound is tested on a synthetic 21M-parameter
Llama config (random weights from the config, as --measure builds a model known only by its config), where the
parts the estimate names are most of the peak.
"""

from __future__ import annotations

import json

import pytest

from sftlab.plan import PlanInputs, make_plan
from sftlab.plan import measure as measuring
from sftlab.plan.planner import worker_spec

LLAMA_21M = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 512, "intermediate_size": 1376,
    "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 8192,
    "max_position_embeddings": 2048, "tie_word_embeddings": False, "rms_norm_eps": 1e-5, "hidden_act": "silu",
}  # fmt: skip


@pytest.fixture
def plan21m(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(LLAMA_21M))
    inp = PlanInputs(model=str(path), examples=64, seq_len=128, batch_size=4, device="cpu:16GB",
                     throughput_tflops=0.05)  # fmt: skip
    return make_plan(inp, log=lambda *_: None)


@pytest.mark.parametrize("key", ["full", "lora-r16"])
def test_memory_estimate_within_15_percent_of_measured_peak_rss(plan21m, key):
    est = plan21m.by_key(key)
    got = measuring.run(worker_spec(plan21m, est.candidate, steps=2, threads=1), timeout=300)
    assert got.error is None and got.peak_rss_delta, got
    err = est.memory.peak / got.peak_rss_delta - 1
    assert abs(err) < 0.15, (
        f"{key}: estimate {est.memory.peak / 1e6:.0f} MB, measured {got.peak_rss_delta / 1e6:.0f} MB"
    )
    assert got.tokens_per_s and got.tokens_per_s > 0


@pytest.mark.slow
def test_a_failing_worker_is_an_error_line_not_a_crash(plan21m):
    spec = worker_spec(plan21m, plan21m.by_key("full").candidate, steps=1, threads=1)
    spec["config_path"] = "/nonexistent/config.json"
    got = measuring.run(spec, timeout=120)
    assert got.peak_rss_delta is None and got.error
