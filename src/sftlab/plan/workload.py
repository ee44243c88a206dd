"""What a plan trains on: examples, tokens per example, the share the loss supervises.

Counted from the user's files with sftlab's own readers and encoders (the same truncation, templates and
supervision as `sftlab train`), or stated with `--examples N --seq-len L`. The longest example sets the largest
pass (batches are grouped by length), the mean sets the tokens of an epoch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..data import IGNORE, encode_dataset, read_records
from ..errors import DataError, ModelError


@dataclass(frozen=True)
class Workload:
    examples: int
    mean_tokens: float  # model input per example (seq2seq: the source)
    max_tokens: int
    supervised_share: float  # supervised positions / positions (causal-lm); 1 otherwise
    target_mean: float = 0.0  # seq2seq: target tokens per example
    target_max: int = 0
    described: str = ""
    stats: dict = field(default_factory=dict)

    @property
    def tokens(self) -> float:
        """Tokens of one epoch (source and target for seq2seq)."""
        return self.examples * (self.mean_tokens + self.target_mean)


def stated(
    task: str, examples: int, seq_len: int, supervised_share: float, target_len: int | None
) -> Workload:
    """`--examples N --seq-len L`: every example L tokens (seq2seq: L source, target_len target)."""
    if task == "seq2seq":
        t = target_len or seq_len
        return Workload(
            examples, seq_len, seq_len, 1.0, t, t, f"{examples:,} examples of {seq_len} + {t} tokens"
        )
    share = supervised_share if task == "causal-lm" else 1.0
    what = f", {share:.0%} supervised" if task == "causal-lm" else ""
    return Workload(
        examples, seq_len, seq_len, share, described=f"{examples:,} examples of {seq_len} tokens{what}"
    )


def counted(files: list[str], tokenizer, task: str, data_cfg) -> Workload:
    """Encode every file as training would (`data_cfg`: format, max_length, columns, template, ...) and count."""
    if tokenizer is None:
        raise ModelError(
            "--data: counting tokens needs the model's tokenizer, and there is none beside its config; "
            "put the tokenizer files there, or give --examples N --seq-len L instead"
        )
    lengths: list[int] = []
    targets: list[int] = []
    supervised = positions = 0
    for f in files:
        records = read_records(f, data_cfg.columns, data_cfg.limit)
        if not records:
            raise DataError(f"{f}: no records")
        enc = encode_dataset(records, tokenizer, data_cfg, task)
        for ex in enc.examples:
            ids, labels = ex["input_ids"], ex["labels"]
            lengths.append(len(ids))
            if task == "seq2seq":
                targets.append(len(labels))
            elif task == "causal-lm":
                supervised += sum(1 for v in labels[1:] if v != IGNORE)
                positions += len(ids)
    n = len(lengths)
    share = supervised / positions if task == "causal-lm" and positions else 1.0
    mean = sum(lengths) / n
    described = f"{', '.join(files)}: {n:,} examples, {mean:.0f} tokens mean, {max(lengths)} max"
    if task == "causal-lm":
        described += f", {share:.0%} supervised"
    if targets:
        described += f", target {sum(targets) / n:.0f} mean"
    return Workload(
        n,
        mean,
        max(lengths),
        share,
        sum(targets) / n if targets else 0.0,
        max(targets) if targets else 0,
        described,
        {"files": files, "format": data_cfg.format, "max_length": data_cfg.max_length},
    )
