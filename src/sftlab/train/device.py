"""Where a run trains and in which precision: `train.device` and `train.precision`, resolved once per run.

Why one place: the model, the method's parameters, every batch, the optimizer state and the loss all have to agree
on a device and on who computes in which dtype. The rules:

- device `auto` is CUDA when torch sees a GPU, else the CPU; `cuda`/`cuda:N`/`mps` that torch does not see are a
  ConfigError naming the key. Checkpoints are written from CPU copies and read back onto this device, so a run
  saved on a GPU resumes on a CPU and the other way round.
- fp32: nothing changes (the default: bit-identical to a run before devices existed).
- bf16-mixed / fp16-mixed: the forward runs under `torch.autocast`; the weights, the trainable parameters
  (LoRA/adapter/prefix, or all of them for full fine-tuning) and the optimizer state stay fp32 (the "master
  weights"). fp16 needs a gradient scaler (loss scaled up, gradients unscaled before clipping, steps with inf
  skipped) and is CUDA-only: CPU autocast has no fp16 path worth taking.
- bf16: the whole model in bf16, optimizer state too; full fine-tuning only (config.py refuses it otherwise).
- The CPU-only speed levers of `perf:` (oneDNN GEMMs, glibc malloc tuning) are switched off off-CPU, and the
  oneDNN GEMMs also under autocast (their autograd node would bypass it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ..config import PerfConfig
from ..errors import ConfigError
from ..models import warn_slow_half

PRECISIONS = ("fp32", "bf16-mixed", "fp16-mixed", "bf16")
_AUTOCAST = {"bf16-mixed": torch.bfloat16, "fp16-mixed": torch.float16}


def resolve_device(name: str, local_rank: int | None = None) -> torch.device:
    """`train.device` as a torch.device; `local_rank` (torchrun's LOCAL_RANK) picks the GPU of a process under
    torchrun when the config says just `cuda` or `auto`."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"train.device: {name!r}, but torch sees no CUDA device (torch {torch.__version__}); "
                "use train.device: cpu or auto"
            )
        if name == "cuda" and local_rank is not None:
            name = f"cuda:{local_rank}"
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(
                f"train.device: {name!r}, but torch sees {torch.cuda.device_count()} CUDA device(s) (0-based)"
            )
        return dev
    if name == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ConfigError(
            "train.device: 'mps', but torch sees no Apple GPU here; use train.device: cpu or auto"
        )
    return torch.device(name)


def place(
    model: nn.Module, device: str, precision: str, perf: PerfConfig, local_rank: int | None = None
) -> tuple[Precision, PerfConfig]:
    """A run's `train.device` / `train.precision`, set up once: the model moved (pure bf16: cast) before the optimizer
    sees its parameters, and `perf` with the levers that do not apply on this device or under autocast off. The
    device is the returned Precision's."""
    prec = Precision(precision, resolve_device(device, local_rank))
    prec.prepare(model)
    return prec, prec.perf(perf)


def usable_device(name: str) -> torch.device:
    """`train.device` for using a trained run (eval, generate, merge): the device it names when this machine has it,
    else the CPU (a run trained on a GPU is still usable here)."""
    try:
        return resolve_device(name)
    except ConfigError:
        return torch.device("cpu")


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The batch's tensors on `device` (the same dict when they are there already: the CPU path copies nothing)."""
    if all(not torch.is_tensor(v) or v.device == device for v in batch.values()):
        return batch
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def module_device(module: nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@dataclass
class Precision:
    """train.precision on a resolved device: `prepare` the model, run forwards inside `autocast()`, and step
    through `backward`/`step` (the gradient scaler of fp16-mixed lives here)."""

    mode: str
    device: torch.device

    def __post_init__(self) -> None:
        if self.mode not in PRECISIONS:
            raise ConfigError(f"train.precision: {self.mode!r} is not one of {', '.join(PRECISIONS)}")
        if self.mode == "fp16-mixed" and self.device.type != "cuda":
            raise ConfigError(
                f"train.precision: fp16-mixed needs a CUDA device (its gradient scaler and fp16 kernels); this run "
                f"is on {self.device.type}: use bf16-mixed or fp32"
            )
        if self.mode in ("bf16-mixed", "bf16") and self.device.type == "cpu":
            warn_slow_half(f"train.precision={self.mode}", stacklevel=4)
        self.scaler = torch.amp.GradScaler("cuda") if self.mode == "fp16-mixed" else None

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return _AUTOCAST.get(self.mode)

    def prepare(self, model: nn.Module) -> None:
        """Move the model to the device; pure bf16 casts it (weights and, through them, the optimizer state)."""
        if module_device(model) != self.device:
            model.to(self.device)
        if self.mode == "bf16":
            model.to(torch.bfloat16)

    def perf(self, perf: PerfConfig) -> PerfConfig:
        """`perf` with the levers that do not apply here off: oneDNN's fp32 GEMMs need fp32 on the CPU without
        autocast (their own autograd node would bypass it)."""
        if perf.onednn_gemm and (self.device.type != "cpu" or self.mode != "fp32"):
            return perf.model_copy(update={"onednn_gemm": False})
        return perf

    @property
    def malloc(self) -> bool:
        """glibc allocator tuning (perf.malloc_*) is about CPU activations."""
        return self.device.type == "cpu"

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        dtype = self.autocast_dtype
        if dtype is None:
            yield
            return
        with torch.autocast(self.device.type, dtype=dtype):
            yield

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """Before clipping: the gradients at their true scale."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(optimizer)  # skipped when a gradient is inf/nan (the scale then shrinks)
        self.scaler.update()

    def state_dict(self) -> dict | None:
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_state_dict(self, state: dict | None) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
