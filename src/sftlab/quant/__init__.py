"""Quantised frozen bases (QLoRA): NF4 or int8 linear weights under LoRA, bottleneck adapters or prompt methods.

`model.quantize: nf4 | int8` (with `double_quant`, `compute_dtype`) makes `models.load_model` call
`quantize_model`: every frozen linear except the heads becomes a `QuantLinear` (codes in buffers, decoded per
GEMM). The codes are rebuilt from the model's weights on every load (deterministic), never written to a
checkpoint or to final/. `dequantize_model` turns them back into plain layers for `sftlab merge`.

  codecs.py   NF4 (blockwise absmax, double quantisation) and int8 (per-row absmax), pure PyTorch
  linear.py   QuantLinear: decode, GEMM, drop; backward decodes again
  cache.py    decoded_once: inference decodes each weight once, not once per forward (per generated token)
  model.py    which layers, quantize_model / dequantize_model, weight_memory for the summary
  stream.py   a safetensors directory or a GGUF file read tensor by tensor straight into a quantised model
  bnb.py      the bitsandbytes backend (Linear4bit / Linear8bitLt, CUDA only)
"""

from .cache import decoded_once
from .codecs import NF4_CODE, dequantize_int8, dequantize_nf4, quantize_int8, quantize_nf4
from .linear import KINDS, QuantLinear
from .model import (
    QuantSpec,
    decoded_layer,
    dequantize_model,
    is_quantized_layer,
    quant_spec,
    quantizable,
    quantize_model,
    weight_memory,
)

__all__ = [
    "KINDS",
    "NF4_CODE",
    "QuantLinear",
    "QuantSpec",
    "decoded_layer",
    "decoded_once",
    "dequantize_int8",
    "dequantize_model",
    "dequantize_nf4",
    "is_quantized_layer",
    "quant_spec",
    "quantizable",
    "quantize_int8",
    "quantize_model",
    "quantize_nf4",
    "weight_memory",
]
