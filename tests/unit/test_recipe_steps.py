"""The recipe's steps run on their own: a later stage starts from an earlier run's weights (`init_from`)."""

import torch
from helpers import make_config

from sftlab.recipe import apply_method, load_base, load_data, load_tokenizer, train


def test_load_base_init_from_a_finished_run_gives_its_trained_weights(tmp_path):
    first = make_config(tmp_path / "a", "tiny-llama", train={"max_steps": 3, "lr": 1e-2})
    train(first, log=lambda *_: None)

    cfg = make_config(tmp_path / "b", "tiny-llama", method={"name": "lora", "r": 4})
    tok = load_tokenizer(cfg)
    data, _ = load_data(cfg, tok, log=lambda *_: None)
    fresh = load_base(cfg, tok, data.label_names)
    stage2 = load_base(cfg, tok, data.label_names, init_from=tmp_path / "a" / "run" / "final")
    from sftlab.runs import load_run

    done, _, _ = load_run(tmp_path / "a" / "run")
    want = dict(done.named_parameters())
    for n, p in stage2.named_parameters():
        torch.testing.assert_close(p, want[n], rtol=0, atol=0, msg=n)
    assert any(not torch.equal(p, dict(fresh.named_parameters())[n]) for n, p in stage2.named_parameters())
    apply_method(stage2, cfg, tok)  # the next stage's method goes on top of the previous stage's weights
    assert {n for n, p in stage2.named_parameters() if p.requires_grad} and all(
        "lora_" in n for n, p in stage2.named_parameters() if p.requires_grad
    )
