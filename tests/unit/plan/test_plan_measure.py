"""--measure: real steps in a subprocess per method; the memory estimate against the measured peak RSS.

On the built-in tiny models (0.1M parameters) a training process's resident memory is mostly the runtime and the
allocator, not the model: a 15% bound on them would test noise. So the bound is tested on a synthetic 21M-parameter
Llama config (random weights from the config, as --measure builds a model known only by its config), where the
parts the estimate names are most of the peak.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sftlab.plan import PlanInputs, make_plan
from sftlab.plan import measure as measuring
from sftlab.plan.planner import worker_spec

# A 20M-parameter Llama (hidden 512, 4 blocks, vocab 8192), the README's --measure example.
LLAMA_21M = Path(__file__).resolve().parents[3] / "examples" / "plan" / "llama-21m" / "config.json"


@pytest.fixture
def plan21m():
    inp = PlanInputs(model=str(LLAMA_21M), examples=64, seq_len=128, batch_size=4, device="cpu:16GB",
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


@pytest.mark.slow
def test_cli_measure_runs_every_candidate(capsys):
    import json

    from sftlab.cli.main import main

    assert main(["plan", "--model", "tiny-llama", "--examples", "16", "--seq-len", "32", "--throughput", "0.01",
                 "--measure", "--measure-steps", "2", "--threads", "1", "--json"]) == 0  # fmt: skip
    out = json.loads(capsys.readouterr().out)
    for row in out["candidates"]:
        if row["available"]:
            got = row["measured"]
            assert got["error"] is None and got["peak_rss_delta"] > 0 and got["tokens_per_s"] > 0, row["key"]
            assert got["peak_error"] is not None
        else:
            assert "measured" not in row
    assert "1 thread," in out["measured_on"]


def test_the_nf4_candidate_is_measured_on_a_quantised_base():
    """A model known by its config alone gets random weights; the NF4 candidate's worker quantises them as loading
    a checkpoint with model.quantize would (before the fix it measured plain LoRA)."""
    inp = PlanInputs(model=str(LLAMA_21M), examples=16, seq_len=32, batch_size=2, device="cpu:16GB",
                     throughput_tflops=0.05)  # fmt: skip
    plan = make_plan(inp, log=lambda *_: None)
    got = measuring.worker(worker_spec(plan, plan.by_key("qlora-r16").candidate, steps=1, threads=1))
    assert got["quantized_layers"] == 4 * 7  # every projection of the 4 blocks
    lora = measuring.worker(worker_spec(plan, plan.by_key("lora-r16").candidate, steps=1, threads=1))
    assert lora["quantized_layers"] == 0 and lora["trainable"] == got["trainable"]
