"""`make_plan`: the model, the workload, the device -> every candidate's estimate and the recommendation.

This is the one function `sftlab plan` calls (and that `sftlab compare` and benchmarks/plan_accuracy.py can call):
resolve the model's config (no weights), count or state the workload, read the device, estimate each candidate
on the meta model, and let the rule table decide. `measure_plan` adds measured numbers beside the estimates.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..config import DataConfig, dump_config
from ..errors import ConfigError
from ..models import DTYPES
from . import device as devices
from . import measure as measuring
from . import timing
from .candidates import Candidate, candidates
from .estimate import Estimate, Settings, estimate, meta_model, run_config
from .model import ModelSource, resolve
from .rules import Recommendation, Situation, decide
from .workload import Workload, counted, stated


@dataclass
class PlanInputs:
    """What the user told `sftlab plan` (CLI flags, one to one)."""

    model: str
    task: str | None = None
    data: list[str] = field(default_factory=list)
    format: str = "alpaca"
    max_length: int = 512
    columns: dict[str, str] = field(default_factory=dict)
    examples: int | None = None
    seq_len: int | None = None
    target_len: int | None = None
    supervised_share: float = 0.5
    tasks: int = 1
    device: str | None = None
    batch_size: int = 8
    dtype: str | None = None
    precision: str | None = None  # train.precision (default fp32)
    epochs: float = 1.0
    time_budget_s: float | None = None
    needs: list[str] = field(default_factory=list)
    throughput_tflops: float | None = None
    trust_remote_code: bool = False
    threads: int | None = None  # CPU threads for the matmul peak and --measure (default: the idle cores)


@dataclass
class Plan:
    inputs: PlanInputs
    source: ModelSource
    workload: Workload
    device: devices.Device
    settings: Settings
    throughput: devices.Throughput
    estimates: list[Estimate]
    situation: Situation
    recommendation: Recommendation
    threads: int = 1  # CPU threads of the matmul peak and of --measure
    measured: dict[str, measuring.Measured] = field(default_factory=dict)
    measured_on: str = ""
    rates: timing.Rates | None = None  # the CPU time model's rates (None: FLOPs at a stated throughput)
    # tokens/s estimated with the rates each --measure worker probed beside its steps (see plan/measure.py)
    estimated_beside: dict[str, float] = field(default_factory=dict)

    def by_key(self, key: str) -> Estimate:
        return next(e for e in self.estimates if e.key == key)


def data_section(inp: PlanInputs, file: str | None = None) -> DataConfig:
    try:
        return DataConfig(
            train=file or "data.jsonl", format=inp.format, max_length=inp.max_length, columns=inp.columns
        )
    except ValueError as e:
        raise ConfigError(f"--format/--max-length: {e}") from None


def workload_of(inp: PlanInputs, source: ModelSource) -> Workload:
    if inp.data:
        if inp.examples is not None or inp.seq_len is not None:
            raise ConfigError("--data counts the examples and lengths; drop --examples/--seq-len (or --data)")
        for f in inp.data:
            if not Path(f).exists():
                raise ConfigError(f"--data: {f!r} does not exist")
        from ..models import load_tokenizer

        tok = load_tokenizer(source.tokenizer, inp.trust_remote_code) if source.tokenizer else None
        return counted(inp.data, tok, source.task, data_section(inp, inp.data[0]))
    if inp.examples is None or inp.seq_len is None:
        raise ConfigError("give the data: --data FILE... (counted), or --examples N and --seq-len L")
    return stated(source.task, inp.examples, inp.seq_len, inp.supervised_share, inp.target_len)


def situation_of(
    estimates: list[Estimate], w: Workload, inp: PlanInputs, base_params: int, epochs: float, devices: int = 1
) -> Situation:
    ok = [e for e in estimates if e.candidate.available]
    within = {}
    if inp.time_budget_s is not None:
        within = {
            e.key: e.time_per_epoch_s is not None and e.time_per_epoch_s <= inp.time_budget_s for e in ok
        }
    return Situation(
        fits={e.key: bool(e.fits) for e in ok},
        fits_ckpt={e.key: bool(e.fits_ckpt) for e in ok},
        fits_sharded={e.key: bool(e.fits_sharded or e.fits_sharded_ckpt) for e in ok},
        devices=devices,
        within_time=within,
        storage={e.key: e.storage_bytes for e in ok},
        params=base_params,
        tokens=w.tokens * epochs,
        close_to_pretraining=inp.format == "text" and bool(inp.data or inp.examples),
        tasks=inp.tasks,
        needs=frozenset(inp.needs),
        data_format=inp.format,
    )


def make_plan(inp: PlanInputs, log=print) -> Plan:
    """Every candidate's numbers and the recommendation, for `inp`."""
    source = resolve(inp.model, inp.task, trust_remote_code=inp.trust_remote_code)
    dev = devices.parse(inp.device)
    precision = inp.precision or "fp32"
    if precision not in ("fp32", "bf16-mixed", "fp16-mixed"):
        raise ConfigError(f"--precision: {precision!r} is not one of fp32, bf16-mixed, fp16-mixed")
    if precision == "fp16-mixed" and dev.kind != "cuda":
        raise ConfigError("--precision fp16-mixed trains on CUDA only: use bf16-mixed or fp32 on a CPU")
    # mixed precision keeps fp32 master weights unless --dtype says otherwise (a half-precision frozen base)
    dtype = inp.dtype or ("float32" if dev.kind == "cpu" or precision != "fp32" else "bfloat16")
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    settings = Settings(batch_size=inp.batch_size, dtype=dtype, epochs=inp.epochs, precision=precision,
                        processes=dev.count)  # fmt: skip
    w = workload_of(inp, source)
    from ..threads import choose_threads

    threads = inp.threads or choose_threads(None, lambda *_: None)  # as `sftlab train` would take now
    tput = devices.throughput(dev, dtype, inp.throughput_tflops, threads)
    from ..methods._targets import count_parameters

    base_total = count_parameters(meta_model(source, DTYPES[dtype]))[1]
    layers = max(1, _layers(source))
    cands = candidates(layers, source.task)
    rates = None
    if dev.kind == "cpu" and dev.source == "detected" and inp.throughput_tflops is None:
        rates = timing.calibrate(probe_shape(source, w, settings), threads, thin_widths(source, cands),
                                 autocast=settings.precision if settings.mixed else None)  # fmt: skip
        approx = (" (under autocast: approximate, the casts it inserts are not modelled; measured 27-79% optimistic "
                  "on an avx512_bf16 CPU)") if settings.mixed else ""  # fmt: skip
        tput = devices.Throughput(tput.flops, f"{tput.described}; time model {rates.describe()}{approx}")
    ests = [estimate(source, c, w, settings, dev, tput, base_total, rates) for c in cands]
    sit = situation_of(ests, w, inp, base_total, inp.epochs, settings.processes)
    return Plan(inp, source, w, dev, settings, tput, ests, sit, decide(sit), threads=threads, rates=rates)


def probe_shape(source: ModelSource, w: Workload, s: Settings) -> timing.ProbeShape:
    """The shapes the time model's probes run at: this plan's pass (batch of mean-length examples)."""
    from .model import shape_of

    sh = shape_of(source.config)
    length = max(1, round(w.mean_tokens))
    return timing.ProbeShape(
        rows=s.batch_size * length, hidden=sh.hidden, ffn=sh.ffn, heads=sh.heads, head_dim=max(1, sh.q // sh.heads),
        length=length, examples=s.batch_size, extra_keys=0, causal=source.task == "causal-lm",
    )  # fmt: skip


def thin_widths(source: ModelSource, cands: list[Candidate]) -> tuple[int, ...]:
    """The inner widths of the candidates' thin products: LoRA ranks, adapter bottlenecks (hidden / reduction)."""
    from .model import shape_of

    hidden = shape_of(source.config).hidden
    out = set()
    for c in cands:
        if c.method.get("r"):
            out.add(int(c.method["r"]))
        if c.method.get("reduction_factor"):
            out.add(max(1, int(hidden // c.method["reduction_factor"])))
    return tuple(sorted(out))


def _layers(source: ModelSource) -> int:
    from .model import shape_of

    return shape_of(source.config).layers


def measure_plan(plan: Plan, steps: int, timeout: float, log=print) -> None:
    """Run `steps` real steps of each candidate that fits this machine, each in its own process, on the plan's
    thread count."""
    threads = plan.threads
    here = devices.detect()
    plan.measured_on = f"this machine: {here.label}, {threads} thread{'s' * (threads != 1)}, {steps} steps"
    if here.kind != "cpu" or plan.device.kind != "cpu":
        log(
            "note: --measure runs on this machine's CPU (peak RSS); estimates for another device are not measured"
        )
        here = devices.Device("cpu", devices._ram(), 1, "cpu", "detected")
    for est in plan.estimates:
        c = est.candidate
        if not c.available:
            continue
        if est.memory is not None and est.memory.peak > 0.8 * here.memory:
            plan.measured[est.key] = measuring.Measured(
                skipped="estimated peak beyond 80% of this machine's memory"
            )
            continue
        log(f"measuring {c.label} ...")
        got = plan.measured[est.key] = measuring.run(worker_spec(plan, c, steps, threads), timeout)
        if got.rates and plan.rates is not None:
            now = timing.Rates(**{**got.rates, "thin": {int(k): v for k, v in got.rates["thin"].items()}})
            again = estimate(plan.source, c, plan.workload, plan.settings, plan.device, plan.throughput,
                             est.base_total, now)  # fmt: skip
            if again.tokens_per_s:
                plan.estimated_beside[est.key] = again.tokens_per_s


def worker_spec(plan: Plan, c: Candidate, steps: int, threads: int) -> dict:
    inp, src, w = plan.inputs, plan.source, plan.workload
    data = {"train": "synthetic"}
    if inp.data:
        data = {"train": str(Path(inp.data[0]).resolve()), "format": inp.format, "max_length": inp.max_length,
                "columns": inp.columns}  # fmt: skip
    cfg = run_config(src, c, plan.settings, data, "unused")
    raw = cfg.model_dump(mode="json")
    raw["train"].update(max_steps=steps, progress=False, threads=threads)
    raw["model"]["name"] = src.name if src.has_weights else "config-only"
    spec = {
        "config": raw,
        "threads": threads,
        "steps": steps,
        "weights": src.has_weights,
        "config_path": src.name,
        "tokenizer": src.tokenizer,
    }
    if plan.rates is not None:
        from dataclasses import asdict

        spec["probe"] = {
            "shape": asdict(probe_shape(src, w, plan.settings)),
            "widths": list(thin_widths(src, [c])),
            "autocast": plan.settings.precision if plan.settings.mixed else None,
        }
    if not inp.data:
        n = max(steps * plan.settings.batch_size, 2)
        spec["synthetic"] = {"n": n, "length": w.max_tokens, "share": w.supervised_share,
                             "target": w.target_max or w.max_tokens, "vocab": src.config.vocab_size}  # fmt: skip
    return spec


# -- the config for the choice -----------------------------------------------------------------------------------

# Learning rates to start from, per method: full 2e-5 (the Alpaca/Vicuna recipes), freeze 5e-5, LoRA/DoRA 2e-4
# (QLoRA's for 7-13B models), bottleneck adapters 1e-3, prefix 5e-3 and prompt 3e-2 (PEFT's examples with AdamW).
# Adapters: the adapter literature tunes 1e-4 (AdapterHub's default) to 1e-3; on SST-2 with MiniLM-L6 (README
# "Which method?", 300 steps) 1e-4 left the Houlsby adapter near chance (0.582) and 1e-3 gave the best row (0.836),
# so the top of that range is the default. Starting points, not tuned per task: `sftlab compare` measures them.
LEARNING_RATES = {"full": 2e-5, "freeze": 5e-5, "lora": 2e-4, "adapter": 1e-3, "prefix": 5e-3, "prompt": 3e-2}


def write_config(plan: Plan, key: str, path: Path) -> Path:
    """A runnable sftlab config for candidate `key`, with a header saying how it was chosen and how to run it."""
    c = plan.by_key(key).candidate
    if not c.available:
        raise ConfigError(f"--write-config: {c.label} is {c.note}")
    inp = plan.inputs
    if len(inp.data) > 1:
        data = {"format": inp.format, "max_length": inp.max_length, "columns": inp.columns,
                "mixing": {"strategy": "temperature", "temperature": 2.0},
                "tasks": [{"name": _task_name(f, i), "train": f} for i, f in enumerate(inp.data)]}  # fmt: skip
    elif inp.data:
        data = {
            "train": inp.data[0],
            "format": inp.format,
            "max_length": inp.max_length,
            "columns": inp.columns,
        }
    else:
        data = {"train": "data/train.jsonl", "format": inp.format, "max_length": inp.max_length}
    cfg = run_config(plan.source, c, plan.settings, data, f"runs/{key}")
    cfg.train.lr = LEARNING_RATES.get(c.method["name"], 2e-4)
    est = plan.by_key(key)
    if est.fits is False and (est.fits_ckpt or (not est.fits_sharded and est.fits_sharded_ckpt)):
        cfg.train.gradient_checkpointing = True
    sharded = not (est.fits or est.fits_ckpt) and bool(est.fits_sharded or est.fits_sharded_ckpt)
    if sharded:
        cfg.train.distributed = "fsdp"
    rec = plan.recommendation
    lines = [f"# written by `sftlab plan --model {inp.model}`: {c.label}"]
    if rec.choice == key:
        lines += [f"#   {r.factor}: {r.text}" for r in rec.reasons]
    if not inp.data:
        lines.append("# data.train is a placeholder: point it at your data (the plan assumed "
                     f"{plan.workload.described})")  # fmt: skip
    n = plan.settings.processes
    lines.append(f"# run: sftlab train {path}" + (f" --nproc {n}" if n > 1 else ""))
    if sharded:
        lines.append(
            f"#   FSDP: it fits only with weights, gradients and optimizer state sharded over the {n} devices"
        )
    text = "\n".join(lines) + "\n" + dump_config(cfg)
    yaml.safe_load(text)  # what we write parses
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _task_name(f: str, i: int) -> str:
    import re

    stem = re.sub(r"[^A-Za-z0-9_-]", "-", Path(f).stem) or "task"
    return f"{stem}-{i}" if i else stem
