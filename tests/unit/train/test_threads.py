"""Thread choice under CPU contention (issue 16, item 16): threads from the cores other processes leave free, at
start and while training. The machine is faked: /proc/cpuinfo, /proc/stat, cgroup cpu.max, clocks."""

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
    assert "train.threads fixes it" in msg


def test_busy_cores_are_left_to_the_processes_holding_them():
    # cpu0 fully busy over the sample, cpu1 80% busy: 0.2 CPUs idle -> 1 thread, never 0
    n, msg = choose(None, CPUINFO_2, stat((100, 900), (100, 900)), stat((120, 900), (116, 904)), {0, 1})
    assert n == 1
    assert "0.2 CPUs idle" in msg and "other processes hold the rest" in msg


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
    assert line.startswith(f"threads: {chosen} of ") and "physical cores" in line


def test_a_core_counts_as_free_when_three_quarters_of_it_is():
    assert [th.fit_threads(f, 2) for f in (0.0, 0.7, 1.0, 1.74, 1.76, 2.0, 5.0)] == [1, 1, 1, 1, 2, 2, 2]


class FakeMachine:
    """2 cores; each `tick(seconds, ours, others)` advances the clock, /proc/stat and this process's CPU time."""

    def __init__(self):
        self.t, self.mine, self.busy, self.idle = 0.0, 0.0, [0, 0], [0, 0]

    def tick(self, seconds: float, ours: float, others: float) -> None:
        """`ours`/`others`: CPU-equivalents used over the interval (of 2)."""
        self.t += seconds
        self.mine += ours * seconds
        used = min(2.0, ours + others)
        for c in range(2):  # spread evenly over both CPUs, in jiffies (100/s)
            self.busy[c] += round(100 * seconds * used / 2)
            self.idle[c] += round(100 * seconds * (2 - used) / 2)

    def watch(self, threads: int) -> th.LoadWatch:
        def read(path):
            return CPUINFO_2 if path == "/proc/cpuinfo" else stat(*zip(self.busy, self.idle))

        return th.LoadWatch(
            threads, usable={0, 1}, read=read, cpu_max=lambda: None, clock=lambda: self.t,
            cpu_seconds=lambda: self.mine,
        )  # fmt: skip


def test_the_watch_drops_threads_at_once_when_other_processes_take_a_core():
    m = FakeMachine()
    w = m.watch(2)
    m.tick(1.0, ours=2.0, others=0.0)
    assert w.check() is None  # too soon to look
    m.tick(2.5, ours=2.0, others=0.0)
    assert w.check() is None  # all the busy time is ours: nothing to change
    m.tick(3.0, ours=0.6, others=1.4)  # spinning processes arrive; ours is whatever share is left
    n, others = w.check()
    assert n == 1 and others == pytest.approx(1.4, abs=0.05)
    assert w.threads == 1


def test_the_watch_adds_threads_back_only_when_two_checks_agree():
    m = FakeMachine()
    w = m.watch(1)
    m.tick(3.0, ours=1.0, others=1.0)
    assert w.check() is None  # one core is taken: stay at 1
    m.tick(3.0, ours=1.0, others=0.0)
    assert w.check() is None  # free now, but one check is not enough
    m.tick(3.0, ours=1.0, others=0.9)
    assert w.check() is None  # busy again: the pending raise is dropped
    m.tick(3.0, ours=1.0, others=0.0)
    assert w.check() is None
    m.tick(3.0, ours=1.0, others=0.1)
    assert w.check() == (2, pytest.approx(0.1, abs=0.05))


class ScriptedWatch:
    """A LoadWatch that asks for a change at the given steps."""

    every_s, usable = 3.0, {0, 1}

    def __init__(self, threads, script):
        self.script, self.calls = dict(script), 0

    def check(self):
        self.calls += 1
        return self.script.get(self.calls)


def _fit(tmp_path, threads, script):
    import torch
    from helpers import make_config

    from sftlab.recipe import prepare
    from sftlab.train.callbacks import ThreadsCallback
    from sftlab.train.loop import Trainer

    cfg = make_config(tmp_path, "tiny-llama", train={"max_steps": 4, "threads": threads})
    model, tok, data, _ = prepare(cfg, log=lambda *_: None)
    (tmp_path / "run").mkdir()
    logs, seen = [], []
    before = torch.get_num_threads()
    cb = ThreadsCallback(threads, watch_factory=lambda n: ScriptedWatch(n, script))
    spy = type(
        "Spy", (ThreadsCallback,), {"on_step_end": lambda self, tr, r: seen.append(torch.get_num_threads())}
    )
    trainer = Trainer(
        model=model, cfg=cfg.train, task="causal-lm", train_examples=data.examples, pad_id=tok.pad_token_id,
        run_dir=tmp_path / "run", log=logs.append, callbacks=[cb, spy(None)],
    )  # fmt: skip
    torch.set_num_threads(2)
    try:
        trainer.fit()
    finally:
        torch.set_num_threads(before)
    return logs, seen, cb


def test_training_follows_the_watch_when_threads_are_unset(tmp_path):
    logs, seen, _ = _fit(tmp_path, None, {2: (1, 1.4)})
    assert seen == [2, 1, 1, 1]  # after step 2's check, the rest of the run has 1 thread
    assert any(m.startswith("threads: 2 -> 1 (other processes used 1.4 CPUs") for m in logs)


def test_a_set_thread_count_is_never_changed(tmp_path):
    logs, seen, cb = _fit(tmp_path, 2, {1: (1, 1.4)})
    assert cb.watch is None and seen == [2, 2, 2, 2]
    assert not any("->" in m for m in logs)


def test_the_trainer_watches_the_load_by_default():
    from sftlab.config import TrainConfig
    from sftlab.train.callbacks import ThreadsCallback
    from sftlab.train.loop import default_callbacks

    cbs = default_callbacks(TrainConfig(output_dir="x", max_steps=1))
    assert [c.threads for c in cbs if isinstance(c, ThreadsCallback)] == [None]
