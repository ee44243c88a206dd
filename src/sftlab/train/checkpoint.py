"""Atomic, pickle-free checkpoints: trainable weights, optimizer, scheduler, RNG and data position.

A checkpoint is written into `checkpoints/.tmp-step-N/` and renamed to `step-N/` only when complete, so a
crash or Ctrl-C never leaves a half-written checkpoint that resume would pick up. Tensors go to
safetensors; scalars and positions to JSON.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

STATE_FILE = "trainer_state.json"
WEIGHTS_FILE = "trainable.safetensors"
OPTIM_FILE = "optimizer.safetensors"


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{idx}.{k}"] = v.detach().contiguous().clone()
            else:
                scalars.setdefault(str(idx), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        idx, _, name = key.partition(".")
        state.setdefault(int(idx), {})[name] = v
    for idx, kv in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(kv)
    # The implementation flags are this run's choice (perf.fused_optimizer), not the checkpoint's: load_state_dict
    # would otherwise bring back whichever kernel wrote the checkpoint.
    impl = ("fused", "foreach", "capturable", "differentiable")
    groups = [
        {**g, **{k: cur[k] for k in impl if k in cur}}
        for g, cur in zip(meta["param_groups"], opt.param_groups)
    ]
    opt.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(
    ckpt_root: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    trainer_state: dict,
    keep_last: int,
) -> Path:
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step-{step}"
    tmp = ckpt_root / f".tmp-step-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    weights = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    save_file(weights, str(tmp / WEIGHTS_FILE))
    opt_tensors, opt_meta = _optimizer_tensors(optimizer)
    opt_tensors["__rng_torch"] = torch.get_rng_state()
    save_file(opt_tensors, str(tmp / OPTIM_FILE))
    state = dict(trainer_state)
    state.update(
        step=step,
        optimizer=opt_meta,
        scheduler=scheduler.state_dict(),
        rng_python=_jsonable(random.getstate()),
    )
    with open(tmp / STATE_FILE, "w") as f:
        json.dump(state, f)
        f.flush()
        os.fsync(f.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    prune_checkpoints(ckpt_root, keep_last)
    return final


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, tuple):
        return [_jsonable(x) for x in obj]
    return obj


def _tuplify(obj: Any) -> Any:
    if isinstance(obj, list):
        return tuple(_tuplify(x) for x in obj)
    return obj


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    if not ckpt_root.is_dir():
        return []
    done = [
        p
        for p in ckpt_root.iterdir()
        if p.is_dir() and p.name.startswith("step-") and (p / STATE_FILE).exists()
    ]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def prune_checkpoints(ckpt_root: Path, keep_last: int) -> None:
    for p in list_checkpoints(ckpt_root)[:-keep_last]:
        shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> dict:
    """Restore weights, optimizer, scheduler and RNG in place; return the trainer state (step, data position...)."""
    state = json.loads((path / STATE_FILE).read_text())
    weights = load_file(str(path / WEIGHTS_FILE))
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
    unexpected = [n for n in weights if n not in params]
    if missing or unexpected:
        raise ValueError(
            f"{path}: checkpoint does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]}); "
            "was the config changed since the run started?"
        )
    with torch.no_grad():
        for n, t in weights.items():
            params[n].copy_(t)
    opt_tensors = load_file(str(path / OPTIM_FILE))
    torch.set_rng_state(opt_tensors.pop("__rng_torch"))
    _load_optimizer(optimizer, opt_tensors, state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    random.setstate(_tuplify(state["rng_python"]))
    return state
