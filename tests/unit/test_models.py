import pytest
import torch

from sftlab import models
from sftlab.errors import ModelError
from sftlab.models import TINY_NAMES, build_tiny, byte_tokenizer, enable_activation_checkpointing, load_model


def test_byte_tokenizer_round_trips_any_text():
    tok = byte_tokenizer()
    text = "héllo wörld — 你好 \n\t{json: 1}"
    ids = tok(text)["input_ids"]
    assert len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)


@pytest.mark.parametrize("name", TINY_NAMES)
def test_tiny_models_are_deterministic(name):
    a, _ = build_tiny(name)
    b, _ = build_tiny(name)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n


def test_seq_cls_label_count_and_local_dir_round_trip(tmp_path):
    model, tok = load_model("tiny-bert", "seq-cls", num_labels=5)
    assert model.config.num_labels == 5
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    again, tok2 = load_model(str(tmp_path), "seq-cls")
    ids = tok("some text", return_tensors="pt")
    torch.testing.assert_close(again(**ids).logits, model(**ids).logits)


def test_bf16_on_cpu_without_native_support_warns(monkeypatch):
    monkeypatch.setattr(models, "_cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.warns(UserWarning, match="100x slower"):
        model, _ = load_model("tiny-llama", dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16


def test_unknown_names_are_clear_errors(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="not a local directory, not a built-in tiny name .* hub is offline"):
        load_model("no-such/model-anywhere")
    with pytest.raises(ModelError, match="no such GGUF file"):
        load_model("/nope/model.gguf")
    with pytest.raises(ValueError, match="model.task"):
        load_model("tiny-llama", task="classify")


def test_gradient_checkpointing_gives_same_loss_and_grads():
    from helpers import compute_loss

    ids = torch.randint(4, 200, (2, 24))
    labels = ids.clone()
    labels[:, :8] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    grads = []
    for ckpt in (False, True):
        model, _ = build_tiny("tiny-llama")
        model.train()
        if ckpt:
            enable_activation_checkpointing(model)
            assert model.model.gradient_checkpointing
        loss, n = compute_loss(model, batch, "causal-lm")
        (loss / n).backward()
        grads.append((loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    for k in grads[0][1]:
        torch.testing.assert_close(grads[0][1][k], grads[1][1][k], rtol=1e-5, atol=1e-7)
