"""The `model:` section: which model, its head (task), dtype, attention kernel and quantised base."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..strict import StrictModel


class ModelConfig(StrictModel):
    name: str = Field(
        ...,
        description="HF id | local dir | path/to/file.gguf | tiny-llama | tiny-gpt2 | tiny-bert | tiny-t5",
    )
    task: Literal["causal-lm", "seq-cls", "seq2seq", "masked-lm"] = Field(
        "causal-lm",
        description="What the model is trained to do; masked-lm (an encoder's MLM head) goes with train.objective: "
        "mlm, and is set by it when left out.",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Weights dtype; float32 on CPU."
    )
    trust_remote_code: bool = Field(
        False,
        description="Run model code from the model repo. Only --trust-remote-code on the command line turns it on: "
        "true here without the flag is an error for `sftlab train`, and ignored (with a warning) in a run directory "
        "that eval/generate/merge load.",
    )
    attn_implementation: Literal["sdpa", "eager"] = Field("sdpa", description="Attention kernel.")
    quantize: Literal["nf4", "int8"] | None = Field(
        None,
        description="Hold the frozen base's linear weights quantised (QLoRA): nf4 (4-bit NormalFloat, 64-blocks) or "
        "int8 (per-row absmax); heads, embeddings and norms keep model.dtype. For methods that freeze the base "
        "(lora, adapter, prefix, ptuning, prompt); rebuilt from the weights on every load, never saved.",
    )
    double_quant: bool = Field(
        True,
        description="nf4: store the block scales as int8 too (QLoRA double quantisation: 4.13 bits a weight, not 4.5).",
    )
    compute_dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="Dtype quantised weights are decoded to for their GEMMs; null: model.dtype."
    )
    quant_backend: Literal["torch", "bitsandbytes"] = Field(
        "torch",
        description="Who holds the codes: torch (sftlab's NF4/int8 layers, pure PyTorch, any device; the same NF4 "
        "codes as torchao's NF4Tensor) | bitsandbytes (its Linear4bit/Linear8bitLt, as PEFT/TRL use; CUDA only).",
    )

    def quant_spec(self):
        """The `quant.QuantSpec` of this model (None when model.quantize is null)."""
        from ..quant import QuantSpec

        if self.quantize is None:
            return None
        return QuantSpec(self.quantize, self.double_quant, self.compute_dtype, self.quant_backend)
