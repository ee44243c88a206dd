"""Memory caps: a batch split into passes of at most `micro_batch_tokens` trains to the same weights; malloc tuning."""

import sys

import pytest
import torch
from helpers import make_config

from sftlab.recipe import prepare
from sftlab.train.loop import Trainer


def _trained(tmp_path, cap, packing):
    cfg = make_config(
        tmp_path,
        "tiny-llama",
        train={"max_steps": 3, "batch_size": 8, "progress": False},
        perf={"micro_batch_tokens": cap, "packing": packing},
    )
    model, _, data, _ = prepare(cfg, log=lambda *_: None)
    t = Trainer(model=model, cfg=cfg.train, task="causal-lm", train_examples=data.examples, pad_id=0,
                run_dir=tmp_path, log=lambda *_: None, perf=cfg.perf)  # fmt: skip
    t.fit()
    return t, {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("packing", [True, False])
def test_split_passes_train_to_the_same_weights(tmp_path, packing):
    whole, w_whole = _trained(tmp_path / "whole", None, packing)
    cap = 60
    split, w_split = _trained(tmp_path / "split", cap, packing)
    idx = list(range(8))
    parts = split.stream.split_by_tokens(idx)
    assert len(parts) > 1 and [i for p in parts for i in p] == idx  # really split, order kept
    for p in parts:
        lens = [split.stream.lengths[i] for i in p]
        cost = sum(lens) if packing else max(lens) * len(lens)
        assert cost <= cap or len(p) == 1
    assert whole.stream.split_by_tokens(idx) == [idx]
    assert split.state.last_loss == pytest.approx(whole.state.last_loss, rel=1e-5)
    for n, w in w_whole.items():
        torch.testing.assert_close(w_split[n], w, rtol=1e-4, atol=1e-5)


_FAULTS_SCRIPT = """
import resource, sys, torch
from sftlab.train.memory import retain_freed_memory
if sys.argv[1] == "retain":
    assert retain_freed_memory()
def step():
    blocks = [torch.ones(k * 256 * 1024) for k in range(1, 21)]  # 1..20 MB of fp32, 210 MB in all
    del blocks
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_retained_memory_is_reused_without_page_faults():
    """After retain_freed_memory(), a step's freed activations (1-20 MB blocks) serve the next step's from pages
    already mapped. Each mode in a fresh process (malloc settings are process-wide); measured here: glibc's
    defaults page-fault ~68% of the touched pages again every step, retained ~9%."""
    import subprocess

    def faults(mode: str) -> int:
        out = subprocess.run(
            [sys.executable, "-c", _FAULTS_SCRIPT, mode], capture_output=True, text=True, check=True
        )
        return int(out.stdout.split()[-1])

    default, retained = faults("default"), faults("retain")
    assert retained < 0.4 * default, f"minor faults: {retained} retained vs {default} with glibc's defaults"


_MODE_SCRIPT = """
import sys, torch
from sftlab.train.memory import malloc_mode
def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
threshold = 262144 if sys.argv[1] == "low" else None
base = rss_mb()
with malloc_mode(threshold, retain=sys.argv[1] == "retain") as changed:
    assert changed
    blocks = [torch.ones(k * 256 * 1024 + 7) for k in range(1, 21)]  # 210 MB of 1-20 MB blocks, then freed
    del blocks
    inside = rss_mb()
print(base, inside, rss_mb())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
@pytest.mark.parametrize("mode", ["low", "retain"])
def test_malloc_modes_act_and_are_undone(mode):
    """Low-memory mode hands freed activations back at once; retain mode keeps them mapped while it is held and
    gives them back when it ends (`restore_malloc`). Each mode in a fresh process: malloc settings are
    process-wide, and this test process must keep glibc's own."""
    import subprocess

    out = subprocess.run(
        [sys.executable, "-c", _MODE_SCRIPT, mode], capture_output=True, text=True, check=True
    )
    base, inside, after = (float(x) for x in out.stdout.split())
    if mode == "low":
        assert inside < base + 50, (
            f"RSS {base:.0f} -> {inside:.0f} MB right after freeing 210 MB in low-memory mode"
        )
    else:
        assert inside > base + 150, f"RSS {base:.0f} -> {inside:.0f} MB: the freed 210 MB were not retained"
        assert after < inside - 150, f"RSS {inside:.0f} MB retained -> {after:.0f} MB after the mode ended"
