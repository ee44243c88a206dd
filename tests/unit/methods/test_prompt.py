"""Prompt tuning and P-tuning: PEFT parity on every family, PEFT files both ways, alignment, init, refusals."""

from __future__ import annotations

import copy

import pytest
import torch
from _prompt_helpers import applied, inputs, randomize, real_positions
from helpers import FAMILIES, PEFT_TASK
from pydantic import ValidationError
from torch.testing import assert_close

from sftlab.methods import get_method
from sftlab.methods.peft_format import read_adapter

peft = pytest.importorskip("peft")

VARIANTS = [
    ("prompt", {}),
    ("ptuning", {"encoder": "mlp", "encoder_hidden": 8}),
    ("ptuning", {"encoder": "lstm"}),
]


def _peft_twin(model, task: str, method: str, cfg: dict):
    if method == "prompt":
        pc = peft.PromptTuningConfig(task_type=PEFT_TASK[task], num_virtual_tokens=3)
    else:
        pc = peft.PromptEncoderConfig(
            task_type=PEFT_TASK[task],
            num_virtual_tokens=3,
            encoder_reparameterization_type=cfg["encoder"].upper(),
            encoder_hidden_size=cfg.get("encoder_hidden"),
        )
    return peft.get_peft_model(copy.deepcopy(model), pc).eval()


def _copy_from_peft(tuned, pm, task: str) -> None:
    """Same encoder weights (parameter names match PEFT's). T5: PEFT builds 2m virtual tokens and feeds the first
    m to the encoder; its bidirectional LSTM mixes all 2m, so there we copy PEFT's encoded first m rows instead."""
    encoder = pm.prompt_encoder["default"]
    if task == "seq2seq" and getattr(encoder, "lstm_head", None) is not None:
        tuned.sftlab_prompt.load_rows(pm.get_prompt_embedding_to_save("default")[:3])
    else:
        state = dict(encoder.state_dict())
        state["embedding.weight"] = state["embedding.weight"][:3]
        tuned.sftlab_prompt.load_state_dict(state)
    if task == "seq-cls":
        head = pm.base_model.classifier.modules_to_save["default"]
        tuned.classifier.modules_to_save["default"].load_state_dict(head.state_dict())


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("method,cfg", VARIANTS)
@pytest.mark.parametrize("name,task", FAMILIES)
def test_parity_with_peft_and_files_both_ways(name, task, method, cfg, tmp_path):
    model, tuned, config, ctx = applied(name, task, method, **cfg)
    pm = _peft_twin(model, task, method, cfg)
    _copy_from_peft(tuned, pm, task)
    batch = inputs(task)
    ours = _logits(tuned, batch)
    theirs = _logits(pm, batch)
    if task == "causal-lm":
        theirs = theirs[:, 3:]  # PEFT returns logits for the virtual positions too
    assert_close(real_positions(ours, batch, task), real_positions(theirs, batch, task), rtol=1e-4, atol=1e-5)

    pm.save_pretrained(tmp_path / "peft")  # folded: prompt_embeddings only (+ head)
    _, fresh, _, _ = applied(name, task, method, **cfg)
    get_method(method).load(fresh, config, tmp_path / "peft", ctx)
    assert_close(_logits(fresh, batch), ours, rtol=1e-5, atol=1e-5)

    get_method(method).save(tuned, config, tmp_path / "ours", ctx)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ours").eval()
    back = _logits(loaded, batch)
    back = back[:, 3:] if task == "causal-lm" else back
    assert_close(real_positions(back, batch, task), real_positions(ours, batch, task), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name,task", [f for f in FAMILIES if f[1] != "seq2seq"])
def test_base_model_output_stays_aligned_with_input_ids(name, task):
    """sftlab.train.loss reads model.base_model(...).last_hidden_state position by position."""
    _, tuned, _, _ = applied(name, task, "prompt")
    randomize(tuned, std=1.0)
    batch = inputs(task)
    with torch.no_grad():
        out = tuned.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        full = tuned(**batch).logits
    assert out.last_hidden_state.shape[:2] == batch["input_ids"].shape
    if task == "causal-lm":
        assert_close(tuned.get_output_embeddings()(out.last_hidden_state), full)


def test_text_init_copies_token_embeddings_cut_or_repeated():
    text = "Classify the sentiment:"
    model, tuned, config, ctx = applied("tiny-llama", "causal-lm", "prompt", num_virtual_tokens=30,
                                        init="text", init_text=text)  # fmt: skip
    ids = ctx.tokenizer(text)["input_ids"]
    ids = (ids * 2)[:30]
    want = model.get_input_embeddings().weight[torch.tensor(ids)]
    assert_close(tuned.sftlab_prompt.embedding.weight, want)


def test_random_init_matches_the_word_embedding_scale():
    model, tuned, _, _ = applied("tiny-gpt2", "causal-lm", "prompt", num_virtual_tokens=64)
    ratio = tuned.sftlab_prompt.embedding.weight.std() / model.get_input_embeddings().weight.std()
    assert 0.7 < float(ratio) < 1.3


def test_config_errors_name_the_key():
    with pytest.raises(ValidationError, match="init_text"):
        get_method("prompt").config(init="text")
    with pytest.raises(ValidationError, match="encoder"):
        get_method("ptuning").config(encoder="gru")
    with pytest.raises(ValidationError, match="extra|permitted"):
        get_method("prompt").config(num_virtual_token=4)


def test_packed_rows_are_refused():
    _, tuned, _, _ = applied("tiny-llama", "causal-lm", "prompt")
    ids = torch.randint(4, 260, (1, 6))
    with pytest.raises(NotImplementedError, match="packed"):
        tuned(input_ids=ids, position_ids=torch.tensor([[0, 1, 2, 0, 1, 2]]))


def test_saved_files_use_peft_keys_and_layout(tmp_path):
    _, tuned, config, ctx = applied("tiny-bert", "seq-cls", "ptuning", encoder="lstm")
    get_method("ptuning").save(tuned, config, tmp_path, ctx)
    cfg, tensors = read_adapter(tmp_path)
    assert cfg["peft_type"] == "P_TUNING" and cfg["encoder_reparameterization_type"] == "LSTM"
    assert (
        cfg["num_virtual_tokens"] == 3 and cfg["token_dim"] == 64 and cfg["modules_to_save"] == ["classifier"]
    )
    assert set(tensors) == {"prompt_embeddings", "base_model.classifier.weight", "base_model.classifier.bias"}
    assert tuple(tensors["prompt_embeddings"].shape) == (3, 64)
