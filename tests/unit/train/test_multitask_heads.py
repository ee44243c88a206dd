"""Per-task classification heads on a shared body (issue 17 item 2, MT-DNN style): each row's logits come from its
own task's head, a head gets no gradient from other tasks' rows, the loss and accuracy are exact per row; with every
method, each task saves as final/<task>/ and reloads alone to the same logits; `sftlab train` + `sftlab eval --task`
end to end."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from helpers import interrupt_after, random_inputs, tiny_model, write_jsonl
from safetensors.torch import load_file

from sftlab.cli.main import main
from sftlab.config import build_config, dump_config
from sftlab.data.batching import collate
from sftlab.errors import RunDirError
from sftlab.methods import multitask
from sftlab.methods.task_heads import TaskHeads
from sftlab.recipe import prepare, train
from sftlab.runs import load_run, save_final
from sftlab.train.loop import Trainer
from sftlab.train.objective import Objective

NAMES = ["sent", "topic"]
LABELS = [["neg", "pos"], ["sport", "tech", "world"]]
TASK_IDS = torch.tensor([0, 1, 1, 0])
Y = torch.tensor([1, 2, 0, 0])  # row 1 (topic) has label 2, beyond sent's two classes


def _heads_model(name: str) -> torch.nn.Module:
    model = tiny_model(name, "seq-cls")
    torch.manual_seed(0)
    multitask.add_heads(model, NAMES, LABELS)
    return model


def _inputs(model) -> dict:
    return random_inputs("seq-cls", batch=4, seq=8, pad_id=model.config.pad_token_id)


def _heads(model) -> TaskHeads:
    return next(m for m in model.modules() if isinstance(m, TaskHeads))


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-llama"])
def test_each_rows_logits_come_from_its_own_head(name):
    model = _heads_model(name)
    x = _inputs(model)
    with torch.no_grad(), multitask.rows(model, TASK_IDS):
        out = model(**x).logits  # (4, 3): the widest label set
    assert out.shape == (4, 3)
    for t, task in enumerate(NAMES):
        n = len(LABELS[t])
        with torch.no_grad(), multitask.single_task(model, task):  # the task's own head in the head's place
            ref = model(**x).logits  # (4, n)
        rows = (TASK_IDS == t).nonzero().flatten()
        torch.testing.assert_close(out[rows, :n], ref[rows], rtol=1e-5, atol=1e-6)
        assert (out[rows, n:] == torch.finfo(out.dtype).min).all()  # never chosen, probability 0
    # and a row does not depend on the other task's head
    with torch.no_grad():
        _heads(model).heads["topic"].weight.add_(1.0)
        with multitask.rows(model, TASK_IDS):
            after = model(**x).logits
    sent, topic = TASK_IDS == 0, TASK_IDS == 1
    assert torch.equal(after[sent], out[sent]) and not torch.allclose(after[topic], out[topic])


def test_no_route_is_an_error():
    model = _heads_model("tiny-bert")
    with pytest.raises(RuntimeError, match="no task routed"):
        model(**_inputs(model))


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-llama"])
def test_loss_and_accuracy_are_each_rows_own_head(name):
    model = _heads_model(name)
    x = _inputs(model)
    out = Objective(model, "seq-cls")({**x, "labels": Y, "task_ids": TASK_IDS})
    ref, correct = 0.0, 0
    for i in range(4):
        task = NAMES[int(TASK_IDS[i])]
        with torch.no_grad(), multitask.single_task(model, task):
            row = model(**{k: v[i : i + 1] for k, v in x.items()}).logits  # (1, n): its own head alone
        ref += F.cross_entropy(row, Y[i : i + 1], reduction="sum")
        correct += int(row.argmax(-1) == Y[i])
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-5)
    assert (out.count, out.correct) == (4, correct)


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-llama"])
def test_a_heads_gradient_comes_only_from_its_own_rows(name):
    model = _heads_model(name)
    x = {**_inputs(model), "labels": Y, "task_ids": TASK_IDS}
    heads = _heads(model)
    obj = Objective(model, "seq-cls")
    obj(x).loss.backward()  # the mixed batch
    mixed = {t: heads.heads[t].weight.grad.clone() for t in NAMES}
    for t, task in enumerate(NAMES):
        model.zero_grad(set_to_none=True)
        rows = (TASK_IDS == t).nonzero().flatten()
        obj({k: v[rows] for k, v in x.items()}).loss.backward()  # only this task's rows
        other = heads.heads[NAMES[1 - t]].weight.grad
        assert other is None or not other.any()  # no gradient from another task's rows
        torch.testing.assert_close(heads.heads[task].weight.grad, mixed[task], rtol=1e-5, atol=1e-7)
        assert mixed[task].abs().sum() > 0


# ---- with each method: trains, saves final/<task>/, each reloads alone ---------------------------------------------


def _task_files(tmp: Path) -> tuple[Path, Path]:
    tmp.mkdir(parents=True, exist_ok=True)
    sent = [
        {"text": f"this is {w} stuff", "label": lab}
        for lab, ws in (("pos", ["good", "great"]), ("neg", ["bad", "awful"]))
        for w in ws
        for _ in range(5)
    ]
    topic = [{"text": f"news about {w} today", "label": lab}
             for lab, ws in (("sport", ["ball"]), ("tech", ["chip"]), ("world", ["war"])) for w in ws for _ in range(6)]  # fmt: skip
    return write_jsonl(tmp / "sent.jsonl", sent), write_jsonl(tmp / "topic.jsonl", topic)


def _raw(tmp: Path, method: dict, model: str = "tiny-bert", **train) -> dict:
    a, b = _task_files(tmp / "data")
    return {
        "model": {"name": model, "task": "seq-cls"},
        "method": method,
        "data": {"format": "classification", "max_length": 64, "eval_fraction": 0.3,
                 "tasks": [{"name": "sent", "train": str(a)}, {"name": "topic", "train": str(b)}]},
        "train": {"output_dir": str(tmp / "run"), "max_steps": 4, "batch_size": 4, "lr": 1e-2, "progress": False,
                  "threads": 1, **train},
    }  # fmt: skip


METHODS = [
    ("tiny-bert", {"name": "full"}),
    ("tiny-bert", {"name": "freeze", "trainable_layers": 1}),
    ("tiny-bert", {"name": "lora"}),
    ("tiny-bert", {"name": "adapter"}),
    ("tiny-bert", {"name": "prompt", "num_virtual_tokens": 3}),
    ("tiny-bert", {"name": "prefix", "num_virtual_tokens": 3}),
    ("tiny-bert", {"name": "lora", "per_task": True}),
    ("tiny-llama", {"name": "adapter", "per_task": True}),
    ("tiny-llama", {"name": "ptuning", "num_virtual_tokens": 3}),
]


@pytest.mark.parametrize("model_name,method", METHODS, ids=[f"{m}-{d['name']}{'-per_task' * d.get('per_task', 0)}"
                                                            for m, d in METHODS])  # fmt: skip
def test_each_task_saves_alone_and_reloads_to_the_same_logits(tmp_path, model_name, method):
    cfg = build_config(_raw(tmp_path, method, model_name))
    model, tok, _, eval_data = prepare(cfg, log=lambda *_: None)
    heads = _heads(model)
    assert all(p.requires_grad for p in heads.parameters())  # the heads train with every method
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # as if trained: every trainable tensor moved
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    model.eval()
    run = Path(cfg.train.output_dir)
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(dump_config(cfg))
    final = save_final(model, tok, cfg, run, None)
    index = json.loads((final / "tasks.json").read_text())
    assert [(t["name"], t["label_names"], t["path"]) for t in index["tasks"]] == [
        ("sent", ["neg", "pos"], "sent"), ("topic", ["sport", "tech", "world"], "topic")]  # fmt: skip
    for t, task in enumerate(NAMES):
        batch = collate(eval_data.parts[t].examples, tok.pad_token_id, "seq-cls")
        x = {k: v for k, v in batch.items() if k not in ("labels", "task_ids")}
        with torch.no_grad(), multitask.routed(model, task):
            want = model(**x).logits[:, : len(LABELS[t])]
        alone, _, _ = load_run(run, task=task)
        assert multitask.tasks_of(alone) is None and alone.config.id2label == dict(enumerate(LABELS[t]))
        with torch.no_grad():
            got = alone(**x).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(RunDirError, match="one head or adapter per task"):
        load_run(run)


def test_freeze_without_train_head_keeps_the_heads_frozen(tmp_path):
    cfg = build_config(_raw(tmp_path, {"name": "freeze", "trainable_layers": 1, "train_head": False}))
    model, *_ = prepare(cfg, log=lambda *_: None)
    assert not any(p.requires_grad for p in _heads(model).parameters())


# ---- end to end ------------------------------------------------------------------------------------------------


def test_sftlab_train_and_eval_task_end_to_end(tmp_path, capsys):
    raw = _raw(tmp_path, {"name": "lora", "per_task": True}, max_steps=4, eval_every=4)
    path = tmp_path / "mt.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["train", str(path)]) == 0
    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    trained = {r["task"]: r for r in rows if r.get("task") and r.get("step") == 4}
    capsys.readouterr()
    for task in NAMES:
        assert main(["eval", str(run), "--task", task]) == 0
        res = json.loads(capsys.readouterr().out)
        assert res["task"] == task and res["examples"] == trained[task]["eval_examples"]
        # the reloaded final/<task>/ scores what training measured with the task's head and adapter
        assert res["eval_loss"] == pytest.approx(trained[task]["eval_loss"], rel=1e-4)
        assert res["eval_accuracy"] == pytest.approx(trained[task]["eval_accuracy"])
    assert main(["eval", str(run)]) == 0  # every task, a table first
    out = capsys.readouterr().out
    table, doc = out[: out.index("{")], json.loads(out[out.index("{") :])
    assert [line.split()[0] for line in table.splitlines()] == ["task", "sent", "topic"]
    assert [r["task"] for r in doc["tasks"]] == NAMES
    assert main(["eval", str(run), "--task", "nope"]) == 2
    assert "no task 'nope' in this run; its tasks: sent, topic" in capsys.readouterr().err


def test_resume_with_per_task_heads_and_adapters_is_bit_identical(tmp_path, monkeypatch):
    kw = {"max_steps": 6, "grad_accum": 2, "schedule": "cosine", "warmup_steps": 2}
    straight = build_config(_raw(tmp_path / "a", {"name": "lora", "per_task": True}, **kw))
    train(straight, log=lambda *_: None)
    cfg = straight.model_copy(deep=True)
    cfg.train.output_dir = str(tmp_path / "b")
    real_step = interrupt_after(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, log=lambda *_: None)
    monkeypatch.setattr(Trainer, "_optimizer_step", real_step)
    assert train(cfg, resume=True, log=lambda *_: None)["steps"] == 6
    for task in NAMES:
        ref = load_file(str(tmp_path / "a" / "run" / "final" / task / "adapter_model.safetensors"))
        got = load_file(str(tmp_path / "b" / "final" / task / "adapter_model.safetensors"))
        assert ref.keys() == got.keys() and any(k.endswith("classifier.weight") for k in ref)
        for k in ref:
            assert torch.equal(ref[k], got[k]), k
