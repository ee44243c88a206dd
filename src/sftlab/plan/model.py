"""The model a plan is about, without its weights: its HF config, a meta-device build, and its shape.

Planning a 70B model must not need 140 GB of weights, so the planner reads only the config (a tiny name, a local
directory, a bare `config.json`, a .gguf file's metadata, or an HF id when online or cached) and builds the
model on the meta device (`torch.device("meta")`: every tensor has a shape and a dtype, no storage). Each method's
own `apply()` then runs on that meta model, so parameter counts come from the same code that trains.

`Shape` holds what the activation and FLOP formulas need (hidden size, heads, MLP width, ...), read from the
config per architecture family; a family it does not know is treated as Llama-like and says so.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from ..errors import ModelError
from ..methods import MethodConfigBase, MethodContext, get_method
from ..models import TINY_NAMES, byte_tokenizer, default_task, hub_offline, named_source, tiny_config

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")

# model_type -> family whose activation formula applies (plan/activations.py).
FAMILIES: dict[str, str] = {
    **{
        t: "llama"
        for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "granite", "phi3")
    },
    "gpt2": "gpt2",
    **{t: "bert" for t in ("bert", "roberta", "xlm-roberta", "electra")},
    **{t: "t5" for t in ("t5", "mt5")},
}


@dataclass(frozen=True)
class Shape:
    """Sizes the formulas need. q = heads * head_dim (the attention width), kv = kv_heads * head_dim."""

    family: str  # llama | gpt2 | bert | t5
    model_type: str
    hidden: int
    q: int
    kv: int
    heads: int
    ffn: int
    layers: int  # blocks (encoder blocks for T5)
    decoder_layers: int  # T5's decoder blocks; 0 otherwise
    vocab: int
    gated: bool  # gated MLP (SiLU-gated Llama, T5 gated-gelu)
    act: str  # hidden_act / feed_forward_proj
    dropout: float  # hidden (residual) dropout in training
    attn_dropout: float
    known: bool  # False: an unknown model_type read as Llama-like


@dataclass
class ModelSource:
    """Where a plan's model came from: its config, task, and (when one is there) where its tokenizer is."""

    name: str
    config: Any  # transformers PretrainedConfig
    task: str
    tokenizer: str | None  # a name/dir `load_tokenizer` takes, or None when only a config is known
    described: str  # one line for the report, e.g. "config.json only (no weights)"
    has_weights: bool


def _config_from(path: str, trust_remote_code: bool, name: str | None = None, **kw) -> Any:
    """AutoConfig of `path`; errors name `name` (what the user wrote: a .gguf file rather than its folder)."""
    from transformers import AutoConfig

    with named_source(name or path):
        try:
            return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, **kw)
        except ValueError as e:  # an unknown model_type, custom code without --trust-remote-code
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelError(f"--model {path!r}: transformers cannot read this config: {first}") from e


def _has_tokenizer(d: Path) -> bool:
    return any((d / f).is_file() for f in TOKENIZER_FILES)


def _has_weights(d: Path) -> bool:
    return any(d.glob("*.safetensors")) or any(d.glob("*.bin")) or any(d.glob("*.gguf"))


def guess_task(config: Any) -> str:
    """causal-lm for decoders, seq2seq for encoder-decoders, seq-cls for encoders (from `architectures`)."""
    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    archs = " ".join(getattr(config, "architectures", None) or [])
    if "ForSequenceClassification" in archs:
        return "seq-cls"
    if any(k in archs for k in ("CausalLM", "LMHead")):
        return "causal-lm"
    if FAMILIES.get(getattr(config, "model_type", "")) == "bert":
        return "seq-cls"
    return "causal-lm"


def resolve(
    name: str, task: str | None = None, num_labels: int = 2, trust_remote_code: bool = False
) -> ModelSource:
    """The config of `name`: a tiny name, a `config.json` file, a model directory, a .gguf file, the cached demo
    model (`smollm2-135m-instruct`), or an HF id (online, or cached offline). Never loads weights."""
    if name in TINY_NAMES:
        task = task or default_task(name)
        cfg = tiny_config(name, len(byte_tokenizer()), task, num_labels if task == "seq-cls" else None)
        return ModelSource(name, cfg, task, name, f"{name} (built-in, random weights)", True)
    p = Path(name).expanduser()
    if name == "smollm2-135m-instruct" and not p.exists():
        from ..demo_model import DEMO_DIRNAME, cache_root, is_complete

        cached = cache_root() / DEMO_DIRNAME
        if not is_complete(cached):
            raise ModelError(
                f"--model {name}: the demo model is not cached in {cached} (run `sftlab quickstart` once to build "
                "it), and the planner never downloads weights; give its config.json instead"
            )
        p = cached
    if p.is_file() and p.suffix.lower() == ".json":
        cfg = _config_from(str(p), trust_remote_code)
        tok = str(p.parent) if _has_tokenizer(p.parent) else None
        return ModelSource(name, cfg, task or guess_task(cfg), tok, f"{p} (config only, no weights)", False)
    if p.is_file() and p.suffix.lower() == ".gguf":
        cfg = _config_from(str(p.parent), trust_remote_code, name, gguf_file=p.name)
        return ModelSource(name, cfg, task or guess_task(cfg), name, f"{p} (GGUF metadata)", True)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelError(
                f"--model {name!r}: a directory without config.json; give the model's config.json"
            )
        cfg = _config_from(str(p), trust_remote_code)
        weights = _has_weights(p)
        tok = str(p) if _has_tokenizer(p) else None
        what = "model directory" if weights else "config only, no weights"
        return ModelSource(name, cfg, task or guess_task(cfg), tok, f"{p} ({what})", weights)
    if p.suffix.lower() == ".json":
        raise ModelError(f"--model {name!r}: no such file")
    cfg = _config_from(name, trust_remote_code)  # an HF id: config.json only, from the hub or its cache
    where = "HF hub cache" if hub_offline() else "HF hub"
    return ModelSource(name, cfg, task or guess_task(cfg), name, f"{name} (config from the {where})", True)


def shape_of(config: Any) -> Shape:
    """The sizes of `config` per family; an unknown model_type is read with Llama's attribute names."""
    mt = getattr(config, "model_type", "") or ""
    family = FAMILIES.get(mt, "llama")
    g = lambda *keys, default=None: next(  # noqa: E731
        (getattr(config, k) for k in keys if getattr(config, k, None) is not None), default
    )
    if family == "gpt2":
        h, heads = config.n_embd, config.n_head
        return Shape("gpt2", mt, h, h, h, heads, config.n_inner or 4 * h, config.n_layer, 0, config.vocab_size,
                     False, config.activation_function, config.resid_pdrop, config.attn_pdrop, True)  # fmt: skip
    if family == "t5":
        h, heads, dkv = config.d_model, config.num_heads, config.d_kv
        proj = config.feed_forward_proj
        dec = config.num_decoder_layers or config.num_layers
        return Shape("t5", mt, h, heads * dkv, heads * dkv, heads, config.d_ff, config.num_layers, dec,
                     config.vocab_size, proj.startswith("gated"), proj, config.dropout_rate, config.dropout_rate,
                     True)  # fmt: skip
    h = g("hidden_size", "d_model", "n_embd")
    heads = g("num_attention_heads", "n_head", "num_heads")
    if h is None or heads is None:
        raise ModelError(
            f"model_type {mt!r}: the config has no hidden_size/num_attention_heads; the planner cannot size it"
        )
    head_dim = g("head_dim", default=h // heads)
    kv_heads = g("num_key_value_heads", default=heads)
    layers = g("num_hidden_layers", "n_layer", "num_layers")
    ffn = g("intermediate_size", "n_inner", "ffn_dim", default=4 * h)
    if family == "bert":
        return Shape("bert", mt, h, heads * head_dim, kv_heads * head_dim, heads, ffn, layers, 0, config.vocab_size,
                     False, config.hidden_act, config.hidden_dropout_prob, config.attention_probs_dropout_prob,
                     True)  # fmt: skip
    return Shape("llama", mt, h, heads * head_dim, kv_heads * head_dim, heads, ffn, layers, 0, config.vocab_size,
                 True, str(g("hidden_act", default="silu")), 0.0, float(g("attention_dropout", default=0.0)),
                 mt in FAMILIES)  # fmt: skip


class _MetaScalars(TorchDispatchMode):
    """A scalar read from a meta tensor returns 1 (True for booleans) instead of failing.

    Two apply() steps read a value: prefix tuning runs a 2-token probe forward to find the attention sites (its
    mask code asks `.all()`), prompt tuning draws its init with the embeddings' std. Neither value changes any
    shape, so on a meta model any value gives the same parameter counts (a test compares them with real builds).
    """

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and args[0].is_meta:
            t = args[0]
            return True if t.dtype == torch.bool else (1.0 if t.is_floating_point() else 1)
        return func(*args, **(kwargs or {}))


@contextmanager
def on_meta() -> Iterator[None]:
    """Build and modify models with no storage: new tensors on the meta device, scalar reads answered."""
    with torch.device("meta"), _MetaScalars():
        yield


def meta_model(source: ModelSource, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model of `source` on the meta device (no storage), as `models.load_model` would build it."""
    from ..models import _AUTO_CLASSES

    cfg = copy.deepcopy(source.config)
    with on_meta():
        try:
            model = _AUTO_CLASSES[source.task].from_config(cfg, dtype=dtype, attn_implementation="sdpa")
        except (ValueError, KeyError) as e:
            raise ModelError(f"--model {source.name!r}: cannot build it for task {source.task}: {e}") from e
    return model


def with_method(
    source: ModelSource, method: MethodConfigBase, dtype: torch.dtype = torch.float32
) -> nn.Module:
    """A fresh meta model with `method` applied by the method's own apply()."""
    model = meta_model(source, dtype)
    spec = get_method(method.name)
    with on_meta():
        spec.apply(model, method, MethodContext(source.task, None, source.name))
    return model
