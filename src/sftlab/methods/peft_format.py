"""Read and write PEFT adapter directories: adapter_config.json + adapter_model.safetensors.

Key names follow PEFT's saved layout ("base_model.model.<module path>.lora_A.weight", "prompt_embeddings", ...);
each method maps its own tensors to and from these names.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..files import read_json_object, read_safetensors

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
# sftlab's model.task -> PEFT's task_type, for every method that writes PEFT files
TASK_TYPES = {"causal-lm": "CAUSAL_LM", "seq-cls": "SEQ_CLS", "seq2seq": "SEQ_2_SEQ_LM"}


def write_adapter(out_dir: str | Path, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(out / WEIGHTS_NAME))


def read_adapter(in_dir: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    d = Path(in_dir)
    cfg_path, w_path = d / CONFIG_NAME, d / WEIGHTS_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path}: no adapter config here")
    if not w_path.is_file():
        if (d / "adapter_model.bin").is_file():
            raise ValueError(
                f"{d}: only a pickled adapter_model.bin is present; sftlab loads safetensors only"
            )
        raise FileNotFoundError(f"{w_path}: no adapter weights here")
    return read_json_object(cfg_path, "adapter config"), read_safetensors(w_path)


def add_saved_module(out_dir: str | Path, prefix: str, path: str, tensors: dict[str, torch.Tensor]) -> None:
    """Add a whole module's tensors (keys "<path>.<param>") to a written adapter as a module to save: listed in
    the config's modules_to_save, stored under `prefix` + key (each method's layout: PEFT LoRA "base_model.model.",
    PEFT prompt learning "base_model.", sftlab's bottleneck adapter "modules_to_save.")."""
    config, weights = read_adapter(out_dir)
    saved = list(config.get("modules_to_save") or [])
    config["modules_to_save"] = saved + ([path] if path not in saved else [])
    write_adapter(out_dir, config, {**weights, **{prefix + k: v for k, v in tensors.items()}})
