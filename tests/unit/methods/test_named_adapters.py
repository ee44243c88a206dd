"""The shared named-adapter layer: names, row grouping, modules_to_save for every method, MethodSpec merge/route."""

from __future__ import annotations

import argparse

import pytest
import torch
from helpers import make_config, tiny_model
from transformers import AutoModelForCausalLM

from sftlab.cli import merge as merge_cli
from sftlab.cli.main import build_parser
from sftlab.methods import MethodContext, get_method, method_names
from sftlab.methods._adapters import BASE_ROW, SavedModule, check_name, mix_rows, row_groups
from sftlab.recipe import train


def test_names_are_key_parts_and_never_the_base_row():
    check_name("task-1_a")
    for bad in ("", "a.b", "a b", BASE_ROW):
        with pytest.raises(ValueError, match="adapter name"):
            check_name(bad)


def test_rows_grouped_by_name_and_mixed_back_in_order():
    names = ["a", BASE_ROW, "b", "a"]
    groups = row_groups(names, torch.device("cpu"))
    assert list(groups) == ["a", BASE_ROW, "b"] and groups["a"].tolist() == [0, 3]
    base = torch.zeros(4, 2)
    out = mix_rows(base, names, lambda n, idx: None if n == "b" else torch.full((len(idx), 2), 7.0))
    assert out[:, 0].tolist() == [
        7.0,
        0.0,
        0.0,
        7.0,
    ]  # the base row and the name the switch lacks keep base rows
    with pytest.raises(ValueError, match="3 names for a batch of 4 rows"):
        mix_rows(base, names[:3], lambda n, idx: None)


@pytest.mark.parametrize("method", ["lora", "adapter", "prefix", "ptuning", "prompt"])
def test_every_peft_method_trains_a_copy_of_the_seq_cls_head(method):
    model = tiny_model("tiny-bert", "seq-cls")
    spec = get_method(method)
    cfg = spec.config(**({"num_virtual_tokens": 3} if method in ("prefix", "ptuning", "prompt") else {}))
    spec.apply(model, cfg, MethodContext(task="seq-cls", base_model_name="tiny-bert"))
    head = model.classifier
    assert isinstance(head, SavedModule) and head.adapter_names() == ["default"]
    assert not any(p.requires_grad for p in head.original_module.parameters())
    assert all(p.requires_grad for p in head.modules_to_save["default"].parameters())


def test_merge_and_route_slots():
    have = {n: (get_method(n).merge is not None, get_method(n).route is not None) for n in method_names()}
    assert have == {
        "full": (False, False),
        "freeze": (False, False),
        "lora": (True, True),
        "adapter": (False, True),
        "prefix": (False, False),
        "ptuning": (False, False),
        "prompt": (False, False),
    }


def _run(tmp_path, method: str, **method_kw):
    cfg = make_config(tmp_path, n=8, method={"name": method, **method_kw}, train={"max_steps": 1})
    train(cfg, log=lambda *_: None)
    return tmp_path / "run"


def _merge_args(run_dir, out) -> argparse.Namespace:
    return build_parser().parse_args(["merge", str(run_dir), str(out)])


def test_sftlab_merge_asks_the_method(tmp_path, capsys):
    run_dir = _run(tmp_path / "lora", "lora", r=2)
    out = tmp_path / "merged"
    assert merge_cli.run(_merge_args(run_dir, out)) == 0
    assert isinstance(AutoModelForCausalLM.from_pretrained(out), torch.nn.Module)

    run_dir = _run(tmp_path / "adapter", "adapter")
    with pytest.raises(ValueError, match=r"method 'adapter' cannot be merged.*mergeable methods: lora"):
        merge_cli.run(_merge_args(run_dir, tmp_path / "no"))
