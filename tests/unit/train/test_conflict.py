"""Task gradient conflict (train/conflict.py): the cosine matrix against a hand computation on separately computed
per-task gradients, training bit-identical with the diagnostic on, task_conflict.png; PCGrad's projection."""

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import alpaca_rows, interrupt_after, tiny_model, write_jsonl
from safetensors.torch import load_file

from sftlab.config import build_config
from sftlab.data.batching import collate, collate_packed
from sftlab.data.mixture import Mixture
from sftlab.data.tasks import TASK_KEY, task_ids
from sftlab.errors import ConfigError
from sftlab.models import build_tiny
from sftlab.recipe import train
from sftlab.train.conflict import (
    conflict_row,
    cosine_matrix,
    pcgrad,
    pcgrad_note,
    probe_indices,
    task_gradients,
)
from sftlab.train.objective import Objective, count_supervised

QUIET = {"progress": False, "threads": 1}


def _rows_b(n: int, seed: int) -> list[dict]:
    """Task b: the same prompts as task a ('Repeat: w'), answered differently: the tasks pull against each other."""
    return [{**r, "output": "no"} for r in alpaca_rows(n, seed)]


def _examples(tok, n: int = 3) -> list[dict]:
    exs = []
    for k, rows in enumerate((alpaca_rows(n, seed=1), _rows_b(n, seed=2))):
        for r in rows:
            text = f"{r['instruction']} -> {r['output']}"
            ids = tok(text, add_special_tokens=False)["input_ids"]
            cut = len(tok(r["instruction"] + " -> ", add_special_tokens=False)["input_ids"])
            exs.append({"input_ids": ids, "labels": [-100] * cut + ids[cut:], TASK_KEY: k})
    return [exs[i] for i in (0, 3, 1, 4, 2, 5)]  # tasks interleaved within the batch


def _flat_grad(model, objective, batch, n_total) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    (objective(batch).loss / n_total).backward()
    return torch.cat([p.grad.flatten().double() for p in model.parameters()])


@pytest.mark.parametrize("packed", [False, True])
def test_cosine_matrix_equals_the_hand_computation(packed):
    model = tiny_model("tiny-llama", "causal-lm").train()
    _, tok = build_tiny("tiny-llama")
    exs = _examples(tok)
    pack = collate_packed if packed else (lambda e: collate(e, tok.pad_token_id, "causal-lm"))
    probes = [
        [{**pack(p), "task_ids": task_ids(p, packed)}]
        for p in ([e for e in exs if e[TASK_KEY] == k] for k in (0, 1))
    ]
    objective = Objective(model, "causal-lm")
    params = list(model.parameters())
    row = conflict_row(objective, probes, params, ["a", "b"])
    assert all(p.grad is None for p in params)  # .grad untouched

    # by hand: each task's probe alone, its mean token loss, flattened gradients
    flats = [_flat_grad(model, objective, b[0], count_supervised(b[0], "causal-lm")) for b in probes]
    cos = float(flats[0] @ flats[1] / (flats[0].norm() * flats[1].norm()))
    assert row["tasks"] == ["a", "b"]
    m = row["task_grad_cosine"]
    assert m[0][0] == m[1][1] == 1.0 and m[0][1] == m[1][0]
    assert m[0][1] == pytest.approx(cos, abs=1e-5)
    assert row["task_grad_norm"] == pytest.approx([float(f.norm()) for f in flats], rel=1e-5)
    assert cos < 0  # the data makes these tasks conflict (the PCGrad test below relies on it)


@pytest.mark.parametrize("packed", [False, True])
def test_task_parts_of_a_mixed_step_add_up_to_its_gradient(packed):
    """PCGrad's split of a step: each task's rows (tokens) of the step's batch, over all the step's targets."""
    model = tiny_model("tiny-llama", "causal-lm").train()
    _, tok = build_tiny("tiny-llama")
    exs = _examples(tok)
    pack = collate_packed if packed else (lambda e: collate(e, tok.pad_token_id, "causal-lm"))
    batch = {**pack(exs), "task_ids": task_ids(exs, packed)}
    objective = Objective(model, "causal-lm")
    params = list(model.parameters())
    grads, loss_sum = task_gradients(objective, [batch], params)
    assert list(grads) == [0, 1] and all(p.grad is None for p in params)
    n_total = count_supervised(batch, "causal-lm")
    alone = [
        _flat_grad(model, objective, pack([e for e in exs if e[TASK_KEY] == k]), n_total) for k in (0, 1)
    ]
    parts = [torch.cat([g.flatten().double() for g in grads[k]]) for k in (0, 1)]
    for got, want in zip(parts, alone):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    total = _flat_grad(model, objective, batch, n_total)
    torch.testing.assert_close(parts[0] + parts[1], total, rtol=1e-4, atol=1e-7)
    assert loss_sum == pytest.approx(float(objective(batch).loss.detach()), rel=1e-5)


def test_a_zero_gradient_has_no_cosine():
    cos, norms = cosine_matrix([[torch.tensor([1.0, 2.0, 2.0])], [torch.zeros(3)], [None]])
    assert cos == [[1.0, None, None], [None, None, None], [None, None, None]] and norms == [3.0, 0.0, 0.0]


def test_probes_are_drawn_from_their_task_without_touching_any_rng():
    m = Mixture(("a", "b", "c"), (5, 40, 12), (0.2, 0.5, 0.3), (1.0, 1.0, 1.0))
    states = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    got = probe_indices(m, 1, 8, seed=3, step=7)
    assert (torch.equal(states[0], torch.get_rng_state()) and (states[1] == np.random.get_state()[1]).all()
            and states[2] == random.getstate())  # fmt: skip
    assert got == probe_indices(m, 1, 8, seed=3, step=7) != probe_indices(m, 1, 8, seed=3, step=8)
    assert len(set(got)) == 8 and all(5 <= i < 45 for i in got)  # task b owns indices 5..44
    assert probe_indices(m, 0, 8, seed=3, step=7) == [
        0,
        1,
        2,
        3,
        4,
    ]  # a task smaller than the probe: all of it


def _raw(tmp: Path, model: str = "tiny-llama", max_length: int = 128, **train_kw) -> dict:
    tmp.mkdir(parents=True, exist_ok=True)
    tasks = [
        {"name": "a", "train": str(write_jsonl(tmp / "a.jsonl", alpaca_rows(12, seed=1)))},
        {"name": "b", "train": str(write_jsonl(tmp / "b.jsonl", _rows_b(12, seed=2)))},
    ]
    return {
        "model": {"name": model},
        "data": {"max_length": max_length, "tasks": tasks, "mixing": "equal"},
        "train": {"output_dir": str(tmp / "run"), "max_steps": 4, "batch_size": 4, "grad_accum": 2, "lr": 1e-3,
                  **QUIET, **train_kw},
    }  # fmt: skip


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "model.safetensors"))


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gpt2"])  # gpt2: dropout 0.1, so the RNG matters
def test_the_diagnostic_leaves_training_bit_identical(tmp_path, model):
    train(build_config(_raw(tmp_path / "off", model)), log=lambda *_: None)
    train(build_config(_raw(tmp_path / "on", model, task_grad_cosine_every=1)), log=lambda *_: None)
    off, on = _weights(tmp_path / "off" / "run"), _weights(tmp_path / "on" / "run")
    assert off.keys() == on.keys() and all(torch.equal(off[k], on[k]) for k in off)
    rows = [json.loads(line) for line in (tmp_path / "on" / "run" / "metrics.jsonl").read_text().splitlines()]
    conflict = [r for r in rows if "task_grad_cosine" in r]
    assert [r["step"] for r in conflict] == [1, 2, 3, 4]
    for r in conflict:
        m = r["task_grad_cosine"]
        assert r["tasks"] == ["a", "b"] and len(m) == len(r["task_grad_norm"]) == 2
        assert m[0][0] == m[1][1] == 1.0 and m[0][1] == m[1][0] and -1 <= m[0][1] <= 1
    assert (tmp_path / "on" / "run" / "task_conflict.png").stat().st_size > 0
    assert not (tmp_path / "off" / "run" / "task_conflict.png").exists()


def test_every_n_steps(tmp_path):
    train(build_config(_raw(tmp_path, task_grad_cosine_every=2, max_steps=5)), log=lambda *_: None)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "task_grad_cosine" in r] == [2, 4]


@pytest.mark.parametrize("key,value", [("task_grad_cosine_every", 5), ("task_balancing", "pcgrad")])
def test_task_keys_need_data_tasks(tmp_path, key, value):
    from helpers import make_config

    with pytest.raises(ConfigError, match=rf"train\.{key}: .* a run on one data\.train has no tasks"):
        make_config(tmp_path, train={key: value})


# ---- PCGrad -------------------------------------------------------------------------------------------------------


def _g(*vals):
    return [torch.tensor(vals, dtype=torch.float64)]


def test_pcgrad_without_conflict_is_the_plain_sum():
    grads = [_g(1.0, 2.0, 0.0), _g(0.5, 0.0, 1.0), _g(0.0, 1.0, 3.0)]  # every pairwise dot >= 0
    (out,) = pcgrad(grads, (0, 7))
    assert torch.equal(out, grads[0][0] + grads[1][0] + grads[2][0])
    assert torch.equal(grads[0][0], torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64))  # inputs untouched


def test_pcgrad_removes_the_conflicting_component():
    g1, g2 = _g(1.0, 0.0), _g(-1.0, 1.0)  # g1.g2 = -1
    # g1' = g1 - (-1)/|g2|^2 g2 = (0.5, 0.5); g2' = g2 - (-1)/|g1|^2 g1 = (0, 1); the step follows their sum
    (out,) = pcgrad([g1, g2], (0, 0))
    torch.testing.assert_close(out, torch.tensor([0.5, 1.5], dtype=torch.float64))
    assert float(torch.tensor([0.5, 0.5], dtype=torch.float64) @ g2[0]) == 0.0
    # over two parameters, one of which only task 2 reaches (None for task 1): task1.task2 = -1, |task2|^2 = 6:
    # task1' = (g1 + g2/6, 2/6) = ((5/6, 1/6), 1/3); task2' = task2 + task1 = ((0, 1), 2); sum ((5/6, 7/6), 7/3)
    out = pcgrad([[g1[0], None], [g2[0], torch.tensor([2.0], dtype=torch.float64)]], (0, 0))
    torch.testing.assert_close(out[0], torch.tensor([5 / 6, 7 / 6], dtype=torch.float64))
    torch.testing.assert_close(out[1], torch.tensor([7 / 3], dtype=torch.float64))


def test_pcgrad_order_is_seeded():
    grads = [_g(1.0, 0.0, 0.0), _g(-0.8, 1.0, 0.0), _g(-0.5, -0.6, 1.0)]
    runs = {tuple(pcgrad(grads, (0, s))[0].tolist()) for s in range(12)}
    assert len(runs) > 1  # with three conflicting tasks the projection order matters...
    assert (
        pcgrad(grads, (0, 3))[0].tolist() == pcgrad(grads, (0, 3))[0].tolist()
    )  # ...and is fixed by (seed, step)


def test_pcgrad_step_is_the_hand_projected_sum(tmp_path):
    """A training step with task_balancing: pcgrad sets .grad to g_a' + g_b' computed by hand from each task's
    separately computed gradient (two tasks: the projection order does not matter)."""
    from sftlab.train.loop import Trainer

    cfg = build_config(_raw(tmp_path, task_balancing="pcgrad"))
    model = tiny_model("tiny-llama", "causal-lm").train()
    _, tok = build_tiny("tiny-llama")
    exs = sorted(_examples(tok), key=lambda e: e[TASK_KEY])
    m = Mixture(("a", "b"), (3, 3), (0.5, 0.5), (1.0, 1.0))
    t = Trainer(model=model, cfg=cfg.train, task="causal-lm", train_examples=exs, pad_id=tok.pad_token_id,
                run_dir=tmp_path / "t", mixture=m)  # fmt: skip
    batch = t.stream.collate(exs)
    t.train_step([batch])
    got = torch.cat([p.grad.flatten().double() for p in model.parameters()])

    n_total = count_supervised(batch, "causal-lm")
    pack = t.stream.collate
    ga, gb = (
        _flat_grad(model, t.objective, pack([e for e in exs if e[TASK_KEY] == k]), n_total) for k in (0, 1)
    )
    d = float(ga @ gb)
    assert d < 0  # these tasks conflict, so the projection is exercised
    want = (ga - d / float(gb @ gb) * gb) + (gb - d / float(ga @ ga) * ga)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    assert float(got @ ga) >= 0 and float(got @ gb) >= 0  # two tasks: the step no longer works against either


def test_pcgrad_trains_and_resumes_bit_identically(tmp_path, monkeypatch):
    from sftlab.train.loop import Trainer

    # cut to 64 tokens, the answers lose the chat terminator both tasks share: their gradients conflict on some steps
    kw = {"max_length": 64, "max_steps": 6}
    cfg = build_config(_raw(tmp_path / "a", task_balancing="pcgrad", task_grad_cosine_every=1, **kw))
    train(cfg, log=lambda *_: None)
    train(build_config(_raw(tmp_path / "p", **kw)), log=lambda *_: None)
    ref, base = _weights(tmp_path / "a" / "run"), _weights(tmp_path / "p" / "run")
    rows = [json.loads(line) for line in (tmp_path / "a" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(r["task_grad_cosine"][0][-1] < 0 for r in rows if "task_grad_cosine" in r)
    assert any(not torch.equal(ref[k], base[k]) for k in ref)  # it changed the updates

    again = build_config(_raw(tmp_path / "b", task_balancing="pcgrad", task_grad_cosine_every=1, **kw))
    real = interrupt_after(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        train(again, log=lambda *_: None)
    monkeypatch.setattr(Trainer, "_optimizer_step", real)
    train(again, resume=True, log=lambda *_: None)
    got = _weights(tmp_path / "b" / "run")
    assert all(torch.equal(ref[k], got[k]) for k in ref)


def test_pcgrad_warns_when_few_steps_mix_tasks(tmp_path):
    from sftlab.config import PerfConfig, TrainConfig
    from sftlab.train.mixture_stream import MixtureStream

    exs = [{"input_ids": [1] * (4 if i < 40 else 60), "labels": [1] * (4 if i < 40 else 60), TASK_KEY: int(i >= 40)}
           for i in range(80)]  # fmt: skip
    m = Mixture(("short", "long"), (40, 40), (0.5, 0.5), (1.0, 1.0))

    def note(group: bool) -> str | None:
        cfg = TrainConfig(batch_size=8, group_by_length=group, progress=False)
        return pcgrad_note(MixtureStream(exs, "causal-lm", 0, cfg, PerfConfig(), False, mixture=m), 1)

    assert "set train.group_by_length: false" in note(True)  # grouped by length: one task per batch
    assert note(False) is None


def test_task_gradients_skip_tasks_without_targets():
    model = tiny_model("tiny-llama", "causal-lm").train()
    _, tok = build_tiny("tiny-llama")
    exs = _examples(tok)
    for e in exs:
        if e[TASK_KEY] == 0:
            e["labels"] = [-100] * len(e["labels"])
    batch = {**collate(exs, tok.pad_token_id, "causal-lm"), "task_ids": task_ids(exs, False)}
    grads, _ = task_gradients(Objective(model, "causal-lm"), [batch], list(model.parameters()))
    assert list(grads) == [1]


def test_cosines_cover_only_the_parameters_every_task_reaches():
    """A task's own head (or adapter) cannot conflict with another task: counting it would shrink every cosine to 0."""
    from sftlab.train.conflict import cosine_matrix, shared_only

    torch.manual_seed(0)
    body_a, body_b = torch.randn(5), torch.randn(5)
    head_a, head_b = 10 * torch.randn(3), 10 * torch.randn(3)
    grads = [[body_a, head_a, None], [body_b, None, head_b]]
    cos, _ = cosine_matrix(shared_only(grads))
    want = float(torch.dot(body_a, body_b) / (body_a.norm() * body_b.norm()))
    assert cos[0][1] == pytest.approx(want, rel=1e-6) and cos[1][0] == cos[0][1]
    none_shared, _ = cosine_matrix(shared_only([[head_a, None], [None, head_b]]))
    assert none_shared == [[None, None], [None, None]]
