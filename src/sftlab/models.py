"""Load a base model and tokenizer for a task kind: HF id, local dir, GGUF file, or a built-in tiny name.

Tiny models are random-initialised from small configs with a byte-level tokenizer built in code, so
tests and demos never need a download. Aliases (the quickstart's demo model) are resolved above, in `hub`:
this module only loads, and never downloads anything but what transformers fetches for an HF id.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
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

from .errors import ModelError
from .quant import QuantSpec, quantize_model
from .quant.stream import NotStreamable, load_quantized, safetensors_files

TASKS = ("causal-lm", "seq-cls", "seq2seq", "masked-lm")
TINY_NAMES = ("tiny-llama", "tiny-gpt2", "tiny-bert", "tiny-t5")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

_AUTO_CLASSES = {
    "causal-lm": AutoModelForCausalLM,
    "seq-cls": AutoModelForSequenceClassification,
    "seq2seq": AutoModelForSeq2SeqLM,
    "masked-lm": AutoModelForMaskedLM,  # an encoder with its MLM head (train.objective: mlm)
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
    if td != torch.float32 and not torch.cuda.is_available():
        warn_slow_half(f"model.dtype={dtype}", stacklevel=4)
    return td


def warn_slow_half(setting: str, stacklevel: int = 3) -> None:
    """Half-precision matmuls on a CPU without bf16 instructions are emulated: one warning for every setting that
    asks for them (model.dtype, train.precision)."""
    if not _cpu_has_native_bf16():
        warnings.warn(
            f"{setting} on a CPU without native bf16/fp16 matmul: expect ~100x slower training than float32",
            stacklevel=stacklevel,
        )


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


def hub_offline() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE, read now (huggingface_hub reads its flag once, at import)."""
    from huggingface_hub import constants

    on = {"1", "ON", "YES", "TRUE"}
    env = (os.environ.get(k, "").upper() in on for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return bool(constants.HF_HUB_OFFLINE) or any(env)


@contextmanager
def named_source(name: str) -> Iterator[None]:
    """Turn transformers' OSError for a name it cannot find into a ModelError that says what the name is not
    (a local directory, a tiny name, a .gguf file) and why the hub did not supply it."""
    p = Path(name).expanduser()
    if p.is_dir() and not any(
        (p / f).is_file() for f in ("config.json", "tokenizer_config.json", "tokenizer.json")
    ):
        raise ModelError(
            f"model.name: {name!r} is a directory but not a model's: no config.json or tokenizer files in it"
        )
    try:
        yield
    except OSError as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if Path(name).expanduser().exists():
            raise ModelError(
                f"model.name: {name!r}: cannot load a model/tokenizer from this path ({reason})"
            ) from e
        hub = (
            "the Hugging Face hub is offline (HF_HUB_OFFLINE=1) and holds no cached copy"
            if hub_offline()
            else f"the Hugging Face hub could not provide it (unreachable, or no such model: {reason})"
        )
        raise ModelError(
            f"model.name: {name!r} is not a local directory, not a built-in tiny name ({', '.join(TINY_NAMES)}), "
            f"not a .gguf file, and {hub}"
        ) from e


def _gguf_path(name: str) -> Path:
    p = Path(name)
    if not p.is_file():
        raise ModelError(f"model.name: {name!r}: no such GGUF file")
    return p


def load_tokenizer(name: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    if name in TINY_NAMES:
        return byte_tokenizer()
    with named_source(name):
        if _is_gguf(name):
            p = _gguf_path(name)
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
    quant: QuantSpec | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Return (model, tokenizer). `name` is a tiny name, a local directory, a .gguf file or an HF id (aliases:
    `hub.load_model`). Pass `tokenizer` when it is already loaded (a GGUF tokenizer takes seconds to parse); tiny
    models always come with their own byte tokenizer. `quant` (model.quantize): the frozen linears held as NF4/int8
    codes (`sftlab.quant`), built layer by layer right after loading."""
    model, tok = _load_model(
        name, task, dtype, num_labels, trust_remote_code, attn_implementation, tokenizer, quant
    )
    if quant is not None and getattr(model, "_sftlab_quant", None) is None:
        quantize_model(model, quant)
    return model, tok


def _load_model(
    name: str,
    task: str,
    dtype: str,
    num_labels: int | None,
    trust_remote_code: bool,
    attn_implementation: str | None,
    tokenizer: PreTrainedTokenizerBase | None,
    quant: QuantSpec | None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
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
        p = _gguf_path(name)
        src, kwargs["gguf_file"] = str(p.parent), p.name
    tok = tokenizer if tokenizer is not None else load_tokenizer(name, trust_remote_code)
    with named_source(name):
        model = _streamed(task, src, kwargs, quant, name) if quant is not None else None
        if model is None:
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


def _streamed(
    task: str, src: str, kwargs: dict[str, Any], quant: QuantSpec, name: str
) -> PreTrainedModel | None:
    """model.quantize from a local safetensors directory or a GGUF file: built tensor by tensor into its quantised
    form (quant/stream.py), never whole in full precision. None for other sources (an HF id, .bin weights, names
    that do not match the model), which load whole and are quantised right after."""
    from transformers import AutoConfig, GenerationConfig

    if quant.backend != "torch":
        return None
    gguf_file = kwargs.get("gguf_file")
    files = None if gguf_file else safetensors_files(Path(src))
    if not gguf_file and files is None:
        return None
    cfg_keys = ("trust_remote_code", "num_labels", "gguf_file")
    config = AutoConfig.from_pretrained(src, **{k: kwargs[k] for k in cfg_keys if k in kwargs})
    extra = {k: kwargs[k] for k in ("attn_implementation", "trust_remote_code") if k in kwargs}
    gguf_path = Path(src) / gguf_file if gguf_file else None
    try:
        model = load_quantized(
            _AUTO_CLASSES[task], config, quant, kwargs["dtype"], name, files, gguf_path, **extra
        )
    except NotStreamable as e:
        warnings.warn(f"{e}; loading it whole, then quantising", stacklevel=4)
        return None
    if not gguf_file and (Path(src) / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(src)
    return model


# Module names of position tables (GPT-2 wpe, BERT/RoBERTa position_embeddings, BART/OPT embed_positions).
_POSITION_TABLES = ("wpe", "position_embeddings", "embed_positions")


def position_limit(model: nn.Module) -> int | None:
    """How many positions the model can embed, when it looks them up in a table (learned absolute positions):
    one more is an IndexError deep in the forward. None for rotary or relative positions (LLaMA, T5), which have
    no hard limit. RoBERTa's table starts at padding_idx + 1 and BART's at `offset`, so both hold a few extra rows."""
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Embedding) and name.rsplit(".", 1)[-1] in _POSITION_TABLES:
            offset = getattr(mod, "offset", None)
            if not isinstance(offset, int):
                offset = mod.padding_idx + 1 if mod.padding_idx is not None else 0
            return mod.num_embeddings - offset
    return None


def describe_limit(model: nn.Module, limit: int) -> str:
    """`gpt2 has 1024 positions (n_positions=1024)`: the model and the config key users know the limit by."""
    config = getattr(model, "config", None)
    name = getattr(config, "name_or_path", "") or type(model).__name__
    key = next((k for k in ("n_positions", "max_position_embeddings") if hasattr(config, k)), None)
    return f"{name} has {limit} positions" + (f" ({key}={getattr(config, key)})" if key else "")


def check_positions(
    model: nn.Module, length: int, key: str, reserved: int = 0, reserved_by: str = ""
) -> None:
    """Refuse a `length` (plus `reserved` virtual tokens of a prompt/prefix method) beyond the model's position
    table, naming the config key: caught here instead of as an IndexError in the first long batch."""
    limit = position_limit(model)
    if limit is None or length + reserved <= limit:
        return
    extra = f" plus the {reserved} virtual tokens of {reserved_by or 'the method'}" if reserved else ""
    raise ModelError(
        f"{key}={length}{extra} is beyond the model's positions: {describe_limit(model, limit)}, and a longer "
        f"input would index past its position table; set {key} to at most {limit - reserved}"
    )


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
    "check_positions",
    "enable_activation_checkpointing",
    "load_model",
    "load_tokenizer",
    "position_limit",
]
