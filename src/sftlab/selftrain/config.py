"""The `self_train:` section of a self-training config, and reading such a config (a run config plus that section).

    model: {name: tiny-bert, task: seq-cls}
    data: {train: labelled.tsv, eval: dev.tsv, format: classification, columns: {text: sentence}}
    train: {output_dir: runs/selftrain, max_steps: 200}
    self_train:
      unlabelled: pool.tsv        # read for its text (prompt) columns only; labels there are never read
      rounds: 2
      threshold: 0.9
      top_k_per_class: 500
      pseudo_weight: 0.5

The run config is the teacher's (trained on data.train when `teacher` is unset) and every student's: only their
data.train (labelled + pseudo-labelled rows) and output directories differ. `train.output_dir` is the self-training
directory the runs go under.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator

from ..config import (
    RunConfig,
    _config_relative_paths,
    _error_lines,
    build_config,
    deep_merge,
    load_yaml,
    parse_overrides,
    require_remote_code_flag,
)
from ..errors import ConfigError
from ..strict import StrictModel

SECTION = "self_train"


class SelfTrainConfig(StrictModel):
    unlabelled: str = Field(
        ...,
        description="The unlabelled pool: a file or directory in data.format's layout, or an hf:ORG/NAME[:split] "
        "dataset (read in data.subset, like data.train); data.columns renames apply to its text/prompt fields. "
        "Only those fields are read: label, output, target or answer fields are dropped as each record is read, so "
        "a pool that happens to hold labels is treated exactly like one that does not.",
    )
    skip: int = Field(
        0,
        ge=0,
        description="Leave out the pool's first N records: the labelled ones, when data.train is the first rows "
        "(data.limit) of the same file.",
    )
    limit: int | None = Field(None, gt=0, description="Use at most N records of the pool (after `skip`).")
    teacher: str | None = Field(
        None,
        description="A trained run directory to start from (its final/ model labels round 1). null: a teacher is "
        "trained here on data.train alone (00-teacher/).",
    )
    rounds: int = Field(
        1, gt=0, description="Teacher -> student rounds; each round's student labels the next round's pool."
    )
    threshold: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Keep a pseudo-label only when its confidence is at least this: seq-cls, the teacher's softmax "
        "probability of its predicted class; generation, exp(mean log-probability) of the generated tokens "
        "(their geometric-mean probability).",
    )
    top_k_per_class: int | None = Field(
        None,
        gt=0,
        description="Class-balanced selection: of the pseudo-labels above the threshold, keep the most confident "
        "ones per class, at most k per class, in the class ratio of `balance`, so a teacher that favours the "
        "majority class does not tilt the student further. Generation: the k most confident overall. null: keep "
        "every pseudo-label above the threshold.",
    )
    balance: Literal["labelled", "equal"] = Field(
        "labelled",
        description="With top_k_per_class, the class ratio of the kept set: labelled (that of data.train's labels; "
        "the largest class keeps up to k) or equal (the same count for each class). The scarcest class, relative "
        "to its share, sets how many each class keeps; a class with no pseudo-label above the threshold keeps none "
        "and is left out (a warning names it; round.json `no_confident`), so it does not zero the others.",
    )
    pseudo_weight: float = Field(
        1.0,
        gt=0,
        description="Loss weight of each pseudo-labelled example in the student's training (labelled ones weigh 1).",
    )
    student_train: dict[str, Any] = Field(
        default_factory=dict,
        description="train: keys the students use in place of the config's, e.g. {max_steps: 300}: a student sees "
        "the labelled rows and the pseudo-labelled ones, often many times more than its teacher did.",
    )
    max_new_tokens: int = Field(
        64, gt=0, description="Generation tasks: the longest answer the teacher writes for a prompt."
    )
    agreement_samples: int = Field(
        0,
        ge=0,
        description="Generation tasks: also sample this many answers per prompt (at agreement_temperature, seeded "
        "by train.seed, the round and the batch) and keep a pseudo-label only when the share of samples equal to "
        "the greedy answer after normalisation (lower case, punctuation, articles and extra spaces dropped) is at "
        "least min_agreement; the share is recorded per row (pseudo.jsonl `agreement`). Costs k more generations "
        "per prompt. 0: off.",
    )
    agreement_temperature: float = Field(
        1.0, gt=0, description="Sampling temperature of the agreement samples."
    )
    min_agreement: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="With agreement_samples: the least share of samples that must agree with the greedy answer.",
    )
    batch_size: int = Field(32, gt=0, description="Prompts per teacher forward/generation batch.")

    @field_validator("unlabelled", "teacher")
    @classmethod
    def _paths(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("must be a path, not empty")
        return os.path.expanduser(v) if v is not None else v


def parse_self_train(raw: Any, source: str) -> SelfTrainConfig:
    """The section, validated; errors name `self_train.<key>` like the run config's do."""
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{source}: {SECTION}: expected a mapping with at least `unlabelled:` (got {raw!r:.60})"
        )
    try:
        return SelfTrainConfig.model_validate(raw)
    except ValidationError as e:
        lines = _error_lines(e, prefix=SECTION, model=SelfTrainConfig)
        raise ConfigError(f"{source}: invalid config:\n  " + "\n  ".join(lines)) from None


def split_config(raw: dict, source: str, trust_remote_code: bool) -> tuple[RunConfig, SelfTrainConfig]:
    """(run config, self_train section) of a mapping holding both."""
    if SECTION not in raw:
        raise ConfigError(
            f"{source}: {SECTION}: required section is missing (the unlabelled pool, rounds, selection); see README "
            "'Unlabelled data'"
        )
    rest = {k: v for k, v in raw.items() if k != SECTION}
    st = parse_self_train(raw[SECTION], source)
    cfg = require_remote_code_flag(build_config(rest, source), trust_remote_code, source)
    if st.agreement_samples and cfg.model.task == "seq-cls":
        raise ConfigError(
            f"{source}: {SECTION}.agreement_samples: {st.agreement_samples}: agreement of sampled answers is for "
            "generation tasks; a seq-cls teacher's confidence is its softmax probability (use threshold). Drop the key"
        )
    return cfg, st


def load_self_train(
    path: str | Path, overrides: list[str] | None = None, trust_remote_code: bool = False
) -> tuple[RunConfig, SelfTrainConfig]:
    """A self-training config file with dotted overrides (self_train.rounds=3 too), validated."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    raw = load_yaml(p.read_text(), str(p)) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: top level must be a mapping with model/method/data/train and self_train")
    raw = deep_merge(raw, parse_overrides(overrides or []))
    _config_relative_paths(raw, p)
    return split_config(raw, str(p), trust_remote_code)
