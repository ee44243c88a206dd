"""Paired in-process A/B of one training-path lever on the same B1 passes.

Levers worth 1-4% of a step drown in this machine's run-to-run swing (+-5-10% between identical subprocess
runs). Here one process builds the B1 model once, takes four packed passes of 800-1,024 tokens from the
trainer's own batching, and times forward + backward of all four with the lever on, then off, alternating
`--reps` times; it prints each side's median and the median of the paired differences.

  python -m benchmarks.ab --lever fused_rope --reps 12
  python -m benchmarks.ab --lever method.fused_forward
  python -m benchmarks.ab --lever loss_chunk_size=256:512

Levers: the `perf:` switches of the objective and its patches (fused_loss, varlen_attention, trim_last_mlp,
fused_rope, onednn_gemm), `method.fused_forward` (LoRA as one autograd node vs base + separate delta), or
`loss_chunk_size=A:B`. Each pass runs as the trainer runs it: `Objective` inside `train.patches.applied`.
`--method full` runs the B2 setup instead of LoRA.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

LEVERS = ("fused_loss", "varlen_attention", "trim_last_mlp", "fused_rope", "onednn_gemm")


def _passes(model, n: int = 4) -> list[dict]:
    from sftlab.config import TrainConfig
    from sftlab.train.loop import LoopState, Trainer

    from .workloads import encoded_examples

    ex = encoded_examples()
    cfg = TrainConfig(output_dir="unused", max_steps=10, batch_size=8, progress=False, log_every=10**9)
    tr = Trainer(model=model, cfg=cfg, task="causal-lm", train_examples=ex, pad_id=0,
                 run_dir=pathlib.Path(tempfile.mkdtemp()), log=lambda *_: None)  # fmt: skip
    state, out = LoopState(), []
    while len(out) < n:
        for part in tr.stream.split_by_tokens(tr.stream.next_batch(state)):
            batch = tr.stream.collate([ex[i] for i in part])
            if 800 < batch["input_ids"].numel() <= 1024 and len(out) < n:
                out.append(batch)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lever", required=True)
    ap.add_argument("--reps", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--method", default="lora", choices=["lora", "full"])
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from sftlab.config import PerfConfig
    from sftlab.methods.lora.layer import LoraLayer
    from sftlab.train import patches
    from sftlab.train.memory import retain_freed_memory
    from sftlab.train.objective import Objective

    from .workloads import apply_method, build_model

    retain_freed_memory()  # as `fit` does (perf.malloc_retain)
    model = build_model()
    apply_method(model, args.method)
    with torch.no_grad():  # a trained-looking B, so the LoRA path's numbers are not all zeros
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    model.train()
    passes = _passes(model)
    opts: dict = {}
    chunk = {"on": 512, "off": 512}
    if args.lever in LEVERS:
        sides = {
            "on": lambda: opts.update({args.lever: True}),
            "off": lambda: opts.update({args.lever: False}),
        }
    elif args.lever == "method.fused_forward":
        layers = [m for m in model.modules() if isinstance(m, LoraLayer)]

        def fused_forward(on: bool) -> None:
            for m in layers:
                m.fused.update(dict.fromkeys(m.fused, on))

        sides = {"on": lambda: fused_forward(True), "off": lambda: fused_forward(False)}
    elif args.lever.startswith("loss_chunk_size="):
        a, b = (int(x) for x in args.lever.split("=", 1)[1].split(":"))
        chunk.update(on=a, off=b)
        sides = {"on": lambda: None, "off": lambda: None}
    else:
        ap.error(f"unknown lever {args.lever!r}")

    times: dict[str, list[float]] = {"on": [], "off": []}
    for rep in range(args.reps + 1):  # the first round warms up and is not counted
        order = list(sides.items()) if rep % 2 else list(sides.items())[::-1]  # no side always runs first
        for side, switch in order:
            switch()
            model.zero_grad(set_to_none=True)
            perf = PerfConfig(loss_chunk_size=chunk[side], **opts)
            objective = Objective(model, "causal-lm", perf)
            with patches.applied(model, perf, malloc=False):  # malloc retained once above, as in a fit
                t0 = time.perf_counter()
                for batch in passes:
                    (objective(batch).loss / 1000).backward()
                dt = time.perf_counter() - t0
            if rep:
                times[side].append(dt)
    tokens = sum(b["input_ids"].numel() for b in passes)
    on, off = statistics.median(times["on"]), statistics.median(times["off"])
    diff = statistics.median(b - a for a, b in zip(times["on"], times["off"]))
    print(f"{len(passes)} passes, {tokens} tokens; {args.reps} alternations")
    print(f"  {args.lever} on : median {on * 1e3:8.1f} ms")
    print(f"  {args.lever} off: median {off * 1e3:8.1f} ms")
    print(f"  paired median (off - on): {diff * 1e3:+.1f} ms = {diff / on * 100:+.2f}% of the 'on' time")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
