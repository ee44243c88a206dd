"""method.per_task: one adapter per task on a frozen base (issue 17 item 3). A mixed batch's rows equal each row run
alone with its task's adapter; gradients reach only the row's adapter; packed rows route each token; each saved
final/<task>/ reloads alone to identical logits, and a LoRA one through PEFT too; the config refuses what cannot be
per task."""

import copy
import json
from pathlib import Path

import peft
import pytest
import torch
from helpers import alpaca_rows, random_inputs, tiny_model, with_labels, write_jsonl

from sftlab.cli.main import main
from sftlab.config import PerfConfig, build_config, dump_config
from sftlab.data.batching import TASK_KEY, collate, collate_packed
from sftlab.errors import ConfigError
from sftlab.methods import MethodContext, get_method, multitask
from sftlab.models import build_tiny
from sftlab.recipe import prepare, task_evaluation, train
from sftlab.runs import load_run, save_final
from sftlab.train import patches
from sftlab.train.objective import Objective

TASKS = ["a", "b", "c"]
CASES = [("lora", "tiny-llama"), ("lora", "tiny-gpt2"), ("adapter", "tiny-llama"), ("adapter", "tiny-t5")]


def _per_task_model(method: str, name: str, task: str = "causal-lm", **cfg) -> torch.nn.Module:
    model = tiny_model(name, task)
    spec = get_method(method)
    torch.manual_seed(0)
    multitask.apply_method(model, spec, spec.config(per_task=True, **cfg), MethodContext(task=task), TASKS)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # as if trained: LoRA's B and the adapters' W_up start at zero
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def _task_of(name: str) -> str:
    return "seq2seq" if name == "tiny-t5" else "causal-lm"


@pytest.mark.parametrize("method,name", CASES)
def test_only_the_adapters_train_and_each_task_has_its_own(method, name):
    model = _per_task_model(method, name, _task_of(name))
    own = {t: {id(p) for p in multitask.task_parameters(model, t)} for t in TASKS}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert all(own.values()) and not (own["a"] & own["b"]) and not (own["b"] & own["c"])
    assert trainable == own["a"] | own["b"] | own["c"]  # the base is frozen


@pytest.mark.parametrize("method,name", CASES)
def test_a_mixed_batch_equals_each_row_alone_with_its_adapter(method, name):
    task = _task_of(name)
    model = _per_task_model(method, name, task).eval()
    x = random_inputs(task, batch=3, seq=8)
    ids = torch.tensor([2, 0, 1])
    with torch.no_grad(), multitask.rows(model, ids):
        mixed = model(**x).logits
    for i in range(3):
        with torch.no_grad(), multitask.routed(model, TASKS[int(ids[i])]):
            alone = model(**{k: v[i : i + 1] for k, v in x.items()}).logits
        torch.testing.assert_close(mixed[i : i + 1], alone, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # and the adapters do act: another routing gives other outputs
        with multitask.rows(model, torch.tensor([0, 1, 2])):
            other = model(**x).logits
        with multitask.routed(model, "a"):
            plain_a = model(**x).logits
    assert not torch.allclose(other[0], mixed[0]) and torch.allclose(other[0], plain_a[0], atol=1e-5)


@pytest.mark.parametrize("method,name", CASES)
def test_gradients_reach_only_each_rows_adapter(method, name):
    task = _task_of(name)
    model = _per_task_model(method, name, task).eval()  # eval: no dropout, gradients all the same
    x = with_labels(random_inputs(task, batch=3, seq=8), task)
    ids = torch.tensor([0, 1, 0])  # no row of task c
    obj = Objective(model, task)
    obj({**x, "task_ids": ids}).loss.backward()
    grads = {t: [p.grad for p in multitask.task_parameters(model, t)] for t in TASKS}
    assert all(g is None or not g.any() for g in grads["c"])
    for t, rows in (("a", [0, 2]), ("b", [1])):
        assert any(g is not None and g.any() for g in grads[t])
        model.zero_grad(set_to_none=True)
        sub = {k: v[rows] for k, v in x.items()}
        obj(
            {**sub, "task_ids": ids[rows]}
        ).loss.backward()  # the task's rows alone give its adapter's gradient
        for p, g in zip(multitask.task_parameters(model, t), grads[t]):
            torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-7)


def _examples(n: int = 6) -> list[dict]:
    g = torch.Generator().manual_seed(2)
    out = []
    for i in range(n):
        ids = torch.randint(4, 250, (5 + 2 * i,), generator=g).tolist()
        labels = [-100] * 3 + ids[3:]  # a prompt, then the supervised answer
        out.append({"input_ids": ids, "labels": labels, TASK_KEY: i % 3})
    return out


@pytest.mark.parametrize("method", ["lora", "adapter"])
def test_packed_rows_route_each_token_to_its_tasks_adapter(method):
    """A packed row holds examples of several tasks: per-token routing gives the padded batch's loss and gradients."""
    model = _per_task_model(method, "tiny-llama").eval()
    exs = _examples()
    perf = PerfConfig()
    results = []
    for batch in (collate(exs, 0, "causal-lm"), collate_packed(exs)):
        assert "task_ids" in batch
        model.zero_grad(set_to_none=True)
        with patches.applied(model, perf, malloc=False):
            out = Objective(model, "causal-lm", perf)(batch)
        out.loss.backward()
        grads = [p.grad.clone() for t in TASKS for p in multitask.task_parameters(model, t)]
        results.append((out.loss.detach(), out.count, grads))
    (padded, n1, g1), (packed, n2, g2) = results
    assert n1 == n2
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-5)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    one_task = {k: v for k, v in collate_packed(exs).items()}
    one_task["task_ids"] = torch.zeros_like(
        one_task["task_ids"]
    )  # every token through task a's: not the same
    with torch.no_grad():
        assert not torch.allclose(Objective(model, "causal-lm", perf)(one_task).loss, packed)


# ---- saving: final/<task>/ loads alone -----------------------------------------------------------------------------


def _text_raw(tmp: Path, method: str, **train) -> dict:
    tmp.mkdir(parents=True, exist_ok=True)
    tasks = [{"name": t, "train": str(write_jsonl(tmp / f"{t}.jsonl", alpaca_rows(8, seed=i))), "eval_fraction": 0.25}
             for i, t in enumerate(TASKS)]  # fmt: skip
    return {
        "model": {"name": "tiny-llama"},
        "method": {"name": method, "per_task": True},
        "data": {"max_length": 64, "tasks": tasks},
        "train": {"output_dir": str(tmp / "run"), "max_steps": 3, "batch_size": 4, "lr": 1e-2, "progress": False,
                  "threads": 1, **train},
    }  # fmt: skip


@pytest.mark.parametrize("method", ["lora", "adapter"])
def test_each_saved_task_reloads_alone_to_identical_logits(tmp_path, method):
    cfg = build_config(_text_raw(tmp_path, method))
    model, tok, _, eval_data = prepare(cfg, log=lambda *_: None)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    model.eval()
    run = Path(cfg.train.output_dir)
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(dump_config(cfg))
    final = save_final(model, tok, cfg, run, None)
    index = json.loads((final / "tasks.json").read_text())
    assert index["per_task"] is True and [t["path"] for t in index["tasks"]] == TASKS
    outs = {}
    for t, task in enumerate(TASKS):
        batch = collate(eval_data.parts[t].examples, tok.pad_token_id, "causal-lm")
        x = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        with torch.no_grad(), multitask.routed(model, task):
            outs[task] = want = model(**x).logits
        alone, _, _ = load_run(run, task=task)
        with torch.no_grad():
            torch.testing.assert_close(alone(**x).logits, want, rtol=1e-5, atol=1e-5)
        if method == "lora":  # PEFT's own loader on the plain base gives the same logits
            base = build_tiny("tiny-llama", "causal-lm")[0]
            loaded = peft.PeftModel.from_pretrained(base, final / task).eval()
            with torch.no_grad():
                torch.testing.assert_close(loaded(**x).logits, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(outs["a"][:1], outs["b"][:1])  # each task's own adapter
    # per-task evaluation generates each task's answers through that task's adapter
    route = task_evaluation(cfg, tok, model).route  # x: task c's batch, from the loop's last pass
    with torch.no_grad(), route(1, len(x["input_ids"])):
        via_route = model(**x).logits
    with torch.no_grad(), multitask.routed(model, "b"):
        torch.testing.assert_close(via_route, model(**x).logits)
    assert not torch.allclose(via_route, outs["c"])


def test_a_seq_cls_task_with_its_head_loads_through_peft(tmp_path):
    """Per-task LoRA + per-task heads: final/<task>/ is a PEFT SEQ_CLS adapter whose head is a module to save."""
    rows = {"s": [{"text": f"w {w}", "label": w} for w in ("x", "y") * 6],
            "t": [{"text": f"v {w}", "label": w} for w in ("p", "q", "r") * 4]}  # fmt: skip
    tasks = [{"name": n, "train": str(write_jsonl(tmp_path / f"{n}.jsonl", r)), "eval_fraction": 0.25}
             for n, r in rows.items()]  # fmt: skip
    raw = {"model": {"name": "tiny-bert", "task": "seq-cls"}, "method": {"name": "lora", "per_task": True},
           "data": {"format": "classification", "max_length": 32, "tasks": tasks},
           "train": {"output_dir": str(tmp_path / "run"), "progress": False, "threads": 1}}  # fmt: skip
    cfg = build_config(raw)
    model, tok, _, eval_data = prepare(cfg, log=lambda *_: None)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    model.eval()
    run = Path(cfg.train.output_dir)
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(dump_config(cfg))
    final = save_final(model, tok, cfg, run, None)
    for t, (task, n) in enumerate((("s", 2), ("t", 3))):
        saved = json.loads((final / task / "adapter_config.json").read_text())
        assert saved["task_type"] == "SEQ_CLS" and saved["modules_to_save"] == ["classifier"]
        batch = collate(eval_data.parts[t].examples, tok.pad_token_id, "seq-cls")
        x = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
        with torch.no_grad(), multitask.routed(model, task):
            want = model(**x).logits[:, :n]
        base = build_tiny("tiny-bert", "seq-cls", n)[0]
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), final / task).eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(**x).logits, want, rtol=1e-5, atol=1e-5)


def test_a_per_task_run_trains_with_packing_end_to_end(tmp_path, capsys):
    summary = train(build_config(_text_raw(tmp_path, "lora", eval_every=3)), log=lambda *_: None)
    assert summary["status"] == "completed" and summary["steps"] == 3
    run = tmp_path / "run"
    for t in TASKS:
        assert (run / "final" / t / "adapter_model.safetensors").exists()
    assert main(["generate", str(run), "Repeat: cat", "--task", "b", "--max-new-tokens", "2"]) == 0
    assert ">>> Repeat: cat" in capsys.readouterr().out
    assert main(["generate", str(run), "Repeat: cat"]) == 2  # which task's adapter?
    assert "trained one head or adapter per task (a, b, c)" in capsys.readouterr().err


# ---- what cannot be per task ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method,data,train,message",
    [
        ({"name": "full"}, True, {}, "method.per_task: full trains the shared weights"),
        (
            {"name": "freeze", "trainable_layers": 1},
            True,
            {},
            "method.per_task: freeze trains the shared weights",
        ),
        ({"name": "prompt"}, True, {}, "method.per_task: prompt cannot hold one adapter per task"),
        ({"name": "prefix"}, True, {}, "method.per_task: prefix cannot hold one adapter per task"),
        ({"name": "lora"}, False, {}, "method.per_task: true gives each of data.tasks its own adapter"),
        (
            {"name": "lora", "modules_to_save": ["lm_head"]},
            True,
            {},
            "method.modules_to_save: not with per_task",
        ),
        (
            {"name": "adapter"},
            True,
            {"gradient_checkpointing": True},
            "train.gradient_checkpointing: not with",
        ),
    ],
)
def test_config_refuses_what_cannot_be_per_task(tmp_path, method, data, train, message):
    raw = _text_raw(tmp_path, "lora")
    raw["method"] = {**method, "per_task": True}
    raw["train"].update(train)
    if not data:
        raw["data"] = {"train": raw["data"]["tasks"][0]["train"]}
    with pytest.raises(ConfigError, match=message):
        build_config(raw)
