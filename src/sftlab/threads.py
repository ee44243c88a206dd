"""How many CPU threads training uses: the physical cores that other processes leave free, then and later.

Why: torch runs an op's parallel region on all its threads, and the op ends when the last one arrives; GNU
OpenMP's idle threads spin ~300k iterations (a few ms) before they sleep. With as many threads as cores while
other processes hold those cores, every region waits for a thread the kernel has descheduled, and the waiting
threads spin away the CPU share the late one needs: on 2 cores beside 4 spinning processes a tiny-llama run
got ~700 tokens per CPU-second instead of ~5,000-30,000, so it fell 14x (from an already contended 3,600 tok/s)
to 100x+ (from near idle), not by its lost CPU share (benchmarks/README.md, "CPU contention"). One thread has no
regions to wait at. A passive OpenMP wait (`OMP_WAIT_POLICY=PASSIVE`) also cures it, but measured 11-45% slower
on the 58M benchmark model when nothing else runs (every region then pays a wake-up), so sftlab leaves the
policy alone (a user's OMP_WAIT_POLICY still applies) and follows the load instead:

- at start (`choose_threads`): the usable physical cores (affinity, a cgroup CPU quota), no more than were idle
  over a 0.2 s sample of /proc/stat;
- while training (`LoadWatch`, every 3 s at a step's end): the cores other processes left free since the last
  check (all CPU time on the usable CPUs minus this process's own). Fewer threads at once, more only when two
  checks in a row agree.
A core counts as free when three quarters of it is. `train.threads` fixes the count instead: use it where a run
must be bit-reproducible, since a large reduction's rounding depends on the thread count.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path

SAMPLE_S = 0.2  # the start sample
CHECK_EVERY_S = 3.0  # the load check while training
FREE_SHARE = 0.75  # a core is free when this much of it is idle


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
    """This process's cgroup CPU quota as cgroup v2's "quota period" (its own group's, else the root's)."""
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


def _own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


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


def fit_threads(free: float, cores: int) -> int:
    """Threads for `free` idle CPU-equivalents: whole cores at least FREE_SHARE free, at least 1."""
    return max(1, min(cores, math.floor(free + 1 - FREE_SHARE)))


def usable_cores(
    usable: set[int] | None = None,
    read: Callable[[str], str | None] = _read,
    cpu_max: Callable[[], str | None] = _own_cpu_max,
) -> tuple[int, float | None]:
    """(physical cores this process may use, the cgroup quota in CPUs or None)."""
    cpus = usable if usable is not None else usable_cpus()
    cores = physical_cores(read("/proc/cpuinfo"), cpus)
    limit = cgroup_cpu_limit(cpu_max())
    if limit is not None:
        cores = max(1, min(cores, math.ceil(limit - 0.05)))  # 2.0 CPUs -> 2, 1.5 -> 2, 0.5 -> 1
    return cores, limit


def choose_threads(
    requested: int | None,
    log: Callable[[str], None] = print,
    *,
    read: Callable[[str], str | None] = _read,
    cpu_max: Callable[[], str | None] = _own_cpu_max,
    usable: set[int] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Threads to start training with: `requested` if set, else the usable physical cores idle now. Logs the
    choice and why. The keyword arguments are the machine (for tests)."""
    if requested:
        log(f"threads: {requested} (train.threads)")
        return requested
    cpus = usable if usable is not None else usable_cpus()
    cores, limit = usable_cores(cpus, read, cpu_max)
    before = read("/proc/stat")
    sleep(SAMPLE_S)
    after = read("/proc/stat")
    free = idle_cpus(before, after, cpus) if before and after else None
    threads = cores if free is None else fit_threads(free, cores)
    why = f"{free:.1f} CPUs idle at start" if free is not None else "idle CPUs unknown"
    if threads < cores:
        why += "; other processes hold the rest"
    quota = f", cgroup quota {limit:g} CPUs" if limit is not None else ""
    log(
        f"threads: {threads} of {cores} physical cores{quota} ({why}); "
        f"rechecked every {CHECK_EVERY_S:g} s, train.threads fixes it"
    )
    return threads


class LoadWatch:
    """While training: how many threads the cores that other processes leave free allow, checked every
    `every_s` seconds. `check()` returns (threads, CPUs other processes used) when the count should change."""

    def __init__(
        self,
        threads: int,
        *,
        usable: set[int] | None = None,
        every_s: float = CHECK_EVERY_S,
        read: Callable[[str], str | None] = _read,
        cpu_max: Callable[[], str | None] = _own_cpu_max,
        clock: Callable[[], float] = time.monotonic,
        cpu_seconds: Callable[[], float] = _own_cpu_seconds,
    ):
        self.threads = threads
        self.usable = usable if usable is not None else usable_cpus()
        self.cores, _ = usable_cores(self.usable, read, cpu_max)
        self.every_s, self.read, self.clock, self.cpu_seconds = every_s, read, clock, cpu_seconds
        self._last = (clock(), read("/proc/stat"), cpu_seconds())
        self._pending: int | None = None  # a higher count one check has asked for

    def check(self) -> tuple[int, float] | None:
        now = self.clock()
        t0, stat0, mine0 = self._last
        if now - t0 < self.every_s:
            return None
        stat, mine = self.read("/proc/stat"), self.cpu_seconds()
        self._last = (now, stat, mine)
        idle = idle_cpus(stat0, stat, self.usable) if stat0 and stat else None
        if idle is None:
            return None
        busy = len(self.usable) - idle  # CPU-equivalents busy on our CPUs, this process included
        others = max(0.0, busy - (mine - mine0) / (now - t0))
        want = fit_threads(self.cores - others, self.cores)
        if want > self.threads and self._pending != want:
            self._pending = want  # more threads only when the next check agrees
            return None
        self._pending = None
        if want == self.threads:
            return None
        self.threads = want
        return want, others
