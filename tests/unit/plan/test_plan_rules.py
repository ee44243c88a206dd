"""The recommendation rules, case by case: situation -> method, and every recommendation gives its reasons, each
tied to one of the survey's four factors."""

from __future__ import annotations

import pytest

from sftlab.plan.rules import APPLICATION, COMPUTE, DATA, FACTORS, MAINTAINABILITY, Situation, decide

KEYS = (
    "full",
    "freeze",
    "lora-r8",
    "lora-r16",
    "lora-r64",
    "dora-r16",
    "houlsby",
    "pfeiffer",
    "prefix",
    "prompt",
    "qlora-r16",
)
STORAGE = {k: (14e9 if k in ("full", "freeze") else 40e6) for k in KEYS}


def situation(
    fits=KEYS, ckpt=(), tokens=1e6, params=7e9, text=False, tasks=1, needs=(), within=None, fmt=None
):
    return Situation(
        fits={k: k in fits for k in KEYS},
        fits_ckpt={k: k in fits or k in ckpt for k in KEYS},
        within_time={k: k in within for k in KEYS} if within is not None else {},
        storage=STORAGE,
        params=int(params),
        tokens=tokens,
        close_to_pretraining=text,
        tasks=tasks,
        needs=frozenset(needs),
        data_format=fmt or ("text" if text else "alpaca"),
    )


PEFT = set(KEYS) - {"full", "freeze"}
CASES = [
    # (situation, expected choice or set of choices, a factor the reasons must name)
    ("many tasks + frequent updates -> per-task PEFT", situation(tasks=5, needs=["frequent-updates"]),
     {"lora-r16"}, MAINTAINABILITY),
    ("many tasks even with large text data and ample memory", situation(tokens=1e11, text=True, tasks=3),
     {"lora-r16"}, MAINTAINABILITY),
    ("small storage -> a small module", situation(needs=["small-storage"]), PEFT, MAINTAINABILITY),
    ("ample memory + large data close to pretraining -> full", situation(tokens=1e10, params=1e9, text=True),
     {"full"}, DATA),
    ("large text data but full does not fit -> LoRA", situation(fits=PEFT, tokens=1e10, params=1e9, text=True),
     {"lora-r16"}, COMPUTE),
    ("full fits only with checkpointing -> full, and the advice says so",
     situation(fits=PEFT, ckpt=("full",), tokens=1e10, params=1e9, text=True), {"full"}, DATA),
    ("tight memory -> LoRA", situation(fits=PEFT), {"lora-r16"}, COMPUTE),
    ("tighter memory: only r=8 fits", situation(fits={"lora-r8", "prompt"}), {"lora-r8"}, COMPUTE),
    ("only the NF4 base fits -> quantised LoRA", situation(fits={"qlora-r16"}), {"qlora-r16"}, COMPUTE),
    ("nothing fits -> no choice, and it says why", situation(fits=()), {None}, COMPUTE),
    ("large instruction data -> high-rank LoRA", situation(tokens=1e10, params=1e9), {"lora-r64"}, DATA),
    ("low latency -> mergeable LoRA", situation(needs=["low-latency"]), {"lora-r16"}, APPLICATION),
    ("10B+ model, small data -> prompt tuning", situation(params=70e9), {"prompt"}, DATA),
    ("small data on a small model -> PEFT", situation(params=1e8, tokens=1e6), {"lora-r16"}, DATA),
    ("low latency with large instruction data: still a mergeable LoRA, and it says why",
     situation(tokens=1e10, params=1e9, needs=["low-latency"]), {"lora-r64"}, APPLICATION),
    ("low latency with many tasks: per-task LoRA, merge cost named", situation(tasks=3, needs=["low-latency"]),
     {"lora-r16"}, APPLICATION),
    ("time budget: only the faster methods count",
     situation(tokens=1e10, params=1e9, text=True, within={"lora-r16", "lora-r8"}), {"lora-r16"}, COMPUTE),
]  # fmt: skip


@pytest.mark.parametrize("what,sit,expected,factor", CASES, ids=[c[0] for c in CASES])
def test_rule_table(what, sit, expected, factor):
    rec = decide(sit)
    assert rec.choice in expected, (what, rec.choice, rec.rule)
    assert rec.reasons, "every recommendation prints its reasons"
    assert all(r.factor in FACTORS and r.text for r in rec.reasons + rec.advice)
    assert factor in {r.factor for r in rec.reasons}, [r.factor for r in rec.reasons]


def test_natural_language_control_asks_for_instruction_data():
    rec = decide(situation(needs=["instructions"], text=True, fmt="text"))
    advice = [r for r in rec.advice if r.factor == APPLICATION]
    assert any("instruction" in r.text and "alpaca or messages" in r.text for r in advice)
    kept = decide(situation(needs=["instructions"], fmt="messages"))
    assert any("keep the instruction format (messages)" in r.text for r in kept.advice)


def test_many_tasks_advise_a_mixture_and_checkpointing_is_advised_only_when_needed():
    rec = decide(situation(tasks=4))
    assert any("data.tasks" in r.text for r in rec.advice)
    full_ckpt = decide(situation(fits=PEFT, ckpt=("full",), tokens=1e10, params=1e9, text=True))
    assert any("gradient_checkpointing" in r.text for r in full_ckpt.advice)
    assert not any("gradient_checkpointing" in r.text for r in decide(situation()).advice)


def test_full_that_fits_only_sharded_is_chosen_for_large_text_with_the_fsdp_advice():
    """8 devices: full fine-tuning fits only with FSDP -> still full for large data close to pretraining, and the
    advice says how to run it; on one device (no sharding) the same situation falls back to LoRA."""
    base = situation(fits=PEFT, tokens=1e10, params=1e9, text=True)
    sharded = Situation(**{**base.__dict__, "fits_sharded": {k: True for k in KEYS}, "devices": 8})
    rec = decide(sharded)
    assert rec.choice == "full"
    assert any(r.factor == COMPUTE and "FSDP over the 8 devices" in r.text for r in rec.advice)
    assert any("sharded over 8 devices" in r.text for r in rec.reasons)
    assert decide(base).choice == "lora-r16"
