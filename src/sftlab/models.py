"""Load a base model and tokenizer for a task kind: HF id, local dir, GGUF file, or a built-in tiny name.

Tiny models are random-initialised from small configs with a byte-level tokenizer built in code, so
tests and demos never need a download. Aliases (the quickstart's demo model) are resolved above, in `hub`:
this module only loads, and never downloads anything but what transformers fetches for an HF id.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    GPT2Config,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    T5Config,
)

TASKS = ("causal-lm", "seq-cls", "seq2seq")
TINY_NAMES = ("tiny-llama", "tiny-gpt2", "tiny-bert", "tiny-t5")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

_AUTO_CLASSES = {
    "causal-lm": AutoModelForCausalLM,
    "seq-cls": AutoModelForSequenceClassification,
    "seq2seq": AutoModelForSeq2SeqLM,
}

SPECIAL_TOKENS = {"pad": "<pad>", "bos": "<s>", "eos": "</s>", "unk": "<unk>"}


def byte_tokenizer(model_max_length: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with no merges: every UTF-8 byte is one token, 4 specials first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    specials = [SPECIAL_TOKENS[k] for k in ("pad", "bos", "eos", "unk")]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=SPECIAL_TOKENS["unk"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=SPECIAL_TOKENS["pad"],
        bos_token=SPECIAL_TOKENS["bos"],
        eos_token=SPECIAL_TOKENS["eos"],
        unk_token=SPECIAL_TOKENS["unk"],
        model_max_length=model_max_length,
    )
    return fast


def tiny_config(name: str, vocab_size: int, task: str, num_labels: int | None = None):
    """Small configs (hidden 64, 2 layers) for the four architecture families."""
    common: dict[str, Any] = {
        "vocab_size": vocab_size,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    if num_labels is not None:
        common["num_labels"] = num_labels
    if name == "tiny-llama":
        return LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            tie_word_embeddings=False,
            **common,
        )
    if name == "tiny-gpt2":
        return GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=512, **common)
    if name == "tiny-bert":
        return BertConfig(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            max_position_embeddings=512,
            **common,
        )
    if name == "tiny-t5":
        return T5Config(
            d_model=64,
            d_kv=16,
            d_ff=128,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            decoder_start_token_id=0,
            **common,
        )
    raise ValueError(f"unknown tiny model {name!r}; choose one of {', '.join(TINY_NAMES)}")


def default_task(name: str) -> str:
    return {"tiny-bert": "seq-cls", "tiny-t5": "seq2seq"}.get(name, "causal-lm")


def _check_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise ValueError(f"model.dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    td = DTYPES[dtype]
    if td != torch.float32 and not torch.cuda.is_available() and not _cpu_has_native_bf16():
        warnings.warn(
            f"model.dtype={dtype} on a CPU without native bf16/fp16 matmul: expect ~100x slower training than float32",
            stacklevel=3,
        )
    return td


def _cpu_has_native_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
        return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        return False


def build_tiny(name: str, task: str | None = None, num_labels: int | None = None, seed: int = 0):
    """Random-init tiny model + byte tokenizer, deterministic for a given seed."""
    task = task or default_task(name)
    tok = byte_tokenizer()
    cfg = tiny_config(name, len(tok), task, num_labels)
    if name == "tiny-gpt2":
        tok.padding_side = "right"
    cfg.name_or_path = name
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = _AUTO_CLASSES[task].from_config(cfg)
    model.config.name_or_path = name
    model.eval()  # like from_pretrained: callers switch to train() explicitly
    return model, tok


def _is_gguf(name: str) -> bool:
    return name.lower().endswith(".gguf")


def load_tokenizer(name: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    if name in TINY_NAMES:
        return byte_tokenizer()
    if _is_gguf(name):
        p = Path(name)
        return AutoTokenizer.from_pretrained(
            str(p.parent), gguf_file=p.name, trust_remote_code=trust_remote_code
        )
    return AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)


def load_model(
    name: str,
    task: str = "causal-lm",
    dtype: str = "float32",
    num_labels: int | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = "sdpa",
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Return (model, tokenizer). `name` is a tiny name, a local directory, a .gguf file or an HF id (aliases:
    `hub.load_model`). Pass `tokenizer` when it is already loaded (a GGUF tokenizer takes seconds to parse); tiny
    models always come with their own byte tokenizer."""
    if task not in TASKS:
        raise ValueError(f"model.task: {task!r} is not one of {', '.join(TASKS)}")
    torch_dtype = _check_dtype(dtype)
    if name in TINY_NAMES:
        model, tok = build_tiny(name, task, num_labels)
        return model.to(torch_dtype), tok
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if num_labels is not None and task == "seq-cls":
        kwargs["num_labels"] = num_labels
    src = name
    if _is_gguf(name):
        p = Path(name)
        if not p.is_file():
            raise FileNotFoundError(f"model.name: GGUF file {name!r} does not exist")
        src, kwargs["gguf_file"] = str(p.parent), p.name
    elif not Path(name).exists() and os.environ.get("HF_HUB_OFFLINE") == "1":
        raise FileNotFoundError(
            f"model.name: {name!r} is not a local path or a built-in tiny name ({', '.join(TINY_NAMES)}), "
            "and HF_HUB_OFFLINE=1 forbids a download"
        )
    tok = tokenizer if tokenizer is not None else load_tokenizer(name, trust_remote_code)
    model = _AUTO_CLASSES[task].from_pretrained(src, **kwargs)
    if _is_gguf(name):
        # GGUF weights come back dequantized fp32; clear the flag so save_pretrained accepts the model.
        for attr in ("is_quantized", "hf_quantizer", "quantization_method"):
            if hasattr(model, attr):
                try:
                    setattr(model, attr, None if attr != "is_quantized" else False)
                except AttributeError:
                    pass
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    if getattr(model.config, "pad_token_id", None) is None and tok.pad_token_id is not None:
        model.config.pad_token_id = tok.pad_token_id
    return model, tok


def enable_activation_checkpointing(model: PreTrainedModel) -> None:
    """Recompute activations in backward (non-reentrant, so frozen inputs are fine). transformers 5.x renamed
    gradient_checkpointing_enable to activation_checkpointing_enable; use whichever this version has."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


__all__ = [
    "TASKS",
    "TINY_NAMES",
    "build_tiny",
    "byte_tokenizer",
    "enable_activation_checkpointing",
    "load_model",
    "load_tokenizer",
]
