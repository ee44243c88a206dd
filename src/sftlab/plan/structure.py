"""What trains where: a model with a method applied, read block by block (on the meta device, no storage).

The activation and FLOP formulas need, per transformer block: does a gradient flow through it (it, or a block
below it, or the input embeddings, holds something that trains), which of its linear layers keep their input for
a weight gradient (the weight trains, or LoRA adapts it), the LoRA ranks and DoRA widths, the bottleneck adapters,
and how many matmul weights it holds. All of it is read from parameter names and `requires_grad` flags, so any
method that follows the naming of sftlab's methods is read correctly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..methods.adapter.adapter_map import block_lists

# Block-relative module paths -> role, first match wins (BERT's attention.output.dense before output.dense).
ROLES: dict[str, list[tuple[str, str]]] = {
    "llama": [("q_proj", "qkv"), ("k_proj", "qkv"), ("v_proj", "qkv"), ("qkv_proj", "qkv"), ("o_proj", "o"),
              ("gate_proj", "up"), ("up_proj", "up"), ("gate_up_proj", "up"), ("down_proj", "down")],
    "gpt2": [("attn.c_attn", "qkv"), ("attn.c_proj", "o"), ("mlp.c_fc", "up"), ("mlp.c_proj", "down")],
    "bert": [("query", "qkv"), ("key", "qkv"), ("value", "qkv"), ("attention.output.dense", "o"),
             ("intermediate.dense", "up"), ("output.dense", "down")],
    "t5": [("EncDecAttention.q", "xq"), ("EncDecAttention.k", "xkv"), ("EncDecAttention.v", "xkv"),
           ("EncDecAttention.o", "xo"), ("SelfAttention.q", "qkv"), ("SelfAttention.k", "qkv"),
           ("SelfAttention.v", "qkv"), ("SelfAttention.o", "o"), ("wi", "up"), ("wi_0", "up"), ("wi_1", "up"),
           ("wo", "down")],
}  # fmt: skip

_MATMUL_LEAVES = ("weight",)

# Points of a block in forward order: its input, the q/k/v projections, the attention output projection, the MLP's
# first projection(s), its last projection, and the block's output (after an adapter on the MLP output).
ENTRY = ("in", "qkv", "o", "up", "down", "out")
_ROLE_ENTRY = {"qkv": "qkv", "xq": "qkv", "xkv": "qkv", "o": "o", "xo": "o", "up": "up", "down": "down"}
_ADAPTER_ENTRY = {"o": "o", "xo": "o", "down": "out"}  # an adapter acts on its module's output


@dataclass
class BlockTraining:
    """One transformer block as training sees it."""

    stack: str  # the ModuleList's path, e.g. model.layers / encoder.block
    index: int
    grads: bool = False  # a gradient flows through (part of) this block
    # where the gradient starts in the block, in forward order (ENTRY): "in" when it flows in from below; in the
    # first block that trains, the earliest trainable part (LoRA on o_proj: "o"; a Pfeiffer adapter: "out")
    entry: str = "in"
    saves: set[str] = field(default_factory=set)  # roles whose linear input is kept (weight trains, or LoRA)
    norm_trains: bool = False
    lora_ranks: int = 0  # sum of r over LoRA-adapted linears: each keeps (tokens x r)
    dora_width: int = 0  # sum of d_out over DoRA-adapted linears
    adapters: list[int] = field(default_factory=list)  # bottleneck width of each adapter point
    matmul: int = 0  # base matmul weights (the per-token 2N forward FLOPs of the block)
    matmul_trains: int = 0  # ... of which train (their weight gradient costs 2N more)
    matmul_mlp: int = 0  # ... of which the MLP's (sftlab runs the last block's MLP on supervised rows)
    matmul_source: int = 0  # ... of which read the source (T5 cross-attention k, v: per source token)
    matmul_source_trains: int = 0
    added: int = 0  # the method's own matmul weights in this block (LoRA A/B, adapter down/up)
    matmul_past_entry: int = (
        0  # base matmul weights whose input a gradient reaches (backward needs the weight)
    )


def _role(rel: str, family: str) -> str | None:
    path = rel.replace(".base_layer", "")
    for suffix, role in ROLES.get(family, ROLES["llama"]):
        if path == suffix or path.endswith("." + suffix):
            return role
    return None


def _module_of(pname: str) -> str:
    """Parameter name -> its base module path (LoRA/adapter parts and `.base_layer` folded away)."""
    path = pname.rsplit(".", 1)[0]
    for marker in (".lora_A.", ".lora_B.", ".lora_magnitude_vector.", ".adapters."):
        if marker in pname:
            return pname.split(marker)[0]
    return path.replace(".base_layer", "")


def read_blocks(model: nn.Module, family: str) -> list[BlockTraining]:
    """Every block of every stack (T5: encoder then decoder), with what trains in it and whether a gradient
    flows through it: from the first block holding something that trains (all of them when anything below the
    blocks trains: embeddings, prompt tuning's virtual tokens)."""
    out: list[BlockTraining] = []
    stacks = block_lists(model)
    below_trains = any(
        p.requires_grad
        for n, p in model.named_parameters()
        if not any(n.startswith(s + ".") for s in stacks) and _below_blocks(n)
    )
    for stack in stacks:
        flowing = below_trains
        for i, block in enumerate(model.get_submodule(stack)):
            b = BlockTraining(stack, i)
            first = len(ENTRY)  # earliest trainable point in this block
            by_point: dict[str, int] = {}
            for pname, p in block.named_parameters():
                module = _module_of(pname)
                role = _role(module, family)
                if p.requires_grad:
                    point = "in" if role is None else _ROLE_ENTRY.get(role, "in")
                    if ".adapters." in pname:
                        point = _ADAPTER_ENTRY.get(role or "", "in")
                    first = min(first, ENTRY.index(point))
                if ".lora_A." in pname:
                    b.lora_ranks += p.shape[0]
                    b.added += p.numel()
                    if role:
                        b.saves.add(role)
                elif ".lora_B." in pname:
                    b.added += p.numel()
                elif ".lora_magnitude_vector." in pname:
                    b.dora_width += p.shape[0]
                elif ".adapters." in pname:
                    if pname.endswith("down.weight"):
                        b.adapters.append(p.shape[0])
                    if pname.endswith(("down.weight", "up.weight")):
                        b.added += p.numel()
                elif role is not None and pname.endswith(_MATMUL_LEAVES) and p.dim() == 2:
                    b.matmul += p.numel()
                    point = _ROLE_ENTRY.get(role, "in")
                    by_point[point] = by_point.get(point, 0) + p.numel()
                    if role in ("up", "down"):
                        b.matmul_mlp += p.numel()
                    if role == "xkv":
                        b.matmul_source += p.numel()
                    if p.requires_grad:
                        b.matmul_trains += p.numel()
                        b.matmul_source_trains += p.numel() if role == "xkv" else 0
                        b.saves.add(role)
                elif p.requires_grad and p.dim() == 1 and "norm" in pname.lower():
                    b.norm_trains = True
            if not flowing and first < len(ENTRY):
                b.entry, flowing = ENTRY[first], True
            b.grads = flowing
            if flowing:
                after = ENTRY.index(b.entry)
                b.matmul_past_entry = sum(n for pt, n in by_point.items() if ENTRY.index(pt) > after)
            out.append(b)
    return out


# Parameters outside the blocks that a gradient must reach through every block: input embeddings, prompt tuning's
# virtual tokens (before block 0), prefix tuning's keys/values (read inside every block's attention).
_BELOW = ("embed", "wte", "wpe", "shared", "word_embeddings", "sftlab_prompt", "sftlab_prefix")


def _below_blocks(name: str) -> bool:
    return any(k in name.split(".")[0] or f".{k}" in name for k in _BELOW)


def outside_matmul(model: nn.Module, task: str) -> int:
    """Matmul weights outside the blocks and the LM head that run once per example (pooler, classifier)."""
    if task != "seq-cls":
        return 0
    stacks = block_lists(model)
    total = 0
    for name, mod in model.named_modules():
        if any(name.startswith(s + ".") for s in stacks) or ".modules_to_save" in name:
            continue
        w = getattr(mod, "weight", None)
        if isinstance(mod, nn.Linear) and w is not None:
            total += w.numel()
    return total


def head_matmul(model: nn.Module, task: str) -> tuple[int, bool]:
    """(weights of the LM head matmul, whether they train); (0, False) for seq-cls (one row per example)."""
    if task == "seq-cls":
        return 0, False
    head = model.get_output_embeddings()
    if head is None:
        return 0, False
    w = head.weight
    return w.numel(), bool(w.requires_grad)
