"""A teacher's pseudo-labels for the unlabelled pool, each with a confidence in [0, 1].

seq-cls: the argmax class and its softmax probability. Generation (causal-lm, seq2seq): the greedy answer to each
prompt, cut at the first EOS or end-of-turn token (its text also at an end-of-turn marker written as plain text, as
per-task evaluation reads answers), scored by the mean log-probability the teacher gives its tokens (the stop token
included) in one teacher-forced pass; confidence = exp(that mean), the tokens' geometric-mean probability. An answer that does not
end within max_new_tokens, or is empty, is kept out (`reason`), as is a prompt that leaves no room in
data.max_length for an answer. With an `Agreement` (self_train.agreement_samples), k more answers are sampled per
prompt and `agreement` is the share of them equal to the greedy one after normalisation (scores.normalize_answer:
the same answer written a little differently agrees); an answer below `minimum` is kept out too. The samples are
drawn under torch's RNG seeded by (the agreement's key, the batch's first pool index, the sample), inside a forked
RNG: the same pool, teacher and seed draw the same samples, and no other draw in the process moves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import DataConfig
from ..data import RawRecord, collate, encode_prompt, parse_record
from ..data.encode import Encoder
from ..data.formats import as_chat, as_pair
from ..generate import Answers, generate_ids
from ..scores import normalize_answer
from .rows import RESPONSE_FIELD

SCORE_BATCH = 8


@dataclass
class Prediction:
    index: int  # position in the pool
    label: int | None  # seq-cls: the class index
    response: str | None  # generation: the answer's text
    confidence: float
    mean_logprob: float | None = None  # generation
    reason: str | None = None  # why it cannot be kept (unfinished, empty, too-long prompt); None: it can
    agreement: float | None = None  # generation with Agreement: share of samples equal to the greedy answer


LOW_AGREEMENT = "samples disagree (agreement below self_train.min_agreement)"


@dataclass(frozen=True)
class Agreement:
    """Self-consistency filter of generated pseudo-labels: `samples` answers per prompt at `temperature`."""

    samples: int
    temperature: float
    minimum: float
    key: tuple[int, ...]  # seeds the samples (train.seed, round)

    def seed(self, first: int, sample: int) -> int:
        return int(np.random.SeedSequence([*self.key, first, sample, 0xA9]).generate_state(1)[0])


@torch.no_grad()
def classify(
    model: nn.Module,
    tokenizer,
    data: DataConfig,
    pool: list[RawRecord],
    label_names: list[str],
    batch_size: int,
) -> list[Prediction]:
    """Each pool text's argmax class and softmax probability, batched by length."""
    enc = Encoder(tokenizer, data, "seq-cls", label_names)
    # The pool holds no label (rows.read_pool); the record parser wants one, so each gets the first class's name.
    examples = [
        enc.classify(
            parse_record(RawRecord(r.where, {**r.fields, "label": label_names[0]}), "classification")
        )
        for r in pool
    ]
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    out: list[Prediction | None] = [None] * len(examples)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = collate([examples[i] for i in idx], pad, "seq-cls")
        batch.pop("labels")
        probs = F.softmax(model(**batch).logits.float(), dim=-1)  # (B, C)
        conf, label = probs.max(dim=-1)
        for j, i in enumerate(idx):
            out[i] = Prediction(i, int(label[j]), None, float(conf[j]))
    return out  # type: ignore[return-value]


def _chat_fields(rec: RawRecord, fmt: str) -> dict:
    """The pool record as a labelled record of its format with an empty answer (parsed for its prompt turns)."""
    if fmt == "messages":
        return {**rec.fields, "messages": [*rec.fields["messages"], {"role": "assistant", "content": ""}]}
    return {**rec.fields, RESPONSE_FIELD[fmt]: ""}


def prompt_ids(tokenizer, data: DataConfig, rec: RawRecord, seq2seq: bool) -> list[int]:
    """The ids a generation starts from, rendered as training renders the record's prompt."""
    parsed = parse_record(
        RawRecord(rec.where, _chat_fields(rec, data.format)), data.format, data.system_prompt
    )
    if seq2seq:
        source = as_pair(parsed).source
        return list(
            tokenizer(source, add_special_tokens=True, truncation=True, max_length=data.max_length)[
                "input_ids"
            ]
        )
    turns = as_chat(parsed, data.system_prompt).turns[:-1]  # without the empty answer
    return encode_prompt(tokenizer, data, [{"role": t.role, "content": t.content} for t in turns])


@torch.no_grad()
def answer_logprobs(
    model: nn.Module, prompts: list[list[int]], answers: list[list[int]], pad_id: int, seq2seq: bool
) -> list[list[float]]:
    """Per-token log-probabilities the model gives each answer after its prompt (teacher-forced, one pass)."""
    device = next(model.parameters()).device
    if seq2seq:
        src_w, ans_w = max(map(len, prompts)), max(map(len, answers))
        ids = torch.tensor([p + [pad_id] * (src_w - len(p)) for p in prompts], device=device)  # (B, S)
        mask = torch.tensor([[1] * len(p) + [0] * (src_w - len(p)) for p in prompts], device=device)
        labels = torch.tensor([a + [-100] * (ans_w - len(a)) for a in answers], device=device)  # (B, A)
        logits = model(input_ids=ids, attention_mask=mask, labels=labels).logits.float()  # (B, A, V)
        logp = F.log_softmax(logits, dim=-1)
        return [[float(logp[b, t, tok]) for t, tok in enumerate(a)] for b, a in enumerate(answers)]
    seqs = [p + a for p, a in zip(prompts, answers)]
    width = max(map(len, seqs))
    ids = torch.tensor([s + [pad_id] * (width - len(s)) for s in seqs], device=device)  # (B, T), right-padded
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=device)
    logits = model(input_ids=ids, attention_mask=mask).logits.float()  # (B, T, V)
    out = []
    for b, (p, a) in enumerate(zip(prompts, answers)):
        logp = F.log_softmax(logits[b, len(p) - 1 : len(p) + len(a) - 1], dim=-1)  # (len(a), V): predicts a
        out.append([float(logp[t, tok]) for t, tok in enumerate(a)])
    return out


def _cut(row: list[int], answers: Answers, seq2seq: bool) -> tuple[list[int], bool]:
    """A generated row up to and including its first stop token (EOS, a one-token end of turn); (tokens, ended)."""
    if seq2seq:
        row = row[1:]  # the decoder start token
    end = answers.end(row)
    return (row, False) if end is None else (row[: end + 1], True)


def _agreements(
    model: nn.Module, tokenizer, prompts: list[list[int]], greedy: list[str], agreement: Agreement, first: int,
    max_new_tokens: int, answers: Answers, seq2seq: bool,
) -> list[float]:  # fmt: skip
    """Per prompt, the share of `agreement.samples` sampled answers (finished ones) equal to its greedy answer."""
    want = [normalize_answer(g) for g in greedy]
    votes = [0] * len(prompts)
    device = next(model.parameters()).device
    for s in range(agreement.samples):
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(agreement.seed(first, s))
            rows = generate_ids(
                model, tokenizer, prompts, max_new_tokens, agreement.temperature, len(prompts)
            )
        for j, row in enumerate(rows):
            tokens, ended = _cut(row, answers, seq2seq)
            votes[j] += ended and normalize_answer(answers.text(tokens)) == want[j]
    return [v / agreement.samples for v in votes]


def generate_answers(
    model: nn.Module,
    tokenizer,
    data: DataConfig,
    pool: list[RawRecord],
    max_new_tokens: int,
    batch_size: int,
    agreement: Agreement | None = None,
) -> list[Prediction]:
    """Each prompt's greedy answer with its mean token log-probability (and, with `agreement`, the share of sampled
    answers that agree with it); `reason` says why one cannot be kept."""
    seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    answers = Answers(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = [prompt_ids(tokenizer, data, r, seq2seq) for r in pool]
    out: list[Prediction | None] = [None] * len(pool)
    room = [i for i, p in enumerate(ids) if seq2seq or len(p) < data.max_length]
    for i in sorted(set(range(len(pool))) - set(room)):
        out[i] = Prediction(i, None, None, 0.0, None, "prompt fills data.max_length")
    order = sorted(room, key=lambda i: len(ids[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        new = generate_ids(model, tokenizer, [ids[i] for i in idx], max_new_tokens, 0.0, len(idx))
        cuts = [_cut(row, answers, seq2seq) for row in new]
        scored = [j for j, (a, _) in enumerate(cuts) if a]
        by_j: dict[int, list[float]] = {}
        for k in range(
            0, len(scored), SCORE_BATCH
        ):  # a few rows at a time: the pass holds (rows, T, vocab) logits
            part = scored[k : k + SCORE_BATCH]
            logps = answer_logprobs(
                model, [ids[idx[j]] for j in part], [cuts[j][0] for j in part], pad, seq2seq
            )
            by_j.update(zip(part, logps))
        texts = [answers.text(tokens) for tokens, _ in cuts]
        agree = None
        if agreement is not None:
            agree = _agreements(model, tokenizer, [ids[i] for i in idx], texts, agreement, idx[0], max_new_tokens,
                                answers, seq2seq)  # fmt: skip
        for j, i in enumerate(idx):
            finished, text = cuts[j][1], texts[j]
            lp = by_j.get(j)
            mean = sum(lp) / len(lp) if lp else None
            reason = None if finished else f"no end (EOS) within {max_new_tokens} new tokens"
            if finished and not text:
                reason = "empty answer"
            if reason is None and agree is not None and agree[j] < agreement.minimum:
                reason = LOW_AGREEMENT
            conf = math.exp(mean) if mean is not None else 0.0
            out[i] = Prediction(i, None, text, conf, mean, reason, agree[j] if agree is not None else None)
    return out  # type: ignore[return-value]
