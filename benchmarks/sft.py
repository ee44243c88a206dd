"""Side-by-side SFT benchmark: the peer (TRL SFTTrainer + PEFT) vs sftlab on identical token ids.

Each run is its own subprocess (so peak RSS is per run), alternating peer, ours, peer, ours ... per workload.
MFU: the fp32 matmul peak (2048^3) is measured right before and right after every run (each measurement serves
the run before it and the run after it), and a run's MFU is its achieved GFLOP/s over the mean of its two
adjacent peaks, so a machine whose speed drifts (shared CPUs: 75-185 GFLOP/s seen) still gives a fair MFU. Prints a table per workload and the
ours/peer ratios against the peer's best variant per measure (per pair, then the median), and appends every
row to benchmarks/results.jsonl with versions and machine info.

  python -m benchmarks.sft                                  # B1 and B2, default peer variants, 2 pairs
  python -m benchmarks.sft --workload B3                    # the real SmolLM2-135M (peer: benchmarks/peer_real.py)
  python -m benchmarks.sft --workload B1 --pairs 1 --steps 4 --warmup 1
  python -m benchmarks.sft --workload B2 --peer-variants full-pad --ours-set max_tokens=2048
  python -m benchmarks.sft --no-peer                        # ours only (e.g. where ../shared is absent)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from .workloads import WORKLOADS

ROOT = Path(__file__).resolve().parent.parent
PEER = ROOT.parent / "shared" / "bench" / "peer_trl.py"
PEAK = ROOT.parent / "shared" / "bench" / "matmul_peak.py"
RESULTS = Path(__file__).resolve().parent / "results.jsonl"
HIGHER = ("tokens_per_s", "mfu")  # better when higher; peak_rss_mb and s_per_step better when lower


def _run(cmd: list[str], timeout: float) -> dict | None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    t = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"  timed out after {timeout:.0f}s: {' '.join(cmd[1:4])}", flush=True)
        return None
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode != 0 or not lines:
        print(f"  failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr[-2000:]}", flush=True)
        return None
    res = json.loads(lines[-1][len("RESULT ") :])
    res["wall_s"] = round(time.perf_counter() - t, 1)
    return res


def peer_available(real: bool = False) -> str | None:
    """None when the peer can run, else why not. B3's peer (benchmarks/peer_real.py) needs no ../shared."""
    if not real and not PEER.is_file():
        return f"peer runner not found at {PEER} (needs the ../shared checkout)"
    try:
        import peft  # noqa: F401
        import trl  # noqa: F401
    except ImportError as e:
        return f"peer needs trl and peft in this venv ({e})"
    return None


def matmul_peak(threads: int) -> float | None:
    """fp32 GFLOP/s of a 2048^3 matmul (the reference shape), measured now with the shared script."""
    if not PEAK.is_file():
        return None
    res = _run(
        [sys.executable, str(PEAK), "--threads", str(threads), "--dtypes", "fp32", "--reps", "10"], 300
    )
    if not res:
        return None
    return max(r["median_gflops"] for r in res["fp32"] if r.get("shape") == "2048x2048@2048x2048")


class Peaks:
    """Matmul peaks taken between runs: run i gets the one measured just before it and the one just after."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self.last: float | None = None

    def measure(self) -> float | None:
        self.last = matmul_peak(self.threads)
        print(f"  fp32 matmul peak (2048^3, {self.threads} threads): {self.last} GFLOP/s", flush=True)
        return self.last

    def around(self, cmd: list[str], timeout: float) -> dict | None:
        """Run cmd between two peak measurements (the one before is the previous run's after)."""
        before = self.last if self.last is not None else self.measure()
        res = _run(cmd, timeout)
        after = self.measure()
        if res is None:
            return None
        got = [p for p in (before, after) if p]
        peak = sum(got) / len(got) if got else None
        res.update(peak_before_gflops=before, peak_after_gflops=after,
                   matmul_peak_gflops=round(peak, 2) if peak else None,
                   mfu=round(res["achieved_gflops"] / peak, 4) if peak else None)  # fmt: skip
        return res


def machine() -> dict:
    import torch

    info = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability()}  # fmt: skip
    try:
        model = next(
            ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name")
        )
        info["cpu"] = model.split(":", 1)[1].strip()
    except (OSError, StopIteration):
        pass
    return info


def _ratios(ours: dict, peers: list[dict]) -> dict:
    """ours/peer against the peer's best variant per measure (speed: higher wins; RSS and s/step: lower)."""
    out = {}
    for key in ("tokens_per_s", "mfu", "peak_rss_mb", "s_per_step"):
        vals = [p[key] for p in peers if p.get(key)]
        if vals and ours.get(key):
            best = max(vals) if key in HIGHER else min(vals)
            out[key] = round(ours[key] / best, 3)
    return out


def _row(r: dict) -> str:
    mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "-"
    pk = f"{r.get('peak_before_gflops')} / {r.get('peak_after_gflops')}"
    return (f"| {r['variant']:<14} | {r['tokens_per_s']:>8.1f} | {r['s_per_step']:>7.3f} | {r['peak_rss_mb']:>8.0f} | "
            f"{r['loss_tokens']:>7} / {r['completion_tokens_in_data']:<6} | {r['final_loss']:>7.4f} | {mfu:>6} "
            f"| {pk} |")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", choices=["B1", "B2", "B3", "all"], default="all", help="all: B1 and B2")
    ap.add_argument("--pairs", type=int, default=2, help="(peer..., ours) rounds per workload")
    ap.add_argument("--steps", type=int, default=6, help="measured optimizer steps per run")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--peer-variants", default=None, help="comma list; default: B1 lora-group,lora-padfree; "
                    "B2 full-pad,full-pack")  # fmt: skip
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument(
        "--ours-set", action="append", default=[], help="sftlab train overrides, e.g. packing=false"
    )
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)

    common = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads)]
    peaks = Peaks(args.threads)
    meta = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": machine(), "steps": args.steps,
            "warmup": args.warmup}  # fmt: skip
    workloads = ["B1", "B2"] if args.workload == "all" else [args.workload]
    for wl in workloads:
        real = WORKLOADS[wl].get("real", False)
        why_no_peer = "--no-peer given" if args.no_peer else peer_available(real)
        if why_no_peer:
            print(f"{wl}: peer skipped: {why_no_peer}")
        peer_cmd = [sys.executable, str(PEER)]
        if real and not why_no_peer:
            peer_cmd = [sys.executable, "-m", "benchmarks.peer_real", *_real_inputs()]
        variants = args.peer_variants.split(",") if args.peer_variants else WORKLOADS[wl]["peer"]
        variants = [v for v in variants if v.startswith(WORKLOADS[wl]["method"])]
        rows, ratios = [], []
        for pair in range(args.pairs):
            peers = []
            if not why_no_peer:
                for v in variants:
                    print(f"[{wl} pair {pair + 1}] peer {v} ...", flush=True)
                    r = peaks.around([*peer_cmd, "--variant", v, *common], args.timeout)
                    if r:
                        peers.append({**r, "side": "peer", "workload": wl})
            print(f"[{wl} pair {pair + 1}] sftlab ...", flush=True)
            sets = [x for s in args.ours_set for x in ("--set", s)]
            ours = peaks.around(
                [sys.executable, "-m", "benchmarks.ours", "--workload", wl, *common, *sets], args.timeout
            )
            for r in peers + ([ours] if ours else []):
                r["pair"] = pair
                rows.append(r)
            if ours and peers:
                ratios.append(_ratios(ours, peers))
        _report(wl, rows, ratios)
        with open(args.out, "a") as f:
            for r in rows:
                f.write(json.dumps({**meta, **r}) + "\n")
            if ratios:
                f.write(json.dumps({**meta, "workload": wl, "ratios_per_pair": ratios,
                                    "ratios_median": _median(ratios)}) + "\n")  # fmt: skip
    return 0


def _real_inputs() -> list[str]:
    """B3's model directory and its rows (encoded by sftlab, written once) as the peer runner's arguments."""
    import atexit
    import shutil
    import tempfile

    from sftlab.models import load_tokenizer

    from .workloads import as_peer_rows, real_examples, real_model_dir

    model_dir = real_model_dir()
    tmp = tempfile.mkdtemp(prefix="sftlab-b3-")
    atexit.register(shutil.rmtree, tmp, True)
    rows = Path(tmp) / "rows.json"
    rows.write_text(json.dumps(as_peer_rows(real_examples(load_tokenizer(model_dir)))))
    return ["--model-dir", model_dir, "--rows", str(rows)]


def _median(ratios: list[dict]) -> dict:
    return {k: round(statistics.median(r[k] for r in ratios if k in r), 3) for k in ratios[0]}


def _report(wl: str, rows: list[dict], ratios: list[dict]) -> None:
    print(
        f"\n## {wl} ({WORKLOADS[wl]['method']}); MFU against the mean of the matmul peaks measured around each run"
    )
    print("| variant        | real tok/s | s/step | peak RSS MB | supervised (steps / data) | final loss | MFU "
          "| peak before/after GFLOP/s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(_row(r))
    if ratios:
        for i, r in enumerate(ratios):
            print(f"pair {i + 1} ours/peer-best: {r}")
        print(f"median ours/peer-best: {_median(ratios)}")
    print(flush=True)


if __name__ == "__main__":
    sys.exit(main())
