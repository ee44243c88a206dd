"""One table of (method x model family) through the same checks: trains through `sftlab train`'s recipe (the loss
on the training examples really falls), saves, reloads from the run directory to exactly the trained model (same
eval loss), and generates."""

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
# Per method, a learning rate at which it trains steadily (full fine-tuning of tiny-bert overshoots at 1e-2).
LR = {
    "full": 1e-3,
    "freeze": 1e-2,
    "lora": 3e-2,
    "adapter": 3e-2,
    "prefix": 3e-2,
    "ptuning": 3e-2,
    "prompt": 3e-2,
}
STEPS = 24  # 8 epochs of the 12 training rows
# The training-set loss must fall by this many nats. Untrained (or not updated) it falls by 0. The smallest fall
# seen, with these seeds, is 0.015: frozen random tiny models let seq-cls methods learn little beyond the label
# prior (0.694 -> 0.679) and a soft prompt move GPT-2 only a little; full/LoRA/adapters fall by 0.3-3 nats.
MIN_FALL = 0.005


def quiet(*_):
    return None


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("model,task", FAMILIES)
def test_method_trains_saves_reloads_generates(tmp_path, method, model, task):
    cfg = make_config(
        tmp_path,
        model,
        task,
        n=16,
        method={"name": method, **METHODS[method]},
        train={"max_steps": STEPS, "lr": LR[method]},
        data={"eval_fraction": 0.25},
    )
    start, tok, train_data, eval_data = prepare(cfg, log=quiet)  # the model training starts from (same seeds)
    seen = train_data.examples
    before = evaluate(start, seen, task, 8, tok.pad_token_id)["eval_loss"]

    summary = train(cfg, log=quiet)
    assert summary["status"] == "completed" and summary["steps"] == STEPS
    assert 0 < summary["trainable_params"] <= summary["total_params"]

    reloaded, tok, _ = load_run(tmp_path / "run")
    after = evaluate(reloaded, seen, task, 8, tok.pad_token_id)["eval_loss"]
    assert after < before - MIN_FALL, f"loss on the training rows {before:.4f} -> {after:.4f}"
    res = evaluate(reloaded, eval_data.examples, task, 8, tok.pad_token_id)
    assert res["eval_loss"] == pytest.approx(summary["eval_loss"], rel=1e-5, abs=1e-6)
    if task != "seq-cls":
        outs = generate(
            reloaded, tok, cfg.data, ["Repeat: cat", "Repeat: a much longer prompt"], max_new_tokens=4
        )
        assert len(outs) == 2 and all(isinstance(o, str) for o in outs)
