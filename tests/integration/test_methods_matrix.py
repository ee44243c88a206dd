"""One table of (method x model family) through the same checks: trains through `sftlab train`'s recipe,
saves, reloads from the run directory to exactly the trained model (same eval loss), and generates."""

import pytest
from helpers import FAMILIES, make_config

from sftlab.eval.evaluate import evaluate
from sftlab.generate import generate
from sftlab.recipe import prepare, train
from sftlab.runs import load_run

METHODS = {
    "full": {},
    "freeze": {"trainable_layers": 1},
    "lora": {"r": 4},
    "adapter": {"reduction_factor": 8},
    "prefix": {"num_virtual_tokens": 4},
    "ptuning": {"num_virtual_tokens": 4, "encoder": "mlp"},
    "prompt": {"num_virtual_tokens": 4},
}


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("model,task", FAMILIES)
def test_method_trains_saves_reloads_generates(tmp_path, method, model, task):
    cfg = make_config(
        tmp_path,
        model,
        task,
        n=16,
        method={"name": method, **METHODS[method]},
        train={"max_steps": 3, "lr": 1e-2},
        data={"eval_fraction": 0.25},
    )
    summary = train(cfg, log=lambda *_: None)
    assert summary["status"] == "completed"
    assert 0 < summary["trainable_params"] <= summary["total_params"]
    _, _, _, eval_data = prepare(cfg, log=lambda *_: None)
    reloaded, tok, _ = load_run(tmp_path / "run")
    res = evaluate(reloaded, eval_data.examples, task, 8, tok.pad_token_id)
    assert res["eval_loss"] == pytest.approx(summary["eval_loss"], rel=1e-5, abs=1e-6)
    if task != "seq-cls":
        outs = generate(
            reloaded, tok, cfg.data, ["Repeat: cat", "Repeat: a much longer prompt"], max_new_tokens=4
        )
        assert len(outs) == 2 and all(isinstance(o, str) for o in outs)
