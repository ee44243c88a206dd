"""Thread choice under CPU contention (issue 16, item 16): threads from the CPUs free at start, a passive
OpenMP wait set before torch loads. The machine is faked: /proc/cpuinfo, /proc/stat, cgroup cpu.max."""

import os
import subprocess
import sys

import pytest

from sftlab import threads as th

CPUINFO_2 = "".join(
    f"processor\t: {i}\nvendor_id\t: AuthenticAMD\nphysical id\t: 0\ncore id\t\t: {i}\n\n" for i in range(2)
)
# 4 logical CPUs, 2 cores with two hyper-threads each (cpu 0,2 on core 0; 1,3 on core 1)
CPUINFO_HT = "".join(
    f"processor\t: {i}\nphysical id\t: 0\nsiblings\t: 4\ncore id\t\t: {i % 2}\n\n" for i in range(4)
)


def stat(*cpus: tuple[int, int]) -> str:
    """A /proc/stat text with (busy, idle) jiffies per CPU."""
    lines = [f"cpu  {sum(b for b, _ in cpus)} 0 0 {sum(i for _, i in cpus)} 0 0 0 0 0 0"]
    lines += [f"cpu{n} {b} 0 0 {i} 0 0 0 0 0 0" for n, (b, i) in enumerate(cpus)]
    return "\n".join(lines + ["intr 12345 0 0", "ctxt 999", "btime 1700000000"]) + "\n"


def machine(cpuinfo: str, before: str, after: str, cpu_max: str | None = None):
    """choose_threads' keyword arguments for a fake machine whose /proc/stat reads `before`, then `after`."""
    stats = iter([before, after])

    def read(path: str):
        return cpuinfo if path == "/proc/cpuinfo" else next(stats)

    return {"read": read, "cpu_max": lambda: cpu_max, "sleep": lambda s: None}


def choose(requested, cpuinfo, before, after, usable, cpu_max=None):
    logs = []
    n = th.choose_threads(requested, logs.append, usable=usable, **machine(cpuinfo, before, after, cpu_max))
    return n, logs[0]


def test_an_idle_machine_gets_every_physical_core():
    n, msg = choose(None, CPUINFO_2, stat((100, 900), (100, 900)), stat((101, 919), (101, 919)), {0, 1})
    assert n == 2
    assert msg.startswith("threads: 2 of 2 physical cores (1.9 CPUs idle at start)")


def test_busy_cores_are_left_to_the_processes_holding_them():
    # cpu0 fully busy over the sample, cpu1 80% busy: 0.2 CPUs idle -> 1 thread, never 0
    n, msg = choose(None, CPUINFO_2, stat((100, 900), (100, 900)), stat((120, 900), (116, 904)), {0, 1})
    assert n == 1
    assert "0.2 CPUs idle" in msg and "train.threads overrides" in msg


def test_one_core_held_by_another_process_gives_one_thread():
    n, _ = choose(None, CPUINFO_2, stat((0, 0), (0, 0)), stat((20, 0), (1, 19)), {0, 1})
    assert n == 1


def test_hyperthreads_count_once_and_idle_siblings_do_not_add_threads():
    idle4 = stat((0, 20), (0, 20), (0, 20), (0, 20))
    n, msg = choose(None, CPUINFO_HT, stat((0, 0), (0, 0), (0, 0), (0, 0)), idle4, {0, 1, 2, 3})
    assert n == 2 and "of 2 physical cores" in msg


def test_only_cpus_in_the_affinity_mask_count():
    # 4 idle cores, but this process may run on cpus 2 and 3 only; cpus 0 and 1 being idle must not count
    info = "".join(f"processor\t: {i}\nphysical id\t: 0\ncore id\t\t: {i}\n\n" for i in range(4))
    before = stat((0, 0), (0, 0), (0, 0), (0, 0))
    n, _ = choose(None, info, before, stat((0, 20), (0, 20), (20, 0), (0, 20)), {2, 3})
    assert n == 1  # cpu2 busy, cpu3 idle


def test_a_cgroup_quota_caps_the_threads():
    info = "".join(f"processor\t: {i}\nphysical id\t: 0\ncore id\t\t: {i}\n\n" for i in range(8))
    zeros, idle = stat(*[(0, 0)] * 8), stat(*[(0, 20)] * 8)
    n, msg = choose(None, info, zeros, idle, set(range(8)), cpu_max="200000 100000\n")
    assert n == 2 and "cgroup quota 2 CPUs" in msg
    assert choose(None, info, zeros, idle, set(range(8)), cpu_max="max 100000\n")[0] == 8


def test_explicit_threads_win_and_nothing_is_sampled():
    def read(path):
        raise AssertionError(f"read {path}")

    logs = []
    assert th.choose_threads(3, logs.append, read=read, cpu_max=lambda: None, sleep=read) == 3
    assert logs[0].startswith("threads: 3 (train.threads)")


def test_unreadable_proc_falls_back_to_the_usable_cpus():
    logs = []
    n = th.choose_threads(None, logs.append, read=lambda p: None, cpu_max=lambda: None, usable={0, 1, 2})
    assert n == 3 and "idle CPUs unknown" in logs[0]


@pytest.mark.parametrize(
    "text, want",
    [("200000 100000", 2.0), ("150000 100000", 1.5), ("max 100000", None), ("", None), ("x y", None)],
)
def test_cgroup_cpu_max(text, want):
    assert th.cgroup_cpu_limit(text) == want


def test_the_wait_policy_is_passive_unless_the_user_chose_one():
    env = {}
    th.set_wait_policy(env)
    assert env["OMP_WAIT_POLICY"] == "PASSIVE"
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    th.set_wait_policy(env)
    assert env["OMP_WAIT_POLICY"] == "ACTIVE"


def test_the_cli_sets_the_wait_policy_before_torch_loads():
    """OpenMP reads OMP_WAIT_POLICY once, when torch loads it: the CLI must set it before any import of torch."""
    code = (
        "import os, sys\n"
        "import sftlab.cli.main as m\n"
        "seen = {}\n"
        "class Hook:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' and 'torch' not in seen:\n"
        "            seen['torch'] = os.environ.get('OMP_WAIT_POLICY')\n"
        "        return None\n"
        "sys.meta_path.insert(0, Hook())\n"
        "try:\n"
        "    m.main(['train', '--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "import torch\n"
        "print('policy at torch import:', seen.get('torch'))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert "policy at torch import: PASSIVE" in out.stdout, out.stdout + out.stderr


def test_training_logs_its_thread_choice(tmp_path):
    import torch
    from helpers import make_config

    from sftlab.recipe import train

    before = torch.get_num_threads()
    logs = []
    try:
        train(make_config(tmp_path, "tiny-llama", train={"threads": None, "max_steps": 1}), log=logs.append)
        chosen = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    line = next(m for m in logs if m.startswith("threads: "))
    assert line.startswith(f"threads: {chosen} of ") and "OpenMP wait policy" in line
