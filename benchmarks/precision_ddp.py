"""train.precision and data-parallel training on this CPU (issue 20): B1 (LoRA) and B2 (full) in bf16-mixed vs
fp32, and 2-process DDP (gloo) vs 1 process with the same global batch.

  python -m benchmarks.precision_ddp precision --steps 20 --reps 6
  python -m benchmarks.precision_ddp ddp --steps 8

precision: (1) speed, paired in one process as benchmarks/ab.py does: the same four ~1,000-token B1 passes,
forward + backward under fp32 (oneDNN GEMMs, the default) and under bf16 autocast (train/device.Precision, oneDNN off
as the trainer turns it), alternating `--reps` times, medians and the median of the paired ratios; (2) learning:
`--steps` optimizer steps of the Trainer from the same init in each precision, the loss curves side by side.
ddp: `--steps` steps of the Trainer on B1 with a global batch of 8, in 1 process (2 threads) and in 2 processes x
4 examples (1 thread each, gloo), median step time after the first; the loss of each step must agree.
Prints the rows the README table is made of; appends them to benchmarks/results.jsonl with --record.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _cpu_flags() -> str:
    try:
        flags = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return "?"
    return ", ".join(f for f in ("avx512f", "avx512_bf16", "amx_bf16") if f in flags.split()) or "none"


def _trainer(model, precision: str, batch_size: int = 8, **kw):
    from sftlab.config import TrainConfig
    from sftlab.train.loop import Trainer

    from .workloads import encoded_examples

    cfg = TrainConfig(
        output_dir="unused", max_steps=10**6, batch_size=batch_size, progress=False, log_every=10**9, lr=2e-4,
        schedule="constant", device="cpu", precision=precision, threads=kw.pop("threads", 2),
    )  # fmt: skip
    return Trainer(model=model, cfg=cfg, task="causal-lm", train_examples=encoded_examples(), pad_id=0,
                   run_dir=pathlib.Path(tempfile.mkdtemp()), log=lambda *_: None, callbacks=[], **kw)  # fmt: skip


def _model(method: str):
    import torch

    from .workloads import apply_method, build_model

    model = build_model()
    apply_method(model, method)
    with torch.no_grad():  # a trained-looking B, as benchmarks/ab.py
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    model.train()
    return model


def precision_speed(method: str, reps: int) -> dict:
    import torch

    from sftlab.train import patches
    from sftlab.train.memory import retain_freed_memory

    from .ab import _passes

    retain_freed_memory()
    model = _model(method)
    passes = _passes(model)
    sides = {p: _trainer(model, p) for p in ("fp32", "bf16-mixed")}
    times: dict[str, list[float]] = {p: [] for p in sides}
    for rep in range(reps + 1):
        order = list(sides.items()) if rep % 2 else list(sides.items())[::-1]
        for name, t in order:
            model.zero_grad(set_to_none=True)
            with patches.applied(model, t.perf, malloc=False):
                t0 = time.perf_counter()
                for batch in passes:
                    with t.precision.autocast():
                        loss = t.objective(batch).loss
                    (loss / 1000).backward()
                dt = time.perf_counter() - t0
            if rep:
                times[name].append(dt)
    tokens = sum(b["input_ids"].numel() for b in passes)
    fp32, bf16 = statistics.median(times["fp32"]), statistics.median(times["bf16-mixed"])
    ratio = statistics.median(a / b for a, b in zip(times["fp32"], times["bf16-mixed"]))
    del torch
    return {"method": method, "tokens": tokens, "fp32_ms": fp32 * 1e3, "bf16_mixed_ms": bf16 * 1e3,
            "speedup_bf16_mixed": ratio, "fp32_tok_s": tokens / fp32, "bf16_mixed_tok_s": tokens / bf16}  # fmt: skip


def precision_curves(method: str, steps: int) -> dict:
    curves = {}
    for p in ("fp32", "bf16-mixed"):
        t = _trainer(_model(method), p)
        t.objective.train()
        curves[p] = [round(t.step().loss, 4) for _ in range(steps)]
    diff = max(abs(a - b) for a, b in zip(curves["fp32"], curves["bf16-mixed"]))
    return {"method": method, "steps": steps, "curves": curves, "max_abs_loss_diff": diff}


def _ddp_worker(rank: int, world: int, port: int, steps: int, out: str) -> None:
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    if world > 1:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=300))  # fmt: skip
    torch.set_num_threads(2 // world)
    from sftlab.train import patches

    t = _trainer(_model("lora"), "fp32", batch_size=8 // world, threads=2 // world)
    t.objective.train()
    times, losses = [], []
    with patches.applied(t.model, t.perf):
        for _ in range(steps):
            r = t.step()
            times.append(r.seconds)
            losses.append(r.loss)
    if rank == 0:
        pathlib.Path(out).write_text(json.dumps({"times": times, "losses": losses, "tokens": t.state.tokens}))
    if world > 1:
        dist.destroy_process_group()


def ddp(steps: int) -> list[dict]:
    import sys

    import torch.multiprocessing as mp

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
    from dist_workers import free_port

    rows = []
    for world in (1, 2):
        out = tempfile.mktemp(suffix=".json")
        mp.start_processes(
            _ddp_worker, args=(world, free_port(), steps, out), nprocs=world, start_method="spawn"
        )
        res = json.loads(pathlib.Path(out).read_text())
        step_s = statistics.median(res["times"][1:])
        rows.append({"processes": world, "threads_each": 2 // world, "global_batch": 8, "median_step_s": step_s,
                     "tok_s": res["tokens"] / sum(res["times"]), "losses": [round(x, 4) for x in res["losses"]]})  # fmt: skip
    rows[1]["speedup"] = rows[0]["median_step_s"] / rows[1]["median_step_s"]
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["precision", "ddp"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--reps", type=int, default=6)
    ap.add_argument("--methods", default="lora,full")
    ap.add_argument("--record", action="store_true", help="append the rows to benchmarks/results.jsonl")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(2)
    head = {"bench": f"issue20-{args.what}", "cpu_flags": _cpu_flags(), "torch": torch.__version__,
            "time": time.strftime("%Y-%m-%d %H:%M")}  # fmt: skip
    rows = []
    if args.what == "precision":
        for m in args.methods.split(","):
            rows.append({**head, "speed": precision_speed(m, args.reps)})
            print(json.dumps(rows[-1]), flush=True)
            rows.append({**head, "learning": precision_curves(m, args.steps)})
            print(json.dumps(rows[-1]), flush=True)
    else:
        for r in ddp(args.steps):
            rows.append({**head, **r})
            print(json.dumps(rows[-1]), flush=True)
    if args.record:
        with open(pathlib.Path(__file__).with_name("results.jsonl"), "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
