"""Load a model straight into its quantised form, one tensor at a time: no full-precision copy of the whole model.

`models.load_model` with `model.quantize` comes here for a local safetensors directory and for a GGUF file. The
model is built with its parameters on the meta device (buffers such as RoPE's inv_freq are real), then each
checkpoint tensor is read alone: a quantisable linear's weight becomes a QuantLinear at once, everything else is
put in place in model.dtype. Peak memory is the quantised model plus one tensor in fp32:
- safetensors: each tensor is read with the file opened for it alone, so its mapped pages go when it is done;
- GGUF (Q8_0, Q4_K, F16, ... any type gguf-py dequantises): each tensor is dequantised to fp32 and re-quantised
  to NF4/int8 at once. The GGUF block codes are not reused as they are (a Q4_K block is not an NF4 block), so a
  4-bit GGUF pays a second rounding: its NF4 codes round the Q4_K values, not the original weights.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..errors import ModelError
from .linear import QuantLinear
from .model import QuantSpec, quantizable


class NotStreamable(ModelError):
    """The checkpoint's tensor names do not cover the model: load it whole and quantise after instead."""


@contextmanager
def _params_on_meta() -> Iterator[None]:
    """Parameters created inside go to the meta device (no memory); buffers stay real (accelerate's
    init_empty_weights, include_buffers=False)."""
    real = nn.Module.register_parameter

    def register(module, name, param):
        real(module, name, param)
        if param is not None:
            p = module._parameters[name]
            module._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = real


def safetensors_files(src: Path) -> list[Path] | None:
    """The weight files of a local HF directory in safetensors form (single file or index), else None."""
    index = src / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [src / f for f in files]
    single = src / "model.safetensors"
    return [single] if single.is_file() else None


def _safetensors_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            keys = list(fh.keys())
        for k in keys:
            with safe_open(str(f), framework="pt") as fh:  # mapped for this tensor only
                t = fh.get_tensor(k)
            del fh
            yield k, t


def _gguf_tensors(path: Path, model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, fp32 tensor) per GGUF tensor, dequantised one at a time, through transformers' own name map and
    per-architecture fix-ups (Llama's q/k row permutation)."""
    import numpy as np
    from gguf import GGUFReader, dequantize
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        load_gguf_checkpoint,
    )

    meta = load_gguf_checkpoint(str(path), return_tensors=False)  # config + tokenizer fields only
    reader = GGUFReader(str(path))
    arch = reader.fields["general.architecture"]
    arch = bytes(arch.parts[arch.data[0]]).decode()
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=meta.get("config", {}))
    names = get_gguf_hf_weights_map(model, processor)
    for tensor in reader.tensors:
        w = dequantize(tensor.data, tensor.tensor_type)
        res = processor.process(weights=w, name=tensor.name, tensor_key_mapping=names, parsed_parameters=meta)
        if res.name in names:
            w = np.asarray(res.weights, dtype=np.float32)
            w = (
                w if w.flags.writeable and w.flags.c_contiguous else w.copy()
            )  # F32 tensors are views of the file
            yield names[res.name], torch.from_numpy(w)


def _model_key(name: str, keys: set[str], prefix: str) -> str | None:
    """The model's state-dict key for a checkpoint name, with or without the base model prefix (GPT-2's hub
    checkpoints say `h.0...` for `transformer.h.0...`); None for a tensor the model does not have."""
    for k in (name, f"{prefix}.{name}", name.removeprefix(prefix + ".")):
        if k in keys:
            return k
    return None


def load_quantized(
    auto_class,
    config,
    spec: QuantSpec,
    dtype: torch.dtype,
    source: str,
    files: list[Path] | None = None,
    gguf_path: Path | None = None,
    **from_config: object,
) -> nn.Module:
    """Build `auto_class` from `config` with meta parameters and fill it tensor by tensor (see the module doc)."""
    with _params_on_meta():
        model = auto_class.from_config(config, dtype=dtype, **from_config)
    model.tie_weights()
    targets = set(quantizable(model))
    layers = {p: model.get_submodule(p) for p in targets}
    tensors = _gguf_tensors(gguf_path, model) if gguf_path else _safetensors_tensors(files or [])
    keys = set(model.state_dict())
    prefix = getattr(model, "base_model_prefix", "") or ""
    loaded: set[str] = set()
    cdt = spec.torch_compute_dtype()
    with torch.no_grad():
        for name, t in tensors:
            name = _model_key(name, keys, prefix)
            if name is None:
                continue
            path, _, pname = name.rpartition(".")
            if path in targets and pname == "weight":
                old = layers[path]
                bias = old.bias if old.bias is not None and old.bias.device.type != "meta" else None
                q = QuantLinear.from_weight(
                    t.to(dtype), bias, isinstance(old, Conv1D), spec.kind, spec.double_quant, cdt
                )
                if bias is None and old.bias is not None:
                    q.bias = nn.Parameter(old.bias, requires_grad=False)  # still meta: its tensor comes later
                parent, _, child = path.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, child, q)
            else:
                owner = model.get_submodule(path) if path else model
                if pname in owner._parameters:
                    req = owner._parameters[pname].requires_grad and not isinstance(owner, QuantLinear)
                    owner._parameters[pname] = nn.Parameter(t.to(dtype), requires_grad=req)
                elif pname in owner._buffers:
                    owner._buffers[pname] = t.to(dtype)
                else:
                    continue
            loaded.add(name)
            del t
    model.tie_weights()
    missing = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if missing:
        raise NotStreamable(
            f"model.name: {source!r}: the checkpoint has no tensor for {', '.join(missing[:5])}"
            + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            + " (loading it quantised needs every weight; try without model.quantize to see transformers' report)"
        )
    model._sftlab_quant = spec
    model.eval()
    return model
