"""`train.patches.applied`: every process-wide patch is in place inside and undone after, error or not."""

import pytest
import torch
from helpers import causal_lm_with_method
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama import modeling_llama

from sftlab import gemm
from sftlab.config import PerfConfig
from sftlab.train import patches, varlen


def _snapshot(model):
    return (
        ALL_ATTENTION_FUNCTIONS["sdpa"],
        modeling_llama.apply_rotary_pos_emb,
        gemm.active(),
        [m for m in model.modules() if "forward" in m.__dict__],
        varlen.is_registered(),
    )


def test_applied_patches_then_restores_everything_even_on_error():
    model = causal_lm_with_method("tiny-llama", "full")
    before = _snapshot(model)
    assert before[3] == [] and not before[4]
    with pytest.raises(RuntimeError, match="boom"), patches.applied(model, PerfConfig(), malloc=False):
        sdpa, rope_fn, _, swapped, registered = _snapshot(model)
        assert registered and sdpa is not before[0]  # the varlen wrapper sits in transformers' registry
        assert rope_fn is not before[1] and rope_fn.sftlab_original is before[1]
        if gemm.usable():  # oneDNN GEMMs only where torch runs AVX-512 kernels
            assert gemm.active() and swapped
        raise RuntimeError("boom")
    assert _snapshot(model) == before


def test_switched_off_levers_patch_nothing():
    model = causal_lm_with_method("tiny-llama", "full")
    before = _snapshot(model)
    off = PerfConfig(varlen_attention=False, fused_rope=False, onednn_gemm=False)
    with patches.applied(model, off, malloc=False):
        assert _snapshot(model) == before


def test_varlen_kwarg_reaches_attention_only_while_registered():
    """Outside the patches the objective passes no segments (transformers' masked path): same loss either way."""
    from helpers import compute_loss

    from sftlab.data.batching import collate_packed
    from sftlab.train.objective import Objective

    model = causal_lm_with_method("tiny-llama", "full")
    exs = [{"input_ids": list(range(5, 5 + n)), "labels": list(range(5, 5 + n))} for n in (7, 12, 4)]
    batch = collate_packed(exs)
    seen = []
    real = varlen._varlen_sdpa
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(varlen, "_varlen_sdpa", lambda *a, **k: seen.append(1) or real(*a, **k))
        inside, _ = compute_loss(model, batch, "causal-lm")
        assert seen  # per-example attention ran
        seen.clear()
        outside = Objective(model, "causal-lm")(batch).loss
        assert not seen
    torch.testing.assert_close(inside, outside, rtol=1e-5, atol=1e-5)
