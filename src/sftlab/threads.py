"""How many CPU threads training uses, and how torch's idle threads wait: from the CPUs actually free.

Why: torch runs an op's parallel region on all its threads and the op ends when the last one arrives. With as
many threads as cores while other processes hold those cores, every region waits for a thread the kernel has
descheduled; and GNU OpenMP's idle threads spin for a while before sleeping, taking CPU time from the very
thread they wait for. A tiny-llama run beside busy processes on 2 cores fell ~100x, not the ~3x its lost
CPU share explains (benchmarks/README.md, "CPU contention").

So sftlab
- asks OpenMP to let idle threads sleep at once (`OMP_WAIT_POLICY=PASSIVE`; GNU and Intel OpenMP both read
  it), set by the CLI before torch is imported, since OpenMP reads it once when it loads. A value already in
  the environment wins;
- when `train.threads` is unset, uses the physical cores this process may use (affinity, a cgroup CPU quota),
  but no more than were idle over a 0.2 s sample of /proc/stat at start, and at least one. The sample is taken
  once: a machine that gets busy later is left to the passive wait; `train.threads` overrides the choice.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

WAIT_POLICY = "PASSIVE"
SAMPLE_S = 0.2


def set_wait_policy(environ: dict | None = None) -> bool:
    """Idle OpenMP threads sleep instead of spinning, unless the user chose a policy. Call before torch is
    imported; returns False when torch is already loaded (the setting would come too late)."""
    env = os.environ if environ is None else environ
    env.setdefault("OMP_WAIT_POLICY", WAIT_POLICY)
    return "torch" not in sys.modules


def usable_cpus() -> set[int]:
    """CPU ids this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return set(os.sched_getaffinity(0))
    return set(range(os.cpu_count() or 1))


def physical_cores(cpuinfo: str | None, usable: set[int]) -> int:
    """Cores among `usable` CPUs, counting hyper-threads once: a second thread on a core only slows matmuls.
    `cpuinfo` is /proc/cpuinfo's text (None where there is none)."""
    cores, cpu, phys = set(), None, None
    for line in (cpuinfo or "").splitlines():
        key, _, val = (s.strip() for s in line.partition(":"))
        if key == "processor":
            cpu, phys = int(val), None
        elif key == "physical id":
            phys = val
        elif key == "core id" and cpu in usable:
            cores.add((phys, val))
    return max(1, min(len(usable), len(cores) or len(usable)))


def cgroup_cpu_limit(cpu_max: str | None) -> float | None:
    """CPUs a cgroup v2 `cpu.max` ("200000 100000" = 2 CPUs, "max 100000" = no limit) allows, or None."""
    if not cpu_max:
        return None
    parts = cpu_max.split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    try:
        quota, period = int(parts[0]), int(parts[1])
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _read(path: str | Path) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def _own_cpu_max() -> str | None:
    """This process's cgroup v2 cpu.max (its own group's, else the root's)."""
    for line in (_read("/proc/self/cgroup") or "").splitlines():
        if line.startswith("0::"):
            text = _read(Path("/sys/fs/cgroup") / line[3:].strip().lstrip("/") / "cpu.max")
            if text is not None:
                return text
    text = _read("/sys/fs/cgroup/cpu.max")
    if text is None:  # cgroup v1: the same two numbers in two files, -1 for no limit
        quota, period = (
            _read("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"),
            _read("/sys/fs/cgroup/cpu/cpu.cfs_period_us"),
        )
        if quota and period and not quota.strip().startswith("-"):
            text = f"{quota.strip()} {period.strip()}"
    return text


def cpu_times(stat: str) -> dict[int, tuple[int, int]]:
    """/proc/stat's per-CPU lines -> {cpu: (idle + iowait jiffies, all jiffies)}."""
    out = {}
    for line in stat.splitlines():
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu" or not name[3:].isdigit():
            continue
        # user nice system idle iowait irq softirq steal (guest time is already in user)
        vals = [int(v) for v in fields[:8]]
        out[int(name[3:])] = (vals[3] + (vals[4] if len(vals) > 4 else 0), sum(vals))
    return out


def idle_cpus(before: str, after: str, usable: set[int]) -> float | None:
    """CPU-equivalents idle between two /proc/stat readings, over the `usable` CPUs; None if unmeasurable."""
    a, b = cpu_times(before), cpu_times(after)
    idle = 0.0
    seen = False
    for cpu in usable:
        if cpu not in a or cpu not in b:
            continue
        d_all = b[cpu][1] - a[cpu][1]
        if d_all <= 0:
            continue
        seen = True
        idle += min(1.0, max(0.0, (b[cpu][0] - a[cpu][0]) / d_all))
    return idle if seen else None


def choose_threads(
    requested: int | None,
    log: Callable[[str], None] = print,
    *,
    read: Callable[[str], str | None] = _read,
    cpu_max: Callable[[], str | None] = _own_cpu_max,
    usable: set[int] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Threads for training: `requested` if set, else the usable physical cores that are free now. Logs the
    choice and why. The keyword arguments are the machine (for tests)."""
    policy = os.environ.get("OMP_WAIT_POLICY", "default (spin, then sleep)").lower()
    if requested:
        log(f"threads: {requested} (train.threads); OpenMP wait policy {policy}")
        return requested
    cpus = usable if usable is not None else usable_cpus()
    cores = physical_cores(read("/proc/cpuinfo"), cpus)
    limit = cgroup_cpu_limit(cpu_max())
    if limit is not None:
        cores = max(1, min(cores, math.ceil(limit - 0.05)))  # 2.0 CPUs -> 2, 1.5 -> 2, 0.5 -> 1
    before = read("/proc/stat")
    sleep(SAMPLE_S)
    after = read("/proc/stat")
    free = idle_cpus(before, after, cpus) if before and after else None
    threads = cores if free is None else max(1, min(cores, math.floor(free + 0.5)))
    why = f"{free:.1f} CPUs idle at start" if free is not None else "idle CPUs unknown"
    if threads < cores:
        why += "; other processes hold the rest, train.threads overrides"
    quota = f", cgroup quota {limit:g} CPUs" if limit is not None else ""
    log(f"threads: {threads} of {cores} physical cores{quota} ({why}); OpenMP wait policy {policy}")
    return threads
