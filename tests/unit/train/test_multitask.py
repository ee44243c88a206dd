"""Multi-task runs (data.tasks): the config, per-task loading, the loss weights, the mixture stream, exact resume,
and `sftlab train` end to end."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from helpers import alpaca_rows, classification_rows, interrupt_after, messages_rows, tiny_model, write_jsonl
from safetensors.torch import load_file

from sftlab.cli.main import main
from sftlab.config import PerfConfig, TrainConfig, build_config, dump_config, load_config
from sftlab.data import IGNORE, supervised_segments
from sftlab.data.batching import collate, collate_packed
from sftlab.data.mixture import Mixture, mixture_rates
from sftlab.data.tasks import TASK_KEY, load_tasks, task_ids
from sftlab.errors import ConfigError, DataError
from sftlab.models import build_tiny
from sftlab.recipe import train
from sftlab.train.checkpoint import list_checkpoints
from sftlab.train.loop import Trainer
from sftlab.train.mixture_stream import MixtureStream
from sftlab.train.objective import Objective

QUIET = {"progress": False, "threads": 1}


def _files(tmp: Path) -> dict[str, Path]:
    tmp.mkdir(parents=True, exist_ok=True)
    sst = [
        {"sentence": r["text"], "label": int(r["label"] == "pos")} for r in classification_rows(14, seed=2)
    ]
    return {
        "a": write_jsonl(tmp / "a.jsonl", alpaca_rows(16)),
        "b": write_jsonl(tmp / "b.jsonl", messages_rows(8, seed=1)),
        "c": write_jsonl(tmp / "c.jsonl", sst),
    }


def _raw(tmp: Path, model: str = "tiny-llama", task: str = "causal-lm", data=None, **train_kw) -> dict:
    f = _files(tmp / "data")
    tasks = [
        {"name": "a", "train": str(f["a"]), "loss_weight": 2.0},
        {"name": "b", "train": str(f["b"]), "format": "messages"},
        {"name": "c", "train": str(f["c"]), "format": "classification", "columns": {"text": "sentence"},
         "label_names": ["negative", "positive"], "system_prompt": "Sentiment of the review?"},
    ]  # fmt: skip
    return {
        "model": {"name": model, "task": task},
        "data": {"max_length": 256, "tasks": tasks, "mixing": {"strategy": "temperature", "temperature": 2.0},
                 **(data or {})},
        "train": {"output_dir": str(tmp / "run"), "max_steps": 4, "batch_size": 4, "lr": 1e-3, **QUIET, **train_kw},
    }  # fmt: skip


# ---- config -------------------------------------------------------------------------------------------------


def test_config_tasks_inherit_data_keys_and_round_trip(tmp_path):
    raw = _raw(tmp_path, data={"max_length": 200, "template": "chatml"})
    raw["data"]["tasks"][1]["max_length"] = 64
    cfg = build_config(raw)
    a, b, c = cfg.data.tasks
    assert (a.max_length, b.max_length, c.max_length) == (200, 64, 200)  # unset: data's; set: the task's own
    assert a.template == b.template == "chatml" and a.format == "alpaca"  # data.format's default
    text = dump_config(cfg)
    saved = yaml.safe_load(text)["data"]
    assert "train" not in saved and "eval" not in saved and saved["tasks"][0]["max_length"] == 200
    again = build_config(yaml.safe_load(text))
    assert dump_config(again) == text
    # and a one-task config saves exactly the keys it always did
    one = build_config({"model": {"name": "tiny-llama"}, "data": {"train": "x.jsonl"}})
    assert list(yaml.safe_load(dump_config(one))["data"]) == [
        "train", "eval", "eval_fraction", "format", "max_length", "template", "system_prompt", "columns",
        "label_names", "train_on_prompt", "limit", "documents",
    ]  # fmt: skip


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda d: d.update(train="x.jsonl"), "data.train: not with data.tasks"),
        (lambda d: d.update(eval="x.jsonl"), "data.eval: not with data.tasks"),
        (lambda d: d.update(tasks=[]), "data.tasks: expected at least one task"),
        (lambda d: d["tasks"][2].update(name="a"), "data.tasks[2].name: 'a' is taken by data.tasks[0]"),
        (
            lambda d: d["tasks"][1].update(formt="messages"),
            "data.tasks[1].formt: unknown key (did you mean 'format'?)",
        ),
        (lambda d: d["tasks"][0].update(weight=3), "data.tasks[0].weight: only used by data.mixing: weights"),
        (
            lambda d: d.update(mixing="temperature"),
            "data.mixing.temperature: required by strategy temperature",
        ),
        (lambda d: d.update(mixing={"strategy": "equal", "cap": 9}), "data.mixing.cap: only used by"),
        (
            lambda d: d.update(mixing={"strategy": "proportional", "temperature": 2}),
            "data.mixing.temperature: only",
        ),
        (lambda d: d.pop("tasks"), "data.train: required key is missing"),
    ],
)
def test_config_errors_name_the_key(tmp_path, edit, message):
    raw = _raw(tmp_path)
    edit(raw["data"])
    with pytest.raises(ConfigError) as e:
        build_config(raw)
    assert message in str(e.value)


def test_mixing_shorthand_and_seq_cls_tasks_are_classification(tmp_path):
    raw = _raw(tmp_path, data={"mixing": "equal"})
    assert build_config(raw).data.mixing.strategy == "equal"
    with pytest.raises(ConfigError, match=r"data.tasks\[0\].format: 'alpaca' on a seq-cls model"):
        build_config(_raw(tmp_path, "tiny-bert", "seq-cls"))


# ---- loading ------------------------------------------------------------------------------------------------


def test_tasks_load_tagged_with_their_own_settings(tmp_path):
    cfg = build_config(_raw(tmp_path, data={"max_length": 256}))
    _, tok = build_tiny("tiny-llama")
    lines = []
    train_data, eval_data = load_tasks(cfg.data, tok, "causal-lm", 0, lines.append)
    assert eval_data is None
    assert train_data.names == ["a", "b", "c"] and [len(p) for p in train_data.parts] == [16, 8, 14]
    assert [ex[TASK_KEY] for ex in train_data.examples] == [0] * 16 + [1] * 8 + [2] * 14
    assert train_data.stats["examples"] == 38 and len(lines) == 3 and lines[2].startswith("task c: 14 train")
    m = train_data.mixture
    assert m.sizes == (16, 8, 14) and m.loss_weights == (2.0, 1.0, 1.0)
    assert m.rates == tuple(mixture_rates([16, 8, 14], "temperature", temperature=2.0))
    # classification as text: the label index answered by its name, after the system prompt as instruction
    c0 = train_data.parts[2].examples[0]
    sst = [json.loads(line) for line in (tmp_path / "data" / "c.jsonl").read_text().splitlines()]
    name = ["negative", "positive"][sst[0]["label"]]
    (answer,) = supervised_segments(c0, tok)  # one supervised span: the label's name and the turn's end
    assert answer.startswith(name) and answer[len(name) :] in ("<|im_end|>" + tok.eos_token, "<|im_end|>\n")
    assert "Sentiment of the review?" in tok.decode(c0["input_ids"])


def test_a_malformed_record_names_the_task_file_and_line(tmp_path):
    raw = _raw(tmp_path)
    bad = tmp_path / "data" / "b.jsonl"
    rows = bad.read_text().splitlines()
    rows[2] = json.dumps({"messages": [{"role": "narrator", "content": "x"}]})
    bad.write_text("\n".join(rows) + "\n")
    cfg = build_config(raw)
    _, tok = build_tiny("tiny-llama")
    with pytest.raises(DataError) as e:
        load_tasks(cfg.data, tok, "causal-lm")
    assert str(e.value).startswith(f"data.tasks[1] (b): {bad}:3: messages[0].role")
    # a label that is neither a label name nor an index into them
    c = tmp_path / "data" / "c.jsonl"
    c.write_text(c.read_text() + json.dumps({"sentence": "meh", "label": 7}) + "\n")
    write_jsonl(bad, messages_rows(8, seed=1))
    with pytest.raises(DataError) as e:
        load_tasks(build_config(raw).data, tok, "causal-lm")
    assert str(e.value).startswith(f"data.tasks[2] (c): {c}:15: label: expected one of negative, positive")


# ---- the loss weights ---------------------------------------------------------------------------------------


def _examples(tok, n: int = 5) -> list[dict]:
    rows = alpaca_rows(n, seed=3)
    exs = []
    for i, r in enumerate(rows):
        ids = tok(f"{r['instruction']} -> {r['output']}", add_special_tokens=False)["input_ids"][: 6 + 2 * i]
        labels = [IGNORE] * 3 + ids[3:]
        exs.append({"input_ids": ids, "labels": labels, TASK_KEY: [0, 1, 1, 2, 0][i]})
    return exs


WEIGHTS = [2.0, 0.5, 1.0]


def _token_losses(model, ex) -> torch.Tensor:
    """Per-target losses of one example alone, from full logits (the plain reference)."""
    logits = model(input_ids=torch.tensor([ex["input_ids"]])).logits.float()[0, :-1]
    return F.cross_entropy(logits, torch.tensor(ex["labels"][1:]), ignore_index=IGNORE, reduction="none")


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("fused", [True, False])
def test_loss_weight_is_the_hand_weighted_sum_of_per_task_token_losses(packed, fused):
    model = tiny_model("tiny-llama", "causal-lm").train()
    _, tok = build_tiny("tiny-llama")
    exs = _examples(tok)
    batch = collate_packed(exs) if packed else collate(exs, tok.pad_token_id, "causal-lm")
    batch["task_ids"] = task_ids(exs, packed)
    perf = PerfConfig(fused_loss=fused, loss_chunk_size=4)
    out = Objective(model, "causal-lm", perf, loss_weights=WEIGHTS)(batch)
    out.loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ref = sum(WEIGHTS[ex[TASK_KEY]] * _token_losses(model, ex).sum() for ex in exs)
    n = sum(int((torch.tensor(ex["labels"][1:]) != IGNORE).sum()) for ex in exs)
    assert out.count == n  # normalised by supervised tokens, not by the weights
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-5)
    ref.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(got[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_loss_weight_seq2seq_rows():
    model = tiny_model("tiny-t5", "seq2seq")
    g = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": torch.randint(4, 200, (3, 7), generator=g),
        "attention_mask": torch.ones(3, 7, dtype=torch.long),
        "labels": torch.randint(4, 200, (3, 5), generator=g),
    }
    batch["labels"][2, 3:] = IGNORE
    batch["task_ids"] = torch.tensor([1, 0, 1])
    out = Objective(model, "seq2seq", loss_weights=[3.0, 0.25])(batch)
    ref = 0.0
    for row, w in enumerate([0.25, 3.0, 0.25]):
        one = {k: v[row : row + 1] for k, v in batch.items() if k != "task_ids"}
        ref = ref + w * Objective(model, "seq2seq")(one).loss
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-5)
    assert out.count == 13


@pytest.mark.parametrize("name,task", [("tiny-t5", "seq2seq"), ("tiny-bert", "seq-cls")])
def test_task_ids_never_reach_the_model(name, task):
    model = tiny_model(name, task)
    seen = []
    model.register_forward_pre_hook(lambda _m, _a, kw: seen.append(set(kw)), with_kwargs=True)
    batch = {"input_ids": torch.randint(4, 200, (2, 6)), "attention_mask": torch.ones(2, 6, dtype=torch.long)}
    batch["labels"] = torch.randint(4, 200, (2, 4)) if task == "seq2seq" else torch.tensor([0, 1])
    Objective(model, task, loss_weights=[1.0, 2.0])({**batch, "task_ids": torch.tensor([0, 1])})
    assert seen and all("task_ids" not in kw for kw in seen)


def test_unit_weights_keep_the_plain_path():
    model = tiny_model("tiny-llama", "causal-lm")
    _, tok = build_tiny("tiny-llama")
    exs = _examples(tok)
    batch = collate(exs, tok.pad_token_id, "causal-lm")
    plain = Objective(model, "causal-lm")(batch).loss
    obj = Objective(model, "causal-lm", loss_weights=[1.0, 1.0, 1.0])
    assert obj.loss_weights is None
    assert torch.equal(obj({**batch, "task_ids": task_ids(exs, False)}).loss, plain)


def test_train_step_loss_is_weighted_sum_over_supervised_tokens(tmp_path):
    model = tiny_model("tiny-llama", "causal-lm").train()
    _, tok = build_tiny("tiny-llama")
    exs = sorted(_examples(tok), key=lambda e: e[TASK_KEY])
    sizes = [sum(e[TASK_KEY] == i for e in exs) for i in range(3)]
    m = Mixture(("x", "y", "z"), tuple(sizes), tuple(mixture_rates(sizes)), tuple(WEIGHTS))
    t = Trainer(model=model, cfg=TrainConfig(**QUIET), task="causal-lm", train_examples=exs, pad_id=0,
                run_dir=tmp_path, perf=PerfConfig(packing=False), mixture=m)  # fmt: skip
    batch = t.stream.collate(exs)
    loss, n, _ = t.train_step([batch])
    with torch.no_grad():
        ref = sum(WEIGHTS[ex[TASK_KEY]] * _token_losses(model, ex).sum() for ex in exs)
    assert loss == pytest.approx(float(ref) / n, rel=1e-5)


# ---- the stream ---------------------------------------------------------------------------------------------


def test_mixture_stream_mixes_tasks_within_micro_batches():
    exs = [
        {"input_ids": [1] * (3 + i % 5), "labels": [1] * (3 + i % 5), TASK_KEY: int(i >= 30)}
        for i in range(40)
    ]
    m = Mixture(("p", "q"), (30, 10), tuple(mixture_rates([30, 10], "equal")), (1.0, 1.0), "equal")
    cfg = TrainConfig(batch_size=8, group_by_length=False, **QUIET)
    stream = MixtureStream(exs, "causal-lm", 0, cfg, PerfConfig(), False, mixture=m)
    batches = stream.epoch(0)
    assert sum(len(b) for b in batches) == sum(m.epoch_counts(0)) == 40
    assert sum(any(i >= 30 for i in b) and any(i < 30 for i in b) for b in batches) >= len(batches) - 1
    batch = stream.collate([exs[i] for i in batches[0]])
    assert batch["task_ids"].tolist() == [exs[i][TASK_KEY] for i in batches[0]]
    packed = MixtureStream(exs, "causal-lm", 0, cfg, PerfConfig(), True, mixture=m)
    pb = packed.collate([exs[i] for i in batches[0]])
    assert pb["task_ids"].shape == pb["input_ids"].shape  # (1, N): each token's task


# ---- runs -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_name", ["tiny-llama", "tiny-gpt2"])
def test_resume_with_a_mixture_is_bit_identical(tmp_path, model_name, monkeypatch):
    kw = {"max_steps": 8, "grad_accum": 2, "schedule": "cosine", "warmup_steps": 2}
    straight = build_config(_raw(tmp_path / "a", model_name, **kw))
    train(straight, log=lambda *_: None)
    ref = load_file(str(tmp_path / "a" / "run" / "final" / "model.safetensors"))

    cfg = straight.model_copy(deep=True)
    cfg.train.output_dir = str(tmp_path / "b")
    real_step = interrupt_after(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, log=lambda *_: None)
    assert [p.name for p in list_checkpoints(tmp_path / "b" / "checkpoints")] == ["step-3"]
    monkeypatch.setattr(Trainer, "_optimizer_step", real_step)
    summary = train(cfg, resume=True, log=lambda *_: None)
    assert summary["steps"] == 8
    got = load_file(str(tmp_path / "b" / "final" / "model.safetensors"))
    for k in ref:
        assert torch.equal(ref[k], got[k]), k


def test_sftlab_train_runs_a_mixture_end_to_end(tmp_path, capsys):
    raw = _raw(tmp_path, max_steps=3)
    raw["data"]["tasks"] = raw["data"]["tasks"][:1] + [
        {
            "name": "more",
            "train": str(write_jsonl(tmp_path / "more.jsonl", alpaca_rows(6, seed=9))),
            "eval_fraction": 0.34,
        }  # fmt: skip
    ]
    path = tmp_path / "mt.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["train", str(path)]) == 0
    out = capsys.readouterr().out
    assert "mixture (temperature" in out and "completed: 3 steps" in out
    table = out[out.index("mixture (") :].splitlines()
    assert table[2].split()[:2] == ["a", "16"] and table[3].split()[:2] == ["more", "4"]
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert [t["task"] for t in summary["tasks"]] == ["a", "more"] and summary["status"] == "completed"
    assert (run / "final" / "model.safetensors").exists() and "eval_loss" in summary
    assert load_config(run / "config.yaml", migrate=True).data.tasks[1].name == "more"
    index = json.loads((run / "final" / "tasks.json").read_text())  # one model serves both tasks
    assert [(t["name"], t["path"]) for t in index["tasks"]] == [("a", "."), ("more", ".")]
    capsys.readouterr()
    assert main(["eval", str(run)]) == 0  # every task on its own eval data: a table, then JSON
    out = capsys.readouterr().out
    rows = json.loads(out[out.index("{") :])["tasks"]
    assert [(r["task"], r["examples"]) for r in rows] == [
        ("a", 16),
        ("more", 2),
    ]  # a: no eval set, its train file
    assert main(["eval", str(run), "--task", "more"]) == 0
    assert json.loads(capsys.readouterr().out)["eval_loss"] == pytest.approx(rows[1]["eval_loss"])
    assert main(["eval", str(run), "--data", str(tmp_path / "more.jsonl")]) == 0
    assert json.loads(capsys.readouterr().out)["examples"] == 6


def test_seq2seq_mixture_trains(tmp_path):
    raw = _raw(tmp_path, "tiny-t5", "seq2seq", max_steps=2)
    del raw["data"]["tasks"][1]  # multi-turn chats have no single source/target pair
    summary = train(build_config(raw), log=lambda *_: None)
    assert summary["status"] == "completed" and summary["steps"] == 2


def test_a_task_path_found_only_beside_the_config_is_named(tmp_path, monkeypatch):
    raw = _raw(tmp_path)
    raw["data"]["tasks"][1]["train"] = "data/b.jsonl"  # exists beside mt.yaml, not in the working directory
    path = tmp_path / "mt.yaml"
    path.write_text(yaml.safe_dump(raw))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match=r"data\.tasks\[1\]\.train: 'data/b.jsonl' does not exist"):
        load_config(path)


def test_a_task_max_length_beyond_the_positions_names_the_task_key(tmp_path):
    from sftlab.errors import ModelError
    from sftlab.recipe import prepare

    raw = _raw(tmp_path, "tiny-gpt2")  # learned positions: a hard limit (rotary LLaMA has none)
    raw["data"]["tasks"][2]["max_length"] = 10**6
    with pytest.raises(ModelError, match=r"data\.tasks\[2\]\.max_length=1000000"):
        prepare(build_config(raw), log=lambda *_: None)


ROOT = Path(__file__).resolve().parents[3]
SHIPPED = ROOT / "examples" / "multitask" / "sst2-agnews.yaml"


def test_shipped_multitask_config_validates():
    assert SHIPPED.read_text().startswith(f"# sftlab train examples/multitask/{SHIPPED.name}")
    cfg = load_config(SHIPPED)
    assert [t.name for t in cfg.data.tasks] == [
        "sst2",
        "agnews",
    ] and cfg.data.mixing.strategy == "temperature"


def test_shipped_multitask_config_trains_on_the_real_files(shared_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)  # its data paths are relative to the repo root
    cfg = load_config(SHIPPED, [f"train.output_dir={tmp_path / 'run'}", "train.max_steps=2", "train.eval_every=2",
                                "train.save_every=2", "train.warmup_steps=0", "train.progress=false", "train.threads=1"])  # fmt: skip
    for t in cfg.data.tasks:
        t.limit = 40
    summary = train(cfg)
    assert summary["status"] == "completed" and [t["task"] for t in summary["tasks"]] == ["sst2", "agnews"]
    assert "agnews" in capsys.readouterr().out
