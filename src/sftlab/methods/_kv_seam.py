"""Every piece of prefix/prompt code that depends on how transformers is built lives here.

Two seams, both public in transformers 5.x:

* Prefix tuning: the attention-function interface. In transformers 5.24 llama, gpt2, bert and t5 (self- and
  cross-attention) all call `ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, ...)` with the
  layer's query/key/value *after* the KV cache update. We register one function under `PREFIX_ATTN`
  (`AttentionInterface.register`) plus the sdpa mask builder (`AttentionMaskInterface.register`), and switch the
  model to it with `set_attn_implementation`. The function concatenates the layer's learned prefix K/V in front of
  key/value, extends the mask with "attend" columns (and T5's position bias with zeros), then calls transformers'
  own sdpa function. The KV cache never sees the prefix, so caching, generation and position ids behave exactly
  as in the base model: nothing here depends on the Cache class layout that broke PEFT (#2821, #2449, #869).
* Prompt / P-tuning: forward pre-hooks (with kwargs) on the backbone module. The only version-specific detail is
  the keyword names the backbones receive (`cache` vs the deprecated `past_key_values`, `inputs_embeds`, ...).

tests/unit/methods/test_prefix_seam.py pins this behaviour, so an upgrade that changes the seam fails loudly.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_outputs import ModelOutput

PREFIX_ATTN = "sftlab_prefix"
SITE_ATTR = "_sftlab_prefix_site"  # set on each attention module: (source, site index)
# transformers 5.24 renamed past_key_values -> cache (the old name is a deprecated alias until 5.40)
CACHE_KEYS = ("cache", "past_key_values")

# While not None, the attention function appends (module, n_kv_heads, head_dim) for each call: see install_prefix_attention.
_RECORDER: list[tuple[nn.Module, int, int]] | None = None


def _extend_mask(
    module: nn.Module, query: torch.Tensor, kv_len: int, mask: torch.Tensor | None, m: int, kwargs: dict
) -> torch.Tensor | None:
    """The layer's mask with m leading prefix columns, all True / 0.0 (attend); None when every key is seen."""
    if mask is None:
        is_causal = kwargs.get("is_causal")
        is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
        q_len = query.shape[2]
        if is_causal and q_len > 1:
            # sdpa's implicit causal mask would be top-left aligned and crop keys: build it explicitly, bottom-right
            # aligned (the q queries are the last q of the kv_len keys).
            i = torch.arange(q_len, device=query.device)[:, None]
            j = torch.arange(kv_len, device=query.device)[None, :]
            mask = (j <= i + (kv_len - q_len))[None, None]  # (1, 1, q, kv)
        else:
            return None  # every query sees every key, prefix included
    fill = True if mask.dtype == torch.bool else 0.0
    cols = torch.full((*mask.shape[:-1], m), fill, dtype=mask.dtype, device=mask.device)
    return torch.cat([cols, mask], dim=-1)  # (B|1, 1|H, q, m + kv)


def prefix_attention(
    module: nn.Module,
    query: torch.Tensor,  # (B, H, q, d)
    key: torch.Tensor,  # (B, Hkv, kv, d), cache already applied
    value: torch.Tensor,  # (B, Hkv, kv, d)
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """AttentionInterface function: attention over [prefix K/V, K/V]; plain sdpa for layers without a prefix."""
    if _RECORDER is not None:
        _RECORDER.append((module, key.shape[1], key.shape[-1]))
    site = getattr(module, SITE_ATTR, None)
    if site is not None:
        source, index = site
        pk, pv = source.layer_kv(index, dtype=key.dtype, device=key.device)  # (1, Hkv, m, d) each
        m = pk.shape[2]
        if m:
            b, kv_len = key.shape[0], key.shape[2]
            key = torch.cat([pk.expand(b, -1, -1, -1), key], dim=2)  # (B, Hkv, m + kv, d)
            value = torch.cat([pv.expand(b, -1, -1, -1), value], dim=2)
            attention_mask = _extend_mask(module, query, kv_len, attention_mask, m, kwargs)
            bias = kwargs.get("position_bias")
            if bias is not None:  # T5: relative position bias (1|B, H, q, kv); the prefix has no position
                zeros = bias.new_zeros((*bias.shape[:-1], m))
                kwargs["position_bias"] = torch.cat([zeros, bias], dim=-1)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _register() -> None:
    AttentionInterface.register(PREFIX_ATTN, prefix_attention)
    AttentionMaskInterface.register(PREFIX_ATTN, sdpa_mask)


def _probe_inputs(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    device = next(model.parameters()).device
    ids = torch.zeros((1, 2), dtype=torch.long, device=device)
    inputs = {"input_ids": ids, "use_cache": False}
    if getattr(model.config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = ids
    return inputs


@contextmanager
def _recording():
    global _RECORDER
    _RECORDER = []
    try:
        yield _RECORDER
    finally:
        _RECORDER = None


def install_prefix_attention(model: PreTrainedModel) -> list[tuple[nn.Module, int, int]]:
    """Route the model's attention through `prefix_attention`; return its attention sites in call order.

    A site is (attention module, n_kv_heads, head_dim), found by running a 2-token forward and recording every
    call to the interface: decoder layers in order; for T5 the encoder's self-attention layers, then each
    decoder layer's self-attention and cross-attention.
    """
    _register()
    previous = model.config._attn_implementation
    if previous not in ("eager", "sdpa", PREFIX_ATTN, None):
        raise ValueError(
            f"prefix tuning runs on sdpa; the model uses attn_implementation={previous!r}. Load it with "
            "model.attn_implementation: sdpa"
        )
    model.set_attn_implementation(PREFIX_ATTN)
    with torch.no_grad(), _recording() as calls:
        model(**_probe_inputs(model))
    if not calls:
        raise ValueError(
            f"{type(model).__name__} does not route attention through transformers' AttentionInterface, so "
            "prefix tuning cannot reach its keys and values"
        )
    seen = set()
    for mod, _, _ in calls:
        if id(mod) in seen:
            raise ValueError(
                f"{type(mod).__name__} is called twice per forward (shared layers): not supported"
            )
        seen.add(id(mod))
    return calls


def attach_sites(sites: list[tuple[nn.Module, int, int]], source: nn.Module) -> None:
    """Point each attention module at its row block of `source` (which provides `layer_kv(index, ...)`)."""
    for i, (mod, _, _) in enumerate(sites):
        # A tuple, not a submodule: the prefix parameters belong to `source`, registered once on the model.
        object.__setattr__(mod, SITE_ATTR, (source, i))


# ---- prompt / P-tuning: backbone call arguments -------------------------------------------------------------


def bind_call(module: nn.Module, args: tuple, kwargs: dict) -> dict:
    """Positional + keyword arguments of a backbone call as one keyword dict."""
    if not args:
        return dict(kwargs)
    bound = inspect.signature(module.forward).bind_partial(*args, **kwargs)
    out = dict(bound.arguments)
    out.update(out.pop("kwargs", {}) or {})
    return out


def add_call_hook(module: nn.Module, edit: Callable[[nn.Module, dict], dict]):
    """Run `edit(module, kwargs) -> kwargs` on every call of `module`, before its forward; returns the handle."""

    def pre_hook(mod: nn.Module, args: tuple, kwargs: dict):
        return (), edit(mod, bind_call(mod, args, kwargs))

    return module.register_forward_pre_hook(pre_hook, with_kwargs=True)


def input_length(kwargs: dict) -> tuple[int, int]:
    """(batch, new tokens) of a backbone call, from input_ids or inputs_embeds."""
    x = kwargs.get("input_ids")
    if x is None:
        x = kwargs["inputs_embeds"]
    return x.shape[0], x.shape[1]


def accepts(module: nn.Module, name: str) -> bool:
    return name in inspect.signature(module.forward).parameters


def cache_length(kwargs: dict) -> int:
    """Tokens already in the KV cache passed to this call (0 without a cache)."""
    for key in CACHE_KEYS:
        cache = kwargs.get(key)
        if cache is not None:
            length = cache.get_seq_length()
            return int(length)
    return 0


def strip_output(output: Any, strip: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply `strip` ((B, T+m, H) -> (B, T, H)) to last_hidden_state and every hidden_states entry."""
    if isinstance(output, ModelOutput):
        output.last_hidden_state = strip(output.last_hidden_state)
        if getattr(output, "hidden_states", None) is not None:
            output.hidden_states = tuple(strip(h) for h in output.hidden_states)
        return output
    if isinstance(output, tuple):
        return (strip(output[0]), *output[1:])
    return strip(output)


def encoder_decoder_stacks(model: PreTrainedModel) -> tuple[nn.Module, nn.Module] | None:
    """(encoder, decoder) stacks of an encoder-decoder model, else None."""
    if not getattr(model.config, "is_encoder_decoder", False):
        return None
    return model.get_encoder(), model.get_decoder()


def backbone(model: PreTrainedModel) -> nn.Module:
    """The module whose output is `last_hidden_state` (what sftlab.train.loss calls as `model.base_model`)."""
    return model.base_model
