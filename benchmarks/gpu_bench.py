"""One row of benchmarks/gpu_check.sh's table: a workload trained on a CUDA GPU through the Trainer, in a precision.

  python -m benchmarks.gpu_bench --workload B1 --precision bf16-mixed --steps 30
  torchrun --nproc_per_node 2 -m benchmarks.gpu_bench --workload B1 --precision bf16-mixed   # DDP, one GPU each

B1: the 58M Llama with LoRA r16 on the seven projections, B2: the same model fully fine-tuned, B3: SmolLM2-135M-
Instruct with LoRA on the quickstart chats (needs the model in sftlab's cache; skipped otherwise). Global batch 8
(batch 8 / world per process). Reports tokens/s (real tokens, after `--warmup` steps, CUDA-synchronised), MFU as
4N (LoRA) or 6N (full) x tokens/s over the GPU's dense bf16 peak (sftlab.plan.device's table; N = non-embedding + head parameters,
benchmarks/workloads.flop_params) and peak allocated memory; one JSON line on stdout (rank 0).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _workload(name: str):
    from .workloads import apply_method, build_model, encoded_examples, real_examples, real_model_dir

    if name in ("B1", "B2"):
        model = build_model()
        apply_method(model, "lora" if name == "B1" else "full")
        return model, encoded_examples()
    from sftlab.models import load_model

    path = real_model_dir()
    model, tok = load_model(path, "causal-lm", "float32")
    apply_method(model, "lora")
    return model, real_examples(tok)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", default="B1", choices=["B1", "B2", "B3"])
    ap.add_argument("--precision", default="bf16-mixed", choices=["fp32", "bf16-mixed", "fp16-mixed", "bf16"])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--device", default="cuda", help="cuda (the point); cpu only to smoke-test this script")
    args = ap.parse_args(argv)

    import torch

    from sftlab.config import TrainConfig
    from sftlab.plan.device import PEAK_TFLOPS
    from sftlab.train import distributed, patches
    from sftlab.train.device import resolve_device
    from sftlab.train.loop import Trainer

    from .workloads import flop_params

    rank, world, local = distributed.env_world()
    device = resolve_device(args.device, local)
    cuda = device.type == "cuda"
    dist = distributed.setup(None, device, 600)
    model, examples = _workload(args.workload)
    cfg = TrainConfig(
        output_dir="unused", max_steps=10**6, batch_size=max(1, 8 // world), progress=False, log_every=10**9,
        lr=2e-4, schedule="constant", device=args.device, precision=args.precision,
    )  # fmt: skip
    t = Trainer(model=model, cfg=cfg, task="causal-lm", train_examples=examples, pad_id=0,
                run_dir=pathlib.Path(tempfile.mkdtemp()), log=lambda *_: None, callbacks=[], dist=dist)  # fmt: skip
    t.wrapped.train()
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    tokens, seconds, losses = 0, 0.0, []
    with patches.applied(t.model, t.perf, malloc=False):
        for i in range(args.warmup + args.steps):
            sync()
            t0 = time.perf_counter()
            r = t.step()
            sync()
            if i >= args.warmup:
                tokens, seconds = tokens + r.real_tokens, seconds + time.perf_counter() - t0
            losses.append(r.loss)
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    peak = next((v[0] for k, v in PEAK_TFLOPS.items() if k in name), None)
    tok_s = tokens / seconds
    n = flop_params(t.model) * (
        6 if args.workload == "B2" else 4
    )  # LoRA: no weight gradients of the base (4N)
    row = {
        "workload": args.workload, "precision": args.precision, "gpus": world, "gpu": name,
        "tokens_per_s": round(tok_s), "mfu_bf16_peak": round(n * tok_s / (peak * 1e12), 4) if peak else None,
        "peak_mem_gb": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if cuda else None,
        "loss_first_last": [round(losses[0], 4), round(losses[-1], 4)], "steps": args.steps,
    }  # fmt: skip
    if dist.main:
        print(json.dumps(row), flush=True)
    if dist.active:
        distributed.teardown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
