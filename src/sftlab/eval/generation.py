"""Generation metrics: every eval prompt answered (batched, greedy or sampled), scored against its references.

A record gives one (prompt, reference) pair: a chat's last assistant turn is the reference and the turns before it
the prompt (rendered with the run's template, as `sftlab generate` renders it); a seq2seq record's source is the
prompt and its target the reference. Records with the same prompt are one prompt with several references (E2E's
several descriptions of one meaning representation), in first-seen order, so corpus BLEU sees each prompt once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..data import encode_prompt
from ..data.formats import Chat, Pair, Record, as_chat, as_pair
from ..errors import DataError
from ..generate import Answers, generate_ids
from ..scores import score_corpus, score_example
from ..train.task_eval import EXTRA_NEW_TOKENS


@dataclass
class Prompt:
    """One prompt and every reference answer the data gives it."""

    prompt: str  # what the user asked: the last user turn, or the seq2seq source
    model_input: list[dict] | str  # the conversation before the answer (role/content), or the seq2seq source
    references: list[str] = field(default_factory=list)
    where: list[str] = field(default_factory=list)  # the records' file:line


def group_prompts(records: list[Record], task: str) -> list[Prompt]:
    """The records' prompts, each with all its references (records with an identical prompt grouped), in order of
    first appearance. A record without an answer to score (no assistant turn, an empty one) is skipped."""
    groups: dict[str, Prompt] = {}
    for rec in records:
        if task == "seq2seq":
            pair = as_pair(rec)
            key, shown, model_input, ref = pair.source, pair.source, pair.source, pair.target
        else:
            if not isinstance(rec, Chat | Pair):
                raise DataError(
                    f"{rec.where}: a {type(rec).__name__.lower()} record has no prompt and answer to generate and "
                    "score; generation metrics need alpaca, messages, sharegpt or seq2seq data"
                )
            turns = as_chat(rec).turns
            last = max((i for i, t in enumerate(turns) if t.role == "assistant"), default=None)
            if last is None:
                continue
            before = turns[:last]
            model_input = [{"role": t.role, "content": t.content} for t in before]
            users = [t.content for t in before if t.role == "user"]
            shown, ref = (users[-1] if users else ""), turns[last].content
            key = json.dumps(model_input)
        if not ref.strip():
            continue
        item = groups.setdefault(key, Prompt(shown, model_input))
        item.references.append(ref)
        item.where.append(rec.where)
    return list(groups.values())


def prompt_ids(tokenizer: Any, data_cfg: Any, task: str, prompts: list[Prompt]) -> list[list[int]]:
    """Token ids the model continues: a causal LM's prompt through the run's chat template (with its system prompt),
    a seq2seq source as training encodes it."""
    if task == "seq2seq":
        return [
            list(
                tokenizer(
                    p.model_input, add_special_tokens=True, truncation=True, max_length=data_cfg.max_length
                )["input_ids"]
            )
            for p in prompts
        ]
    chat_cfg = data_cfg.model_copy(update={"format": "messages"})
    return [encode_prompt(tokenizer, chat_cfg, p.model_input) for p in prompts]


@torch.no_grad()
def answer(
    model: nn.Module,
    tokenizer: Any,
    ids: list[list[int]],
    max_new_tokens: int,
    batch_size: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    reserved_positions: int = 0,
) -> list[str]:
    """Each prompt's answer text (cut at EOS / end of turn), generated `batch_size` prompts at a time, longest
    prompts first (less padding); returned in the prompts' order."""
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    new = generate_ids(
        model,
        tokenizer,
        [ids[i] for i in order],
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        batch_size=batch_size,
        top_p=top_p,
        reserved_positions=reserved_positions,
    )
    answers = Answers(tokenizer)
    out = [""] * len(ids)
    for i, row in zip(order, new):
        out[i] = answers.text(row)
    return out


def default_max_new_tokens(tokenizer: Any, prompts: list[Prompt]) -> int:
    """The longest reference in tokens plus a few: room to be wrong in length, not to ramble (as per-task eval)."""
    longest = max(
        (len(tokenizer(r, add_special_tokens=False)["input_ids"]) for p in prompts for r in p.references),
        default=0,
    )
    return longest + EXTRA_NEW_TOKENS


def score(metrics: list[str], prompts: list[Prompt], predictions: list[str]) -> tuple[dict, list[dict]]:
    """(corpus scores, one predictions.jsonl row per prompt with its own scores)."""
    refs = [p.references for p in prompts]
    corpus = score_corpus(metrics, predictions, refs)
    rows = [
        {
            "prompt": p.prompt,
            "prediction": pred,
            "references": p.references,
            "scores": score_example(metrics, pred, p.references),
            "where": p.where,
        }
        for p, pred in zip(prompts, predictions)
    ]
    return corpus, rows
