"""Per-example loss weights (data.weight_field; self-training's pseudo_weight): read from a record field, carried by
the examples, collated per row (or per token when packed), multiplied into the training loss only."""

import pytest
import torch
import torch.nn.functional as F
from helpers import classification_rows, make_config, tiny_model, write_jsonl

from sftlab.config import PerfConfig, build_config
from sftlab.data import IGNORE, load_data
from sftlab.data.batching import WEIGHT_KEY, collate, collate_packed
from sftlab.errors import ConfigError, DataError
from sftlab.models import build_tiny
from sftlab.train.objective import Objective

W = [0.5, 2.0, 0.0]


def _lm_examples(tok) -> list[dict]:
    out = []
    for i, text in enumerate(["the cat sat", "a dog ran far away", "sun and moon"]):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        out.append({"input_ids": ids, "labels": [IGNORE] * 2 + ids[2:], WEIGHT_KEY: W[i]})
    return out


def _token_losses(model, ex) -> torch.Tensor:
    logits = model(input_ids=torch.tensor([ex["input_ids"]])).logits.float()[0, :-1]
    return F.cross_entropy(logits, torch.tensor(ex["labels"][1:]), ignore_index=IGNORE, reduction="none")


@pytest.mark.parametrize("packed", [False, True])
def test_causal_lm_loss_is_the_hand_weighted_sum_of_each_examples_token_losses(packed):
    model = tiny_model("tiny-llama", "causal-lm").train()
    _, tok = build_tiny("tiny-llama")
    exs = _lm_examples(tok)
    batch = collate_packed(exs) if packed else collate(exs, tok.pad_token_id, "causal-lm")
    out = Objective(model, "causal-lm", PerfConfig(loss_chunk_size=4))(batch)
    ref = sum(ex[WEIGHT_KEY] * _token_losses(model, ex).sum() for ex in exs)
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-5)
    assert out.count == sum(
        sum(1 for v in ex["labels"][1:] if v != IGNORE) for ex in exs
    )  # targets, not weights


def test_seq_cls_rows_are_weighted_in_training_and_plain_in_eval():
    model = tiny_model("tiny-bert", "seq-cls")
    g = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": torch.randint(4, 200, (3, 6), generator=g),
        "attention_mask": torch.ones(3, 6, dtype=torch.long),
        "labels": torch.tensor([0, 1, 1]),
    }
    obj = Objective(model, "seq-cls").eval()
    plain = obj(batch).loss  # eval mode (tiny_model is in eval): no dropout
    per_row = [obj({k: v[i : i + 1] for k, v in batch.items()}).loss for i in range(3)]
    weighted = {**batch, "example_weights": torch.tensor(W)}
    assert torch.equal(obj(weighted).loss, plain)  # evaluation reports the plain loss
    obj.train()
    model.eval()  # the objective's training flag decides the weighting; dropout stays off for the comparison
    torch.testing.assert_close(obj(weighted).loss, sum(w * x for w, x in zip(W, per_row)))


def test_example_weights_never_reach_the_model():
    model = tiny_model("tiny-bert", "seq-cls")
    seen = []
    model.register_forward_pre_hook(lambda _m, _a, kw: seen.append(set(kw)), with_kwargs=True)
    batch = {"input_ids": torch.randint(4, 200, (2, 6)), "attention_mask": torch.ones(2, 6, dtype=torch.long)}
    Objective(model, "seq-cls").train()(
        {**batch, "labels": torch.tensor([0, 1]), "example_weights": torch.ones(2)}
    )
    assert seen and all("example_weights" not in kw for kw in seen)


def test_the_weight_field_is_read_for_training_records_only(tmp_path):
    rows = classification_rows(6)
    rows[1]["w"], rows[4]["w"] = 0.25, 3
    ev = write_jsonl(tmp_path / "ev.jsonl", classification_rows(4, seed=3))
    cfg = make_config(
        tmp_path, "tiny-bert", "seq-cls", rows=rows, data={"weight_field": "w", "eval": str(ev)}
    )
    _, tok = build_tiny("tiny-bert")
    train, evald = _load(cfg, tok)
    assert [ex[WEIGHT_KEY] for ex in train.examples] == [1.0, 0.25, 1.0, 1.0, 3.0, 1.0]
    assert all(WEIGHT_KEY not in ex for ex in evald.examples)
    assert "weight_field" not in make_config(tmp_path / "b", "tiny-bert", "seq-cls").model_dump()["data"]


def _load(cfg, tok):
    return load_data(cfg.data, tok, "seq-cls")


@pytest.mark.parametrize("value", ["x", -1, True, None])
def test_a_bad_weight_names_the_record_and_field(tmp_path, value):
    rows = classification_rows(4)
    rows[2]["w"] = value if value is not None else float("nan")
    cfg = make_config(tmp_path, "tiny-bert", "seq-cls", rows=rows, data={"weight_field": "w"})
    with pytest.raises(DataError) as e:
        _load(cfg, build_tiny("tiny-bert")[1])
    got = repr(rows[2]["w"])
    assert str(e.value).endswith(
        f"train-classification.jsonl:3: w: expected a loss weight, a number >= 0 (got {got})"
    )


def test_a_weight_field_no_record_holds_is_an_error_and_tasks_or_objectives_refuse_it(tmp_path):
    cfg = make_config(tmp_path, "tiny-bert", "seq-cls", data={"weight_field": "wieght"})
    with pytest.raises(DataError, match="data.weight_field: 'wieght': no record has this field"):
        _load(cfg, build_tiny("tiny-bert")[1])
    text = tmp_path / "t.txt"
    text.write_text("some text\n")
    raw = {"model": {"name": "tiny-llama"}, "data": {"train": str(text), "weight_field": "w"},
           "train": {"objective": "clm"}}  # fmt: skip
    with pytest.raises(ConfigError, match="data.weight_field: weights supervised examples"):
        build_config(raw)
    raw = {
        "model": {"name": "tiny-llama"},
        "data": {"weight_field": "w", "tasks": [{"name": "a", "train": str(text)}]},
    }
    with pytest.raises(ConfigError, match="data.weight_field: weights the examples of one data.train"):
        build_config(raw)
