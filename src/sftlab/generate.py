"""Batched generation from prompts, rendered with the same template as training."""

from __future__ import annotations

import logging

import torch
from torch import nn

from .config import DataConfig
from .data.templates import END_OF_TURN
from .errors import ConfigError, ModelError
from .models import describe_limit, position_limit
from .quant import decoded_once
from .scores import cut_at

log = logging.getLogger(__name__)


def fit_new_tokens(
    model: nn.Module, width: int, max_new_tokens: int, reserved: int = 0, warn: bool = True
) -> int:
    """`max_new_tokens`, capped so prompt + reply fit a model with a position table (GPT-2, BERT, BART): one
    position more is an IndexError mid-generation. A prompt that alone does not fit is a ModelError.
    `reserved`: positions a prompt/prefix method's virtual tokens take."""
    limit = position_limit(model)
    if limit is None:
        return max_new_tokens
    is_seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    used = reserved + (0 if is_seq2seq else width)  # a decoder's positions start after its own first token
    extra = f" after {reserved} virtual tokens" if reserved else ""
    if width + reserved > limit or used >= limit:
        raise ModelError(
            f"prompt: {width} tokens{extra} leave no room to generate: {describe_limit(model, limit)}; "
            "shorten the prompt"
        )
    room = limit - used
    if max_new_tokens > room:
        if warn:
            log.warning(
                "max_new_tokens=%d capped to %d: %s and the prompt takes %d%s",
                max_new_tokens,
                room,
                describe_limit(model, limit),
                width,
                extra,
            )
        return room
    return max_new_tokens


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
    top_p: float = 1.0,
    reserved_positions: int = 0,
) -> list[str]:
    """Decoded completions (new tokens only). Causal LMs are left-padded so every row continues at the end.
    temperature 0 is greedy; above 0 samples, from the top_p probability mass. `reserved_positions`: a
    prompt/prefix method's virtual tokens (method.num_virtual_tokens), which take positions in models with a
    position table; max_new_tokens is capped to what fits there (a warning says so)."""
    from .data import encode_prompt

    if not temperature >= 0:  # also NaN
        raise ConfigError(f"generate: temperature must be >= 0 (0 = greedy) (got {temperature})")
    if not 0 < top_p <= 1:
        raise ConfigError(f"generate: top_p must be in (0, 1] (got {top_p})")
    if not (isinstance(max_new_tokens, int) and max_new_tokens > 0):
        raise ConfigError(f"generate: max_new_tokens must be a positive integer (got {max_new_tokens!r})")
    if not (isinstance(batch_size, int) and batch_size > 0):
        raise ConfigError(f"generate: batch_size must be a positive integer (got {batch_size!r})")

    is_seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    if chat and data_cfg is not None and not is_seq2seq:
        ids = [encode_prompt(tokenizer, data_cfg, p) for p in prompts]
    else:
        ids = [tokenizer(p, add_special_tokens=is_seq2seq)["input_ids"] for p in prompts]
    new = generate_ids(
        model, tokenizer, ids, max_new_tokens, temperature, batch_size, top_p, reserved_positions
    )
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]


@torch.no_grad()
def generate_ids(
    model: nn.Module,
    tokenizer,
    prompts: list[list[int]],
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    batch_size: int = 8,
    top_p: float = 1.0,
    reserved_positions: int = 0,
    synced: bool = False,
) -> list[list[int]]:
    """The new token ids after each prompt (ids, already encoded), `batch_size` prompts at a time: what `generate`
    decodes, and what per-task evaluation scores (it cuts answers at their terminators itself). Leaves the model
    in eval mode. `synced`: every process of a sharded (FSDP2) model generates together, each one decoding until all
    are done, since every step's forward is a collective."""
    model.eval()
    is_seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    outs: list[list[int]] = []
    with decoded_once(model):  # a quantised base decodes each weight once, not once per new token
        for start in range(0, len(prompts), batch_size):
            ids = prompts[start : start + batch_size]
            width = max(len(x) for x in ids)
            if is_seq2seq:
                input_ids = torch.tensor([x + [pad_id] * (width - len(x)) for x in ids])
                mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
            else:
                input_ids = torch.tensor([[pad_id] * (width - len(x)) + x for x in ids])
                mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
            device = next(model.parameters()).device
            input_ids, mask = input_ids.to(device), mask.to(device)
            new_tokens = fit_new_tokens(model, width, max_new_tokens, reserved_positions, warn=start == 0)
            kwargs = {"do_sample": temperature > 0, "max_new_tokens": new_tokens, "pad_token_id": pad_id}
            if synced:
                kwargs["synced_gpus"] = True
            if temperature > 0:
                kwargs["temperature"] = temperature
                if top_p < 1:
                    kwargs["top_p"] = top_p
            out = model.generate(input_ids=input_ids, attention_mask=mask, **kwargs)
            new = (
                out if is_seq2seq else out[:, width:]
            )  # (B, new) ; seq2seq rows start with the decoder start token
            outs.extend(row.tolist() for row in new.cpu())
    return outs


class Answers:
    """Where a generated answer ends and what it says: at the first EOS or end-of-turn token (a marker that is one
    token), its text cut at an end-of-turn marker written as plain text (a template whose marker is not one token).
    Per-task evaluation scores these answers; self-training keeps them as pseudo-labels."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.stop_ids = {tokenizer.eos_token_id} - {None}
        for marker in END_OF_TURN:
            enc = tokenizer(marker, add_special_tokens=False, verbose=False)["input_ids"]
            if len(enc) == 1:
                self.stop_ids.add(enc[0])
        self.markers = (*END_OF_TURN, tokenizer.eos_token or "")

    def end(self, ids: list[int]) -> int | None:
        """Index of the first stop token in `ids`; None when the answer never ends there."""
        return next((j for j, t in enumerate(ids) if t in self.stop_ids), None)

    def text(self, ids: list[int]) -> str:
        end = self.end(ids)
        return cut_at(self.tokenizer.decode(ids[:end], skip_special_tokens=True), self.markers)


def read_prompts(path: str) -> list[tuple[str, str | list[dict]]]:
    """(where, prompt) for each record of a prompts file (jsonl, json, csv, ...): `prompt` (text), `messages` (a
    conversation to continue; a last assistant turn, the reference answer, is dropped) or alpaca's `instruction`
    (+ `input`, joined as training joins them). A record with none of them is a DataError naming its line."""
    from .data import read_records
    from .data.readers import DataError, field_list, short

    out: list[tuple[str, str | list[dict]]] = []
    for rec in read_records(path):
        f = rec.fields
        if isinstance(f.get("prompt"), str) and f["prompt"].strip():
            out.append((rec.where, f["prompt"]))
        elif isinstance(f.get("messages"), list) and f["messages"]:
            msgs = [m for m in f["messages"] if isinstance(m, dict)]
            if len(msgs) != len(f["messages"]):
                raise DataError(f"{rec.where}: messages: expected a list of {{role, content}} objects")
            if msgs[-1].get("role") == "assistant":
                msgs = msgs[:-1]
            if not msgs:
                raise DataError(
                    f"{rec.where}: messages: nothing before the assistant's answer to prompt with"
                )
            out.append((rec.where, [{"role": m.get("role"), "content": m.get("content")} for m in msgs]))
        elif isinstance(f.get("instruction"), str) and f["instruction"].strip():
            extra = f.get("input") if isinstance(f.get("input"), str) else ""
            out.append((rec.where, f["instruction"] + ("\n\n" + extra if extra.strip() else "")))
        else:
            got = f"; got {short(f['prompt'])}" if "prompt" in f else ""
            raise DataError(
                f"{rec.where}: prompt: expected a non-empty `prompt` string, a `messages` list or an alpaca "
                f"`instruction` (record has {field_list(f)}{got})"
            )
    if not out:
        raise DataError(f"{path}: no prompts")
    return out
