"""A plan as a table for people (rich) and as JSON for tools; the same numbers in both."""

from __future__ import annotations

from typing import Any

from .estimate import Estimate
from .planner import Plan
from .rules import FACTORS

WIDTH = 180


def human_bytes(x: float | None) -> str:
    if x is None:
        return "-"
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(x) >= size:
            return f"{x / size:.3g} {unit}"
    return f"{x:.0f} B"


def human_count(x: float) -> str:
    for unit, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= size:
            return f"{x / size:.3g}{unit}"
    return f"{x:.0f}"


def human_time(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 1:
        return "<1 s"
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    if s < 2 * 86400:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} d"


def est_tokens_per_s(plan: Plan, e: Estimate) -> float | None:
    return e.tokens_per_s


def _err(est: float | None, got: float | None) -> float | None:
    if est is None or not got:
        return None
    return (est - got) / got


def to_json(plan: Plan) -> dict[str, Any]:
    rows = []
    for e in plan.estimates:
        row: dict[str, Any] = {"key": e.key, "label": e.candidate.label, "method": e.candidate.method,
                               "available": e.candidate.available, "notes": e.notes}  # fmt: skip
        if e.memory is not None:
            m = e.memory
            row.update(
                trainable_params=e.trainable,
                total_params=e.total,
                trainable_share=e.trainable / e.total if e.total else None,
                memory={"weights": m.weights, "gradients": m.gradients, "optimizer": m.optimizer,
                        "activations": m.activations, "activations_checkpointed": m.activations_ckpt,
                        "workspace": m.workspace, "head_gradient": m.head_gradient, "runtime": m.runtime,
                        "allocator_share": m.allocator_share, "autocast_copies": m.casts, "peak": m.peak,
                        "peak_checkpointed": m.peak_ckpt, "peak_sharded": m.peak_sharded,
                        "peak_sharded_checkpointed": m.peak_sharded_ckpt},
                pass_tokens=e.pass_tokens,
                flops_per_token={"forward": e.flops_forward, "train": e.flops_train},
                tokens_per_epoch=e.tokens_per_epoch,
                est_tokens_per_s=est_tokens_per_s(plan, e),
                time_per_epoch_s=e.time_per_epoch_s,
                storage_per_task=e.storage_bytes,
                inference_extra_flops_per_token=e.inference_extra,
                inference_extra_flops_per_token_merged=e.inference_extra_merged,
                fits=e.fits,
                fits_checkpointed=e.fits_ckpt,
                fits_sharded=e.fits_sharded,
                fits_sharded_checkpointed=e.fits_sharded_ckpt,
            )  # fmt: skip
        got = plan.measured.get(e.key)
        if got is not None:
            row["measured"] = {
                "peak_rss_delta": got.peak_rss_delta,
                "tokens_per_s": got.tokens_per_s,
                "error": got.error,
                "skipped": got.skipped,
                "peak_error": _err(e.memory.peak if e.memory else None, got.peak_rss_delta),
                "tokens_per_s_error": _err(est_tokens_per_s(plan, e), got.tokens_per_s),
                "tokens_per_s_estimated_beside": plan.estimated_beside.get(e.key),
                "tokens_per_s_error_beside": _err(plan.estimated_beside.get(e.key), got.tokens_per_s),
            }
        rows.append(row)
    rec = plan.recommendation
    return {
        "model": {"name": plan.source.name, "source": plan.source.described, "task": plan.source.task,
                  "model_type": getattr(plan.source.config, "model_type", None)},
        "workload": {"described": plan.workload.described, "examples": plan.workload.examples,
                     "mean_tokens": plan.workload.mean_tokens, "max_tokens": plan.workload.max_tokens,
                     "supervised_share": plan.workload.supervised_share, "target_mean": plan.workload.target_mean,
                     "tokens_per_epoch": plan.workload.tokens},
        "device": {"kind": plan.device.kind, "memory": plan.device.memory, "count": plan.device.count,
                   "name": plan.device.name, "source": plan.device.source},
        "settings": {"batch_size": plan.settings.batch_size, "dtype": plan.settings.dtype,
                     "precision": plan.settings.precision, "processes": plan.settings.processes,
                     "micro_batch_tokens": plan.settings.micro_batch_tokens, "epochs": plan.settings.epochs},
        "throughput": {"flops": plan.throughput.flops, "described": plan.throughput.described},
        "candidates": rows,
        "recommendation": {"choice": rec.choice, "rule": rec.rule,
                           "reasons": [{"factor": r.factor, "text": r.text} for r in rec.reasons],
                           "advice": [{"factor": r.factor, "text": r.text} for r in rec.advice]},
        "measured_on": plan.measured_on or None,
    }  # fmt: skip


def _fits(e: Estimate) -> str:
    if e.fits:
        return "yes"
    if e.fits_ckpt:
        return "ckpt"
    if e.fits_sharded:
        return "fsdp"
    return "fsdp+ckpt" if e.fits_sharded_ckpt else "no"


def render(plan: Plan, console=None) -> None:
    """The table, the assumptions under it, the recommendation with its reasons."""
    from rich.console import Console
    from rich.table import Table

    con = console or Console()
    width = WIDTH + (70 if plan.measured else 0)
    if con.width < width:  # a pipe or a narrow terminal: one line per method beats wrapped cells
        con = Console(width=width, force_terminal=con.is_terminal)
    src, w = plan.source, plan.workload
    con.print(f"[bold]model[/]    {src.described}: {src.task}, {human_count(plan.estimates[0].base_total or 0)} "
              f"parameters, {plan.settings.dtype}"
              + (f", {plan.settings.precision}" if plan.settings.precision != "fp32" else ""))  # fmt: skip
    con.print(f"[bold]data[/]     {w.described}")
    con.print(f"[bold]device[/]   {plan.device.label} ({plan.device.source})")
    con.print(f"[bold]training[/] batch {plan.settings.batch_size}, passes of at most "
              f"{plan.settings.micro_batch_tokens} tokens, {plan.settings.epochs:g} epoch(s); "
              f"throughput {plan.throughput.described}")  # fmt: skip
    measured = bool(plan.measured)
    t = Table(show_lines=False, header_style="bold")
    cols = ["method", "trainable", "weights", "grads", "optim", "activ. (ckpt)", "peak (ckpt)", "fits",
            "FLOPs/tok", "time/epoch", "storage/task", "infer. +FLOPs/tok"]  # fmt: skip
    if measured:
        cols += ["measured peak", "err", "tok/s est.", "tok/s meas.", "err"]
    for c in cols:
        t.add_column(c, justify="left" if c == "method" else "right", no_wrap=c == "method")
    chosen = plan.recommendation.choice
    for e in plan.estimates:
        label = ("* " if e.key == chosen else "  ") + e.candidate.label
        if e.memory is None:
            t.add_row(label, "n/a", *([""] * (len(cols) - 2)))
            continue
        m = e.memory
        share = e.trainable / e.total if e.total else 0
        infer = human_count(e.inference_extra)
        if e.inference_extra_merged is not None and e.inference_extra:
            infer += " (0 merged)"
        row = [
            label, f"{human_count(e.trainable)} ({share:.2%})", human_bytes(m.weights), human_bytes(m.gradients),
            human_bytes(m.optimizer), f"{human_bytes(m.activations)} ({human_bytes(m.activations_ckpt)})",
            f"{human_bytes(m.peak)} ({human_bytes(m.peak_ckpt)})", _fits(e), human_count(e.flops_train),
            human_time(e.time_per_epoch_s), human_bytes(e.storage_bytes), infer,
        ]  # fmt: skip
        if measured:
            got = plan.measured.get(e.key)
            if got is None or got.peak_rss_delta is None:
                why = (got.skipped or got.error or "-") if got else "-"
                row += [why[:40], "", "", "", ""]
            else:
                # tokens/s: estimated with the rates probed beside the steps where the worker probed them
                est_tps = plan.estimated_beside.get(e.key) or est_tokens_per_s(plan, e)
                pe, te = _err(m.peak, got.peak_rss_delta), _err(est_tps, got.tokens_per_s)
                row += [
                    human_bytes(got.peak_rss_delta), f"{pe:+.0%}" if pe is not None else "",
                    f"{est_tps:,.0f}" if est_tps else "-", f"{got.tokens_per_s:,.0f}" if got.tokens_per_s else "-",
                    f"{te:+.0%}" if te is not None else "",
                ]  # fmt: skip
        t.add_row(*row)
    con.print(t)
    con.print("fits: yes / ckpt (only with activation checkpointing) / no, against the device's memory; "
              "peak = weights + optimizer + the larger of (activations + workspace) and gradients + allocator "
              "overhead; FLOPs/tok = forward + backward per training token")  # fmt: skip
    if plan.settings.processes > 1:
        n = plan.settings.processes
        con.print(f"{n} devices, data-parallel (sftlab train --nproc {n}): memory per device under DDP; fsdp = fits "
                  "only with weights, gradients and optimizer state sharded (train.distributed: fsdp); time/epoch "
                  f"over the {n} devices, communication not modelled")  # fmt: skip
    if plan.measured_on:
        con.print(f"measured on {plan.measured_on}; err = (estimate - measured) / measured; measured peak is "
                  "the peak RSS during the steps minus the RSS before the model was built; tok/s est. uses the "
                  "time model's rates probed beside each method's steps (the load moves between them)")  # fmt: skip
    for e in plan.estimates:
        for note in e.notes:
            con.print(f"note ({e.candidate.label}): {note}")
    rec = plan.recommendation
    if rec.choice is None:
        con.print("[bold]recommendation[/]: none")
    else:
        con.print(f"[bold]recommendation[/]: {plan.by_key(rec.choice).candidate.label}")
    for r in rec.reasons:
        con.print(f"  - {r.factor} ({FACTORS.index(r.factor) + 1}): {r.text}")
    for r in rec.advice:
        con.print(f"  + {r.factor} ({FACTORS.index(r.factor) + 1}): {r.text}")
