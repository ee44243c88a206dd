"""One sftlab benchmark run in its own process (so its peak RSS is its own); prints `RESULT {json}`.

It goes through sftlab's real training path: `Trainer` from `sftlab.train.loop`, with the method applied
through `sftlab.methods.get_method`. The only extra is a clock on each optimizer step and a count of the
tokens in each micro-batch, as the peer runner keeps.

  python -m benchmarks.ours --workload B1 --steps 6 --warmup 2 [--set packing=false ...]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _parse_sets(items: list[str]) -> dict:
    import yaml

    out = {}
    for item in items:
        key, _, raw = item.partition("=")
        out[key] = yaml.safe_load(raw)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", choices=["B1", "B2", "B3"], default="B1")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--examples", type=int, default=512, help="B1/B2 rows (B3 has the quickstart's 400)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--set", action="append", default=[],
        help="train config overrides, e.g. packing=false; method.KEY=V for the method, e.g. method.fused_forward=false",
    )  # fmt: skip
    ap.add_argument("--profile", default=None, help="write a torch.profiler table of the measured steps here")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    t_import = time.perf_counter()
    import transformers

    import sftlab
    from sftlab.config import PERF_KEYS, PerfConfig, TrainConfig
    from sftlab.methods._targets import count_parameters
    from sftlab.train.loop import Trainer

    from .workloads import (
        WORKLOADS,
        apply_method,
        build_model,
        encoded_examples,
        flop_params,
        real_examples,
        real_model_dir,
        supervised_tokens,
    )  # fmt: skip

    transformers.logging.set_verbosity_error()
    import_s = time.perf_counter() - t_import
    wl = WORKLOADS[args.workload]

    t0 = time.perf_counter()
    if wl.get("real"):
        from sftlab.models import load_model

        model, tok = load_model(real_model_dir(), "causal-lm", "float32", attn_implementation=args.attn)
        examples, pad_id = real_examples(tok, seed=args.seed, max_len=args.max_length), tok.pad_token_id
    else:
        model = build_model(args.seed, args.attn)
        examples, pad_id = encoded_examples(args.examples, 32000, args.max_length, args.seed), 0
    n_flop = flop_params(model)
    overrides = _parse_sets(args.set)
    method_sets = {
        k.removeprefix("method."): overrides.pop(k) for k in list(overrides) if k.startswith("method.")
    }
    apply_method(model, wl["method"], args.seed, **method_sets)
    trainable, total = count_parameters(model)

    stats: dict[str, list] = {"real": [], "loss_tok": [], "tensor": [], "passes": [], "t_end": [], "cpu": []}

    class Clocked(Trainer):
        def train_step(self, micro):
            # one entry per optimizer step (a step may run several micro-batches: grad_accum, micro_batch_tokens)
            real = sum(
                int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel()
                for b in micro
            )
            stats["real"].append(real)
            stats["tensor"].append(sum(b["input_ids"].numel() for b in micro))
            stats["loss_tok"].append(sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro))
            stats["passes"].append(len(micro))
            return super().train_step(micro)

        def _optimizer_step(self):
            g = super()._optimizer_step()
            stats["t_end"].append(time.perf_counter())
            ru = resource.getrusage(resource.RUSAGE_SELF)
            stats["cpu"].append((ru.ru_utime, ru.ru_stime, ru.ru_minflt))
            return g

    perf = PerfConfig(**{k: overrides.pop(k) for k in list(overrides) if k in PERF_KEYS})
    tcfg = TrainConfig(
        output_dir="unused", max_steps=args.warmup + args.steps, batch_size=args.batch, lr=2e-4, schedule="constant",
        weight_decay=0.0, seed=args.seed, progress=False, log_every=10**9, threads=args.threads, **overrides,
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Clocked(model=model, cfg=tcfg, task="causal-lm", train_examples=examples, pad_id=pad_id,
                          run_dir=__import__("pathlib").Path(tmp), log=lambda *_: None, perf=perf)  # fmt: skip
        setup_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        if args.profile:
            _profiled_fit(trainer, args.warmup, args.profile)
        else:
            trainer.fit()
        train_s = time.perf_counter() - t1
        peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    w, n = args.warmup, args.steps
    t_end = stats["t_end"]
    meas_s = t_end[-1] - (t_end[w - 1] if w > 0 else t1)
    real, loss_tok, tensor = (sum(stats[k][w:]) for k in ("real", "loss_tok", "tensor"))
    step_s = [b - a for a, b in zip(t_end[w - 1 : -1], t_end[w:])] if w > 0 else []
    flops_per_tok = wl["flop_factor"] * n_flop
    # CPU seconds and minor page faults over the measured steps: user (compute) vs sys (mostly page faults)
    c0 = stats["cpu"][w - 1] if w > 0 else (0.0, 0.0, 0)
    cpu = [b - a for a, b in zip(c0, stats["cpu"][-1])]
    res = {
        "side": "sftlab", "workload": args.workload, "variant": "sftlab-" + wl["method"], "steps": n, "warmup": w,
        "batch": args.batch, "threads": torch.get_num_threads(), "attn": args.attn, "overrides": {**overrides, **perf.model_dump(exclude_defaults=True), **{f"method.{k}": v for k, v in method_sets.items()}},
        "packing": trainer.packing, "max_tokens": tcfg.max_tokens, "fused_loss": perf.fused_loss,
        "micro_batch_tokens": perf.micro_batch_tokens, "passes_per_step": stats["passes"][w:],
        "tokens_per_s": round(real / meas_s, 1), "loss_tokens_per_s": round(loss_tok / meas_s, 1),
        "s_per_step": round(meas_s / n, 3), "s_per_step_min": round(min(step_s), 3) if step_s else None,
        "s_per_step_max": round(max(step_s), 3) if step_s else None,
        "cpu_user_s_per_step": round(cpu[0] / n, 3), "cpu_sys_s_per_step": round(cpu[1] / n, 3),
        "minor_faults_per_step": round(cpu[2] / n),
        "real_tokens": real, "loss_tokens": loss_tok, "tensor_tokens": tensor,
        "pad_fraction": round(1 - real / tensor, 4), "completion_tokens_in_data": supervised_tokens(examples),
        "final_loss": round(trainer.state.last_loss, 4), "params": total, "params_nonemb_plus_head": n_flop,
        "trainable_params": trainable, "flops_per_token": flops_per_tok,
        "achieved_gflops": round(flops_per_tok * real / meas_s / 1e9, 2), "peak_rss_mb": round(peak_rss, 1),
        "import_s": round(import_s, 2), "setup_s": round(setup_s, 2), "train_s": round(train_s, 2),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "sftlab": getattr(sftlab, "__version__", "dev")},
    }  # fmt: skip
    print("RESULT " + json.dumps(res), flush=True)
    return 0


def _profiled_fit(trainer, warmup: int, out_path: str) -> None:
    """Profile the steps after warm-up: operator table by self CPU time (where the step time goes)."""
    from torch.profiler import ProfilerActivity, profile

    real_step = type(trainer)._optimizer_step
    state = {"prof": None}

    def step(self):
        g = real_step(self)
        if self.state.step + 1 == warmup:  # the next step is the first measured one
            state["prof"] = profile(activities=[ProfilerActivity.CPU], record_shapes=True)
            state["prof"].__enter__()
        return g

    type(trainer)._optimizer_step = step
    trainer.fit()
    prof = state["prof"]
    if prof is None:
        return
    prof.__exit__(None, None, None)
    avg = prof.key_averages(group_by_input_shape=False)
    with open(out_path, "w") as f:
        f.write(_by_category(prof, trainer.model.config.vocab_size) + "\n\n")
        f.write(avg.table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=60))
        f.write("\n\nby shape:\n")
        f.write(
            prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=30)
        )


def _category(name: str, shapes: str, vocab: int) -> str:
    if name in ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "mkldnn::_linear_pointwise"):
        if str(vocab) in shapes:
            return "GEMM: LM head (supervised rows)"
        if ", 16]" in shapes or "[16," in shapes:
            return "GEMM: LoRA rank-16 (thin)"
        return "GEMM: linear layers"
    if "flash_attention" in name:
        return "attention (flash, per example)"
    return "elementwise, copies and the rest"  # incl. autograd/profiler wrappers' own (bookkeeping) time


def _by_category(prof, vocab: int) -> str:
    """Self CPU time by what the work is: the profile summary the README quotes."""
    cats: dict[str, float] = {}
    total = 0.0
    for e in prof.key_averages(group_by_input_shape=True):
        total += e.self_cpu_time_total
        cat = _category(e.key, str(e.input_shapes), vocab)
        cats[cat] = cats.get(cat, 0.0) + e.self_cpu_time_total
    lines = ["where the measured steps' self CPU time went:"]
    for cat, t in sorted(cats.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {cat:40s} {t / 1e3:9.1f} ms  {100 * t / total:5.1f}%")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
