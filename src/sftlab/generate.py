"""Batched generation from prompts, rendered with the same template as training."""

from __future__ import annotations

import torch
from torch import nn

from .config import DataConfig


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer,
    data_cfg: DataConfig | None,
    prompts: list[str],
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    chat: bool = True,
    batch_size: int = 8,
) -> list[str]:
    """Decoded completions (new tokens only). Causal LMs are left-padded so every row continues at the end."""
    from .data import encode_prompt

    model.eval()
    is_seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    outs: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        if chat and data_cfg is not None and not is_seq2seq:
            ids = [encode_prompt(tokenizer, data_cfg, p) for p in chunk]
        else:
            ids = [tokenizer(p, add_special_tokens=is_seq2seq)["input_ids"] for p in chunk]
        width = max(len(x) for x in ids)
        if is_seq2seq:
            input_ids = torch.tensor([x + [pad_id] * (width - len(x)) for x in ids])
            mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
        else:
            input_ids = torch.tensor([[pad_id] * (width - len(x)) + x for x in ids])
            mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
        kwargs = {"do_sample": temperature > 0, "max_new_tokens": max_new_tokens, "pad_token_id": pad_id}
        if temperature > 0:
            kwargs["temperature"] = temperature
        out = model.generate(input_ids=input_ids, attention_mask=mask, **kwargs)
        new = out if is_seq2seq else out[:, width:]
        outs.extend(tokenizer.decode(row, skip_special_tokens=True).strip() for row in new)
    return outs
