"""Where bottleneck adapters go in each architecture: the attention-output and FFN-output modules of every block.

The adapter wraps the module whose output is added to the residual stream (before the block's residual add),
so one small table per `config.model_type` is all an architecture needs. Names are relative to a block
(one element of the blocks' ModuleList); a name listed but absent from a block is skipped, which lets
T5's encoder blocks (`layer.1` = FFN) and decoder blocks (`layer.1` = cross-attention, `layer.2` = FFN)
share one entry. Unknown architectures fall back to a name-based search; when that fails too, the error
says which entry to add here.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

# Block-level ModuleLists are named like this (decoder layers, encoder layers, GPT-2 `h`, T5 `block`).
_BLOCK_LIST_NAMES = ("layers", "layer", "h", "block", "blocks")


@dataclass(frozen=True)
class ArchPoints:
    """Block-relative names of the modules whose outputs get an adapter."""

    attn: tuple[str, ...]  # attention output projection(s): Houlsby only
    ffn: tuple[str, ...]  # feed-forward output projection: Houlsby and Pfeiffer


_LLAMA_LIKE = ArchPoints(attn=("self_attn.o_proj",), ffn=("mlp.down_proj",))
_BERT_LIKE = ArchPoints(attn=("attention.output.dense",), ffn=("output.dense",))
_BART_LIKE = ArchPoints(attn=("self_attn.out_proj", "encoder_attn.out_proj"), ffn=("fc2",))

INSERTION_MAP: dict[str, ArchPoints] = {
    **{
        t: _LLAMA_LIKE
        for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "olmo", "granite")
    },
    "gpt2": ArchPoints(attn=("attn.c_proj",), ffn=("mlp.c_proj",)),
    "gpt_neox": ArchPoints(attn=("attention.dense",), ffn=("mlp.dense_4h_to_h",)),
    "opt": ArchPoints(attn=("self_attn.out_proj",), ffn=("fc2",)),
    **{t: _BERT_LIKE for t in ("bert", "roberta", "xlm-roberta", "electra")},
    "distilbert": ArchPoints(attn=("attention.out_lin",), ffn=("ffn.lin2",)),
    **{t: _BART_LIKE for t in ("bart", "mbart", "marian")},
    **{
        t: ArchPoints(
            attn=("layer.0.SelfAttention.o", "layer.1.EncDecAttention.o"),
            ffn=("layer.1.DenseReluDense.wo", "layer.2.DenseReluDense.wo"),
        )
        for t in ("t5", "mt5")
    },
}

# Fallback: last projection inside an attention container / last projection outside attention, if named like these.
_ATTN_OUT_NAMES = ("o_proj", "out_proj", "c_proj", "o", "dense", "out_lin", "wo", "proj")
_FFN_OUT_NAMES = ("down_proj", "c_proj", "fc2", "wo", "dense_4h_to_h", "lin2", "w2", "dense", "proj_out")


@dataclass(frozen=True)
class InsertionPoint:
    name: str  # full module path, e.g. "model.layers.0.self_attn.o_proj"
    kind: str  # "attn" | "ffn"


def block_lists(model: nn.Module) -> list[str]:
    """Outermost ModuleLists of blocks (T5's per-block `layer` lists are nested inside `block`, so skipped)."""
    found: list[str] = []
    for name, mod in model.named_modules():
        if not (isinstance(mod, nn.ModuleList) and len(mod) and name.split(".")[-1] in _BLOCK_LIST_NAMES):
            continue
        if any(name.startswith(f + ".") for f in found):
            continue
        found.append(name)
    return found


def out_features(module: nn.Module) -> int | None:
    """Output width of a projection: Linear.out_features, GPT-2 Conv1D.nf, or the weight's output dim."""
    for attr in ("out_features", "nf"):
        if isinstance(getattr(module, attr, None), int):
            return getattr(module, attr)
    return None


def _is_projection(module: nn.Module) -> bool:
    return out_features(module) is not None and not list(module.children())


def _fallback_points(block: nn.Module) -> ArchPoints | None:
    """Guess a block's output projections from module names; None when the guess is not clean."""
    attn: dict[str, str] = {}  # attention container -> its last projection
    ffn: str | None = None
    for rel, mod in block.named_modules():
        if not rel or not _is_projection(mod):
            continue
        parts = rel.split(".")
        hit = next((i for i, p in enumerate(parts) if "attn" in p.lower() or "attention" in p.lower()), None)
        if hit is not None:
            attn[".".join(parts[: hit + 1])] = rel
        else:
            ffn = rel
    attn_names = tuple(attn.values())
    if ffn is None or ffn.split(".")[-1] not in _FFN_OUT_NAMES:
        return None
    if not attn_names or any(a.split(".")[-1] not in _ATTN_OUT_NAMES for a in attn_names):
        return None
    return ArchPoints(attn=attn_names, ffn=(ffn,))


def _unknown_arch_error(model: nn.Module, model_type: str, why: str) -> ValueError:
    lists = block_lists(model)
    example = ""
    if lists:
        block = model.get_submodule(lists[0])[0]
        projs = [rel for rel, m in block.named_modules() if rel and _is_projection(m)]
        example = f" Projections in block {lists[0]}.0: {', '.join(projs)}."
    return ValueError(
        f"adapter: no insertion map for model_type {model_type!r} ({type(model).__name__}) and {why}. "
        f"Add an entry to sftlab.methods.adapter.adapter_map.INSERTION_MAP: "
        f"{model_type!r}: ArchPoints(attn=('<attention output module>',), ffn=('<FFN output module>',)), "
        f"names relative to a transformer block.{example}"
    )


def find_insertion_points(model: nn.Module, placement: str) -> list[InsertionPoint]:
    """Every adapter position for `placement` (houlsby: attention + FFN outputs; pfeiffer: FFN outputs)."""
    model_type = getattr(getattr(model, "config", None), "model_type", "") or type(model).__name__.lower()
    lists = block_lists(model)
    if not lists:
        raise _unknown_arch_error(model, model_type, "no ModuleList of transformer blocks was found")
    mapped = INSERTION_MAP.get(model_type)
    points: list[InsertionPoint] = []
    for list_name in lists:
        for i, block in enumerate(model.get_submodule(list_name)):
            arch = mapped or _fallback_points(block)
            if arch is None:
                raise _unknown_arch_error(
                    model, model_type, "the name-based search found no clean attention/FFN outputs"
                )
            present = {rel for rel, _ in block.named_modules()}
            kinds = (
                (("attn", arch.attn), ("ffn", arch.ffn)) if placement == "houlsby" else (("ffn", arch.ffn),)
            )
            for kind, rels in kinds:
                for rel in rels:
                    if rel in present:
                        points.append(InsertionPoint(f"{list_name}.{i}.{rel}", kind))
            if not any(p.name.startswith(f"{list_name}.{i}.") and p.kind == "ffn" for p in points):
                raise _unknown_arch_error(
                    model, model_type, f"block {list_name}.{i} has none of the FFN outputs {arch.ffn}"
                )
    return points
