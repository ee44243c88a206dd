"""sftlab training alone and beside busy processes: the old thread setup vs the new one (sftlab/threads.py).

Each run is its own subprocess training tiny-llama (full fine-tuning, batch 8, rows of up to 128 tokens)
through sftlab's `Trainer` for `--seconds` of training after `--warmup` steps, and prints `RESULT {json}` with
its real tokens/s. Setups (`--modes`):
  old            threads = physical cores, fixed: sftlab before issue 16
  new            what sftlab does now with train.threads unset: threads from the cores idle at start
                 (`threads.choose_threads`), then the load watch (`ThreadsCallback`, in the default callbacks)
  watch          threads = physical cores at start, then the load watch (isolates the watch; `late` tests it)
  passive        threads = physical cores, OMP_WAIT_POLICY=PASSIVE (the alternative cure, not shipped)
  one-thread     1 thread, fixed
Conditions: `alone` (whatever else the machine runs: it is reported), `busy` (`--busy` spinning Python
processes started here before the run) and `late` (the same processes started once the run has warmed up).
Within a repeat the setups alternate, their order flipping each repeat. Prints every run, then per setup the
median tokens/s per condition, busy/alone and late/alone, tokens per CPU-second the run got (flat when a run
slows only by the CPU share it lost), and each setup over old.

  python -m benchmarks.contention                                   # old vs new, 3 repeats, 4 busy processes
  python -m benchmarks.contention --modes old,new,passive,one-thread --conditions alone,busy
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODES = ("old", "new", "watch", "passive", "one-thread")
CONDITIONS = ("alone", "busy", "late")
OMP_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
WORDS = "the a model data train step loss rate token answer question of to and in is for on with".split()


def _write_data(path: Path, n: int = 256, seed: int = 0) -> None:
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            row = {
                "instruction": " ".join(rng.choices(WORDS, k=rng.randint(5, 30))),
                "input": "",
                "output": " ".join(rng.choices(WORDS, k=rng.randint(5, 40))),
            }
            f.write(json.dumps(row) + "\n")


def _idle_now(seconds: float = 0.5) -> float:
    from sftlab.threads import idle_cpus, usable_cpus

    before = Path("/proc/stat").read_text()
    time.sleep(seconds)
    return idle_cpus(before, Path("/proc/stat").read_text(), usable_cpus()) or 0.0


# -- one run (child process) ----------------------------------------------------------------------------


def child(mode: str, data: str, seconds: float, warmup: int) -> dict:
    if mode == "passive":
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"  # before torch loads: OpenMP reads it once
    import torch

    from sftlab import threads as th
    from sftlab.config import build_config
    from sftlab.recipe import prepare
    from sftlab.train.callbacks import Callback
    from sftlab.train.loop import Trainer, default_callbacks

    if mode == "new":
        n = th.choose_threads(None, log=lambda *_: None)  # as recipe.train does with train.threads unset
    elif mode == "one-thread":
        n = 1
    else:  # old, watch, passive: sftlab's choice before issue 16
        n = th.physical_cores(th._read("/proc/cpuinfo"), th.usable_cpus())
    torch.set_num_threads(n)
    start_threads = n

    tmp = Path(tempfile.mkdtemp())
    cfg = build_config(
        {
            "model": {"name": "tiny-llama", "task": "causal-lm"},
            "method": {"name": "full"},
            "data": {"train": data, "format": "alpaca", "max_length": 128},
            "train": {"output_dir": str(tmp), "max_steps": 10**6, "batch_size": 8, "lr": 1e-3,
                      "schedule": "constant", "progress": False, "log_every": 10**6,
                      "threads": None if mode in ("new", "watch") else n},
        }
    )  # fmt: skip
    model, tok, train_data, _ = prepare(cfg, log=lambda *_: None)

    class Budget(Callback):
        """Stop `seconds` after the warm-up steps; tokens/s over that window. Says WARM when the clock starts."""

        t0 = k0 = s0 = None

        def on_step_end(self, tr, result):
            if tr.state.step == warmup:
                print("WARM", flush=True)
                self.t0, self.k0, self.s0 = time.perf_counter(), tr.state.tokens, tr.state.step
            elif self.t0 is not None and time.perf_counter() - self.t0 >= seconds:
                dt = time.perf_counter() - self.t0
                self.result = {
                    "tokens_per_s": (tr.state.tokens - self.k0) / dt,
                    "steps": tr.state.step - self.s0,
                }
                tr.should_stop = True

    budget = Budget()
    changes: list[str] = []
    trainer = Trainer(
        model=model, cfg=cfg.train, task="causal-lm", train_examples=train_data.examples,
        pad_id=tok.pad_token_id, run_dir=tmp, log=changes.append,
        callbacks=[*default_callbacks(cfg.train), budget],
    )  # fmt: skip
    cpu0 = os.times()
    trainer.fit()
    cpu1 = os.times()
    return {
        "mode": mode,
        "threads": start_threads,
        "threads_end": torch.get_num_threads(),
        "changes": [c for c in changes if c.startswith("threads:")],
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
        "tokens_per_s": round(budget.result["tokens_per_s"], 1),
        "steps": budget.result["steps"],
        "cpu_s": round(cpu1.user - cpu0.user + cpu1.system - cpu0.system, 2),
        # tokens per CPU-second this process got, over the whole fit: flat when slowing down only by the share lost
        "tokens_per_cpu_s": round(
            trainer.state.tokens / max(1e-9, cpu1.user - cpu0.user + cpu1.system - cpu0.system)
        ),
        "wall_train_s": round(cpu1.elapsed - cpu0.elapsed, 2),
    }


# -- the harness --------------------------------------------------------------------------------------------


def _run(
    mode: str, data: Path, seconds: float, warmup: int, timeout: float, late: Busy | None
) -> dict | None:
    """One child run; with `late`, its busy processes start when the child says it has warmed up."""
    env = {k: v for k, v in os.environ.items() if k not in OMP_VARS}  # each setup sets its own
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "benchmarks.contention", "--child", mode, "--data", str(data),
           "--seconds", str(seconds), "--warmup", str(warmup)]  # fmt: skip
    err_file = tempfile.TemporaryFile(mode="w+")
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err_file, text=True)
    watchdog = threading.Timer(timeout, p.kill)
    watchdog.start()
    out: list[str] = []
    try:
        for line in p.stdout:
            out.append(line)
            if line.startswith("WARM") and late is not None:
                late.start()
        p.wait()
    finally:
        watchdog.cancel()
        if late is not None:
            late.stop()
    err_file.seek(0)
    err = err_file.read()
    lines = [ln for ln in out if ln.startswith("RESULT ")]
    if p.returncode != 0 or not lines:
        print(f"  {mode}: failed or timed out ({p.returncode})\n{err[-2000:]}", flush=True)
        return None
    return json.loads(lines[-1][len("RESULT ") :])


class Busy:
    """`n` spinning Python processes, started and stopped by this harness (by their own pids)."""

    def __init__(self, n: int, settle_s: float = 1.0):
        self.n, self.settle_s, self.procs = n, settle_s, []

    def start(self) -> None:
        self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(self.n)]
        time.sleep(self.settle_s)

    def stop(self) -> None:
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.wait()
        self.procs = []

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()


def _load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default="old,new", help=f"comma-separated, of {', '.join(MODES)}")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--busy", type=int, default=4, help="spinning processes in the busy condition")
    ap.add_argument("--seconds", type=float, default=6.0, help="measured training time per run")
    ap.add_argument("--warmup", type=int, default=3, help="steps before the clock starts")
    ap.add_argument(
        "--conditions", default="alone,busy,late", help=f"comma-separated, of {', '.join(CONDITIONS)}"
    )
    ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.data, args.seconds, args.warmup)), flush=True)
        return 0

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    conds = [c.strip() for c in args.conditions.split(",") if c.strip()]
    if bad := [m for m in modes if m not in MODES] + [c for c in conds if c not in CONDITIONS]:
        ap.error(
            f"unknown mode(s)/condition(s) {bad}; modes: {', '.join(MODES)}; conditions: {', '.join(CONDITIONS)}"
        )
    tmp = Path(tempfile.mkdtemp())
    data = tmp / "train.jsonl"
    _write_data(data)
    print(f"cpus {os.cpu_count()}, load at start {_load()}, busy processes {args.busy}", flush=True)
    rows: list[dict] = []
    for r in range(args.repeats):
        order = modes if r % 2 == 0 else modes[::-1]
        for cond in conds:
            with Busy(args.busy if cond == "busy" else 0):
                for mode in order:
                    idle, load = _idle_now(), _load()
                    late = Busy(args.busy, settle_s=0.0) if cond == "late" else None
                    res = _run(mode, data, args.seconds, args.warmup, 120 + 20 * args.seconds, late)
                    if res is None:
                        continue
                    res.update(repeat=r, condition=cond, idle_before=round(idle, 2), load_before=load)
                    rows.append(res)
                    moved = f" -> {res['threads_end']}" if res["threads_end"] != res["threads"] else ""
                    print(
                        f"  repeat {r} {cond:5s} {mode:10s} threads {res['threads']}{moved} wait "
                        f"{res['omp_wait_policy']:7s} {res['tokens_per_s']:>9,.0f} tok/s  ({res['steps']} steps, cpu "
                        f"{res['cpu_s']} s over {res['wall_train_s']} s; idle CPUs before {idle:.2f}, load {load})",
                        flush=True,
                    )
    print(f"load at end {_load()}")
    _summary(rows, modes, conds)
    return 0


def _summary(rows: list[dict], modes: list[str], conds: list[str]) -> None:
    def med(mode: str, cond: str, key: str = "tokens_per_s") -> float | None:
        v = [x[key] for x in rows if x["mode"] == mode and x["condition"] == cond]
        return statistics.median(v) if v else None

    def threads(mode: str, cond: str) -> str:
        got = sorted({f"{x['threads']}" + (f"->{x['threads_end']}" if x["threads_end"] != x["threads"] else "")
                      for x in rows if x["mode"] == mode and x["condition"] == cond})  # fmt: skip
        return ",".join(got) or "-"

    others = [c for c in conds if c != "alone"]
    head = ["setup", "threads " + " / ".join(conds)] + [f"tok/s {c} (median)" for c in conds]
    head += [f"{c}/alone" for c in others if "alone" in conds]
    head += ["tok per CPU-s " + " / ".join(conds)]
    print("\n| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for m in modes:
        meds = {c: med(m, c) for c in conds}
        cells = [m, " / ".join(threads(m, c) for c in conds)]
        cells += [f"{meds[c]:,.0f}" if meds[c] else "-" for c in conds]
        if "alone" in conds:
            a = meds["alone"]
            cells += [f"{meds[c] / a:.3f}" if a and meds[c] else "-" for c in others]
        cells += [" / ".join(f"{med(m, c, 'tokens_per_cpu_s') or 0:,.0f}" for c in conds)]
        print("| " + " | ".join(cells) + " |")
    if "old" in modes:
        for m in modes:
            if m != "old":
                print(f"{m}/old: " + ", ".join(
                    f"{c} {med(m, c) / med('old', c):.2f}x" for c in conds if med(m, c) and med("old", c)
                ))  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
