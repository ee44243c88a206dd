"""The device a plan is for: its memory, how many, and how many FLOP/s training gets out of it.

`--device` takes `cpu` (this machine's RAM), `cpu:64GB`, `cuda` (the GPUs torch sees), `cuda:24GB`, `cuda:80GBx8`;
without it the device is detected (CUDA when torch sees one, else the CPU). Throughput, in order: `--throughput`
(sustained training TFLOP/s, stated); on this machine's CPU, its fp32 matmul peak measured now (a 1024^3 product)
times CPU_EFFICIENCY; on a GPU, the dense peak of the card from PEAK_TFLOPS (by name when detected, else by memory
size) times GPU_EFFICIENCY. On this machine's CPU the time estimates do not use that one rate: plan/timing.py
measures each kind of work (GEMMs, weight gradients, thin products, attention, elementwise ops, the optimizer) at its
own rate, and the peak stays as the line the report prints. `--measure` replaces all of these with tokens/s
measured per method.

Efficiencies: sftlab's training step ran at 86-116% of the measured fp32 matmul peak on the CPU benchmarks
(README, "Speed and memory"), so 0.8 is a slightly cautious CPU figure. sftlab does not train on GPUs yet; 0.4 is
a typical model-FLOPs utilisation of single-GPU fine-tuning in bf16 and is an assumption, not a measurement.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass

from ..errors import ConfigError

GB = 1024**3
CPU_EFFICIENCY = 0.8
GPU_EFFICIENCY = 0.4

# Dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets; fp32 (no tensor cores) in the second slot.
PEAK_TFLOPS: dict[str, tuple[float, float]] = {
    "H200": (989.0, 67.0),
    "H100": (989.0, 67.0),
    "A100": (312.0, 19.5),
    "L40S": (362.0, 91.6),
    "A10": (125.0, 31.2),
    "L4": (121.0, 30.3),
    "RTX 4090": (165.0, 82.6),
    "RTX 3090": (71.0, 35.6),
    "V100": (125.0, 15.7),
    "T4": (65.0, 8.1),
}
# A card named by its memory only: the usual card of that size.
_BY_MEMORY = [(16, "T4"), (24, "RTX 4090"), (48, "L40S"), (80, "A100"), (96, "H100"), (1e9, "H200")]


@dataclass(frozen=True)
class Device:
    kind: str  # cpu | cuda
    memory: int  # bytes per device
    count: int
    name: str  # e.g. "cpu (2 cores)", "NVIDIA A100 80GB", "cuda:24GB (taken as RTX 4090)"
    source: str  # detected | stated

    @property
    def label(self) -> str:
        n = f"{self.count}x " if self.count > 1 else ""
        return f"{n}{self.name}, {self.memory / GB:.0f} GB{' each' if self.count > 1 else ''}"


def _ram() -> int:
    """Memory this process may use: the cgroup limit when one is set, else physical RAM."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            raw = open(path).read().strip()
            if raw.isdigit() and int(raw) < 1 << 60:
                limit = int(raw)
                break
        except OSError:
            continue
    else:
        limit = 1 << 62
    return min(limit, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def detect() -> Device:
    import torch

    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        return Device("cuda", p.total_memory, torch.cuda.device_count(), p.name, "detected")
    return Device("cpu", _ram(), 1, f"cpu ({os.cpu_count()} logical cores)", "detected")


_SPEC = re.compile(r"^(cpu|cuda)(?::(\d+(?:\.\d+)?)\s*(GB|G|GiB)?(?:x(\d+))?)?$", re.IGNORECASE)


def parse(spec: str | None) -> Device:
    """`--device` -> Device; a malformed spec is a ConfigError naming the forms it takes."""
    if spec is None:
        return detect()
    m = _SPEC.match(spec.strip())
    if not m:
        raise ConfigError(
            f"--device: {spec!r} is not a device; expected cpu, cpu:64GB, cuda, cuda:24GB or cuda:80GBx8"
        )
    kind, size, _, count = m.groups()
    kind = kind.lower()
    if size is None:
        if count:
            raise ConfigError(f"--device: {spec!r}: give the memory with the count (e.g. cuda:80GBx8)")
        d = detect()
        if d.kind != kind:
            if kind == "cuda":
                raise ConfigError(
                    "--device cuda: torch sees no CUDA device here; give its memory (e.g. cuda:24GB)"
                )
            return Device("cpu", _ram(), 1, f"cpu ({os.cpu_count()} logical cores)", "detected")
        return d
    mem = int(float(size) * GB)
    if mem <= 0 or (count is not None and int(count) < 1):
        raise ConfigError(f"--device: {spec!r}: memory and count must be positive")
    name = "cpu" if kind == "cpu" else f"cuda:{size}GB (taken as {card_for(mem)})"
    return Device(kind, mem, int(count or 1), name, "stated")


def card_for(memory: int) -> str:
    return next(card for gb, card in _BY_MEMORY if memory <= gb * GB * 1.05)


def gpu_peak(device: Device, dtype: str) -> float:
    """Dense peak FLOP/s of one GPU of `device` for `dtype` (bf16/fp16 on tensor cores, else fp32)."""
    card = next((c for c in PEAK_TFLOPS if c.lower() in device.name.lower()), None) or card_for(device.memory)
    half, single = PEAK_TFLOPS[card]
    return (single if dtype == "float32" else half) * 1e12


def cpu_matmul_peak(threads: int | None = None, seconds: float = 0.3) -> float:
    """fp32 FLOP/s of a 1024^3 matmul on this CPU now (best of a few), on `threads` threads (the count training
    would take: the cores idle now) or torch's current count."""
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        n = 1024
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.mm(a, b)  # warm-up
        best, deadline = 0.0, time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            t = time.perf_counter()
            torch.mm(a, b)
            best = max(best, 2 * n**3 / (time.perf_counter() - t))
        return best
    finally:
        torch.set_num_threads(before)


@dataclass(frozen=True)
class Throughput:
    flops: float  # sustained training FLOP/s
    described: str


def throughput(
    device: Device, dtype: str, stated_tflops: float | None, threads: int | None = None
) -> Throughput:
    """Training FLOP/s for the time estimates (see the module docstring for the order)."""
    if stated_tflops is not None:
        return Throughput(stated_tflops * 1e12, f"{stated_tflops:g} TFLOP/s (--throughput)")
    if device.kind == "cpu":
        if device.source == "stated":
            return Throughput(0.0, "unknown for a stated CPU: give --throughput TFLOPS or --measure")
        peak = cpu_matmul_peak(threads)
        on = f" on {threads} thread{'s' if threads != 1 else ''}" if threads else ""
        return Throughput(
            peak * CPU_EFFICIENCY,
            f"{peak / 1e9:.0f} GFLOP/s fp32 matmul peak measured now{on} x {CPU_EFFICIENCY} (sftlab's CPU "
            "efficiency)",
        )
    peak = gpu_peak(device, dtype)
    return Throughput(
        peak * GPU_EFFICIENCY,
        f"{peak / 1e12:.0f} TFLOP/s {dtype} peak x {GPU_EFFICIENCY} (assumed utilisation)",
    )
