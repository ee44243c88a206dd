"""Atomic, verified, pickle-free checkpoints: trainable weights, optimizer, scheduler, RNG and data position.

A checkpoint is written into `checkpoints/.tmp-step-N/` and renamed to `step-N/` only when complete, so a
crash, kill -9 or Ctrl-C never leaves a half-written checkpoint that resume would pick up; leftover `.tmp-*`
dirs are removed when a run (re)starts. Tensors go to safetensors; scalars and positions to JSON. The last file
written is `checksums.json` (sha256 of every other file), and a checkpoint whose weights or optimizer state are
not finite is never written.

Resume reads the newest checkpoint that verifies (checksums, readable files, finite tensors) and says why it
passed over newer ones; checkpoints from before checksums existed are read without that check, with a note.
A Ctrl-C while a checkpoint is written lets the write finish (a second one abandons it).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes
from torch import nn

from ..errors import CheckpointError
from .distributed import full, like

STATE_FILE = "trainer_state.json"
WEIGHTS_FILE = "trainable.safetensors"
OPTIM_FILE = "optimizer.safetensors"
CHECKSUMS_FILE = "checksums.json"  # written last: {"sha256": {file name: hex digest}}
FILES = (WEIGHTS_FILE, OPTIM_FILE, STATE_FILE)
TMP_PREFIX = ".tmp-"  # .tmp-step-N (being written), .tmp-old-step-N (being replaced)
_STEP_DIR = re.compile(r"step-(\d+)")


class NonFiniteCheckpoint(CheckpointError):
    """The weights or optimizer state to be saved hold NaN/inf: the run has diverged."""


# -- tensors <-> files --------------------------------------------------------------------------------------


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    # Sorted: FSDP2 gathers each tensor (a collective), so the order must be the same on every rank, and a state
    # loaded from safetensors comes back in no particular order.
    for idx in sorted(sd["state"]):
        st = sd["state"][idx]
        for k in sorted(st):
            v = st[k]
            if torch.is_tensor(v):  # FSDP2: the whole tensor from the shards
                tensors[f"{idx}.{k}"] = full(v.detach()).cpu().contiguous().clone()
            else:
                scalars.setdefault(str(idx), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    params = [p for g in opt.param_groups for p in g["params"]]  # state_dict's indices, in order
    for key, v in tensors.items():
        idx, _, name = key.partition(".")
        ref = params[int(idx)] if int(idx) < len(params) and v.dim() else None
        state.setdefault(int(idx), {})[name] = (
            like(v, ref) if ref is not None else v
        )  # FSDP2: this rank's shard
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


def non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding a NaN or inf. One sum per tensor (a non-finite element makes
    it non-finite); only a sum that overflowed is looked at element by element."""
    bad = []
    for name, t in tensors.items():
        if t.is_floating_point() and t.numel():
            if not bool(torch.isfinite(t.sum())) and not bool(torch.isfinite(t).all()):
                bad.append(name)
    return bad


def _write(path: Path, data: bytes) -> str:
    """Write and fsync `data`; return its sha256."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return hashlib.sha256(data).hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def step_of(path: Path) -> int:
    return int(path.name.split("-")[1])


# -- writing ------------------------------------------------------------------------------------------------


def save_checkpoint(
    ckpt_root: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    trainer_state: dict,
    keep_last: int,
    write: bool = True,
) -> Path:
    """Write `step-N/` atomically and prune to `keep_last`; refuse (NonFiniteCheckpoint) when a weight or optimizer
    tensor is not finite, so a kept checkpoint is always one training can continue from. `write=False` (ranks
    other than 0 of a distributed run) gathers and checks the same tensors and writes nothing."""
    weights = {n: full(p.detach()).cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    opt_tensors, opt_meta = _optimizer_tensors(optimizer)
    bad = non_finite(weights) + non_finite(opt_tensors)
    if bad:
        raise NonFiniteCheckpoint(
            f"not writing checkpoint step-{step}: {len(bad)} tensors hold NaN/inf (e.g. {', '.join(bad[:3])})"
        )
    final = ckpt_root / f"step-{step}"
    if not write:
        return final
    opt_tensors["__rng_torch"] = torch.get_rng_state()
    state = dict(trainer_state)
    state.update(
        step=step,
        optimizer=opt_meta,
        scheduler=scheduler.state_dict(),
        rng_python=_jsonable(random.getstate()),
    )
    ckpt_root.mkdir(parents=True, exist_ok=True)
    tmp = ckpt_root / f"{TMP_PREFIX}step-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        sums = {
            WEIGHTS_FILE: _write(tmp / WEIGHTS_FILE, save_bytes(weights)),
            OPTIM_FILE: _write(tmp / OPTIM_FILE, save_bytes(opt_tensors)),
            STATE_FILE: _write(tmp / STATE_FILE, json.dumps(state).encode()),
        }
        _write(tmp / CHECKSUMS_FILE, json.dumps({"sha256": sums}, indent=1).encode())
        _fsync_dir(tmp)
        if final.exists():  # never a moment with neither the old nor the new step-N complete under its name
            old = ckpt_root / f"{TMP_PREFIX}old-step-{step}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(ckpt_root)
    except BaseException:  # an error, or a second Ctrl-C that abandons the save: leave no partial directory
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune_checkpoints(ckpt_root, keep_last)
    return final


@contextmanager
def sigint_deferred(name: str) -> Iterator[Callable[[], bool]]:
    """While a checkpoint is written, a first Ctrl-C only says so and the write finishes; a second one abandons it
    (KeyboardInterrupt). Yields a function telling whether Ctrl-C was pressed, so the caller can stop afterwards.
    Outside the main thread (no signal handlers there) it changes nothing."""
    pressed: list[int] = []
    if threading.current_thread() is not threading.main_thread() or not callable(
        signal.getsignal(signal.SIGINT)
    ):
        yield lambda: False
        return

    def handler(signum, frame):
        pressed.append(signum)
        if len(pressed) > 1:
            raise KeyboardInterrupt
        # os.write, not print: a handler may run in the middle of another print to the same stream
        os.write(2, f"\nsaving checkpoint {name}, press Ctrl-C again to abandon it\n".encode())

    old = signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: bool(pressed)
    finally:
        signal.signal(signal.SIGINT, old)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, tuple):
        return [_jsonable(x) for x in obj]
    return obj


def _tuplify(obj: Any) -> Any:
    if isinstance(obj, list):
        return tuple(_tuplify(x) for x in obj)
    return obj


# -- the checkpoints directory ------------------------------------------------------------------------------


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Every complete `step-N/` (only ever made by renaming a finished write), oldest first."""
    if not ckpt_root.is_dir():
        return []
    done = [p for p in ckpt_root.iterdir() if p.is_dir() and _STEP_DIR.fullmatch(p.name)]
    return sorted(done, key=step_of)


def prune_checkpoints(ckpt_root: Path, keep_last: int) -> None:
    for p in list_checkpoints(ckpt_root)[:-keep_last]:
        shutil.rmtree(p, ignore_errors=True)


def remove_partial(ckpt_root: Path) -> list[Path]:
    """Remove what an interrupted write left (`.tmp-*`); returns what was removed."""
    if not ckpt_root.is_dir():
        return []
    gone = [p for p in ckpt_root.iterdir() if p.name.startswith(TMP_PREFIX)]
    for p in gone:
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    return gone


# -- reading ------------------------------------------------------------------------------------------------


@dataclass
class Checkpoint:
    """A checkpoint read and verified, not yet applied to a model."""

    path: Path
    state: dict
    weights: dict[str, torch.Tensor]
    optim: dict[str, torch.Tensor]
    note: str | None = None  # e.g. written before checksums existed

    @property
    def step(self) -> int:
        return int(self.state["step"])


def read_checkpoint(path: Path) -> Checkpoint:
    """Read `path` and check it: checksums (when it has them), files that parse, the step its name says, finite
    tensors. Raises CheckpointError naming the file and what is wrong with it."""
    sums_path = path / CHECKSUMS_FILE
    sums: dict[str, str] | None = None
    if sums_path.exists():
        try:
            sums = json.loads(sums_path.read_text())["sha256"]
            if not isinstance(sums, dict) or set(FILES) - set(sums):
                raise ValueError(f"expected sha256 entries for {', '.join(FILES)}")
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{sums_path}: unreadable ({e})") from None
    raw: dict[str, bytes] = {}
    for name in FILES:
        f = path / name
        try:
            raw[name] = f.read_bytes()
        except OSError as e:
            raise CheckpointError(f"{f}: missing or unreadable ({e.strerror or e})") from None
        if sums is not None and hashlib.sha256(raw[name]).hexdigest() != sums[name]:
            raise CheckpointError(
                f"{f}: sha256 does not match {CHECKSUMS_FILE} (the file changed after it was written)"
            )
    try:
        state = json.loads(raw[STATE_FILE])
        if not isinstance(state, dict):
            raise ValueError("expected a JSON object")
        missing = [k for k in ("step", "optimizer", "scheduler", "rng_python") if k not in state]
        if missing:
            raise ValueError(f"missing {', '.join(missing)}")
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path / STATE_FILE}: not a valid trainer state ({e})") from None
    if state["step"] != step_of(path):
        raise CheckpointError(
            f"{path / STATE_FILE}: step is {state['step']!r}, the directory says {step_of(path)}"
        )
    tensors = {}
    for name in (WEIGHTS_FILE, OPTIM_FILE):
        try:
            tensors[name] = load_bytes(raw[name])
        except Exception as e:  # safetensors raises its own error type for a truncated/garbled header
            raise CheckpointError(f"{path / name}: not a readable safetensors file ({e})") from None
        bad = non_finite(tensors[name])
        if bad:
            raise CheckpointError(
                f"{path / name}: {len(bad)} tensors hold NaN/inf (e.g. {', '.join(bad[:3])})"
            )
    if "__rng_torch" not in tensors[OPTIM_FILE]:
        raise CheckpointError(f"{path / OPTIM_FILE}: no __rng_torch entry")
    note = (
        None
        if sums is not None
        else f"{path.name} has no {CHECKSUMS_FILE} (an older sftlab wrote it); not verified"
    )
    return Checkpoint(path, state, tensors[WEIGHTS_FILE], tensors[OPTIM_FILE], note)


def newest_good(
    ckpt_root: Path, log: Callable[[str], None] | None = None
) -> tuple[Checkpoint | None, list[str]]:
    """The newest checkpoint that verifies, and why each newer one did not (also logged when `log` is given)."""
    rejected: list[str] = []
    for path in reversed(list_checkpoints(ckpt_root)):
        try:
            return read_checkpoint(path), rejected
        except CheckpointError as e:
            rejected.append(str(e))
            if log:
                log(f"warning: skipping checkpoint {path.name}: {e}")
    return None, rejected


def apply_checkpoint(
    ckpt: Checkpoint,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> dict:
    """Restore weights, optimizer, scheduler and RNG in place; return the trainer state (step, data position...).
    A checkpoint that does not fit this model (the config changed) raises CheckpointError."""
    path, weights = ckpt.path, ckpt.weights
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
    unexpected = [n for n in weights if n not in params]
    shapes = [
        f"{n} {tuple(t.shape)} vs {tuple(params[n].shape)}"
        for n, t in weights.items()
        if n in params and t.shape != params[n].shape
    ]
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"{path}: checkpoint does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]}"
            + (f", shapes {shapes[:3]}" if shapes else "")
            + "); was the config changed since the run started?"
        )
    optim = dict(ckpt.optim)
    rng = optim.pop("__rng_torch")
    with torch.no_grad():
        for n, t in weights.items():
            params[n].copy_(like(t, params[n]))  # FSDP2: this rank's shard of the whole tensor
    try:
        _load_optimizer(optimizer, optim, ckpt.state["optimizer"])
        scheduler.load_state_dict(ckpt.state["scheduler"])
        torch.set_rng_state(rng)
        random.setstate(_tuplify(ckpt.state["rng_python"]))
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise CheckpointError(
            f"{path}: the optimizer/scheduler state does not fit this run ({e}); was the config changed?"
        ) from None
    return ckpt.state


def load_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> dict:
    """Verify `path` and restore it in place; return the trainer state."""
    return apply_checkpoint(read_checkpoint(path), model, optimizer, scheduler)
