"""`sftlab compare`: train several methods with the same budget (optimizer steps, or training time) on the user's
data and measure them side by side (eval metric, trainable parameters, train time, storage, inference cost against the
base model: forward latency, and generation tokens/s for generation tasks): the survey's method table, measured on
the user's task. Each method is a normal run directory under the compare directory, trained with resume-or-start
semantics, so rerunning after a kill redoes nothing that finished."""

from __future__ import annotations

import json
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import RunConfig, build_config
from ..errors import ConfigError, RunDirError
from ..methods import get_method, method_names
from ..rundir import config_changes, describe_changes
from .inference import GENERATION_TASKS, generation_rate, latency, prompts_of
from .planner import LEARNING_RATES

COMPARE_JSON = "compare.json"
COMPARE_PNG = "compare.png"


@dataclass(frozen=True)
class Budget:
    """What every method gets: `steps` optimizer steps, or `seconds` of training steps (train.max_time: a clean
    stop with an eval, a checkpoint and final/; the config's max_steps/epochs still bound the run and set the
    learning-rate schedule's length)."""

    steps: int | None = None
    seconds: float | None = None

    def describe(self) -> str:
        if self.steps is not None:
            return f"{self.steps} steps"
        s = self.seconds or 0.0
        return f"{s / 60:g} min" if s >= 60 and s % 60 == 0 else f"{s:g} s"

    def to_json(self) -> dict:
        return {"steps": self.steps} if self.steps is not None else {"seconds": self.seconds}


_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def parse_budget(text: str) -> Budget:
    """`--budget 200` -> 200 optimizer steps per method; `90s`, `5m`, `1.5h` -> that much training time each."""
    s = str(text).strip().lower()
    if re.fullmatch(r"\d+", s):
        if int(s) > 0:
            return Budget(steps=int(s))
        raise ConfigError(
            f"--budget: {text!r} steps; expected a positive number of optimizer steps, e.g. 200, or a time, e.g. 5m"
        )
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(s|sec|m|min|h)", s)
    if m:
        seconds = float(m.group(1)) * _UNITS[m.group(2)[0]]
        if seconds > 0:
            return Budget(seconds=seconds)
        raise ConfigError(f"--budget: {text!r} is no time; expected a positive time, e.g. 90s or 5m")
    raise ConfigError(
        f"--budget: {text!r} is not a budget; expected optimizer steps (a positive integer, e.g. 200) or a time "
        "(90s, 5m, 1h)"
    )


def parse_methods(text: str) -> list[str]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    if not names:
        raise ConfigError("--methods: empty; expected e.g. full,lora,adapter,prefix,prompt")
    for n in names:
        if n not in method_names():
            raise ConfigError(f"--methods: {n!r} is not one of {', '.join(method_names())}")
    if len(set(names)) != len(names):
        raise ConfigError(f"--methods: {text!r} names a method twice")
    return names


def method_config(cfg: RunConfig, method: str, budget: Budget | int, out_dir: Path) -> tuple[RunConfig, str]:
    """The run config of one method: the user's config with this method (its own settings when the config
    already names it, the method's defaults otherwise), the budget (`steps` optimizer steps, or train.max_time),
    its run dir under `out_dir`, and the learning rate: the config's train.lr when it sets one explicitly (then
    every method uses it), else the method's default from LEARNING_RATES. Returns (config, where the lr comes
    from)."""
    if isinstance(budget, int):
        budget = Budget(steps=budget)
    raw = cfg.model_dump(mode="json")
    if cfg.method.name != method:
        raw["method"] = {"name": method}
    explicit_lr = "lr" in cfg.train.model_fields_set
    train = raw["train"]
    if not explicit_lr:
        train["lr"] = LEARNING_RATES.get(method, 2e-4)
    if budget.steps is not None:
        train["max_steps"], train["epochs"], train["max_time"] = budget.steps, None, None
    else:  # the config's max_steps/epochs bound the run; the time stops it
        train["max_time"] = budget.seconds
    train["output_dir"] = str(out_dir / method)
    if cfg.train.save_every is None:  # checkpoints make a killed method resumable
        every = budget.steps or cfg.train.max_steps
        train["save_every"] = max(1, every // 4) if every else TIME_BUDGET_SAVE_EVERY
    return build_config(raw, f"compare ({method})"), ("config train.lr" if explicit_lr else "method default")


# A time budget over an epochs-bound config: the step count is not known before the data loads, so a killed method
# keeps its progress every this many steps (and the time stop writes its own checkpoint).
TIME_BUDGET_SAVE_EVERY = 25


def _finished(run_dir: Path, mcfg: RunConfig) -> dict | None:
    """The summary of a completed run of exactly this config, None when it must (still) be trained."""
    summary = run_dir / "summary.json"
    if not (summary.is_file() and (run_dir / "final").is_dir()):
        return None
    s = json.loads(summary.read_text())
    if s.get("status") not in ("completed", "early-stopped"):
        return None
    diff = config_changes(run_dir, mcfg)
    if diff:
        raise RunDirError(
            f"{run_dir} holds a finished run of another config ({describe_changes(diff)}); pass --overwrite to "
            "retrain it, or choose another --out"
        )
    return s


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _eval_batches(
    cfg: RunConfig, tokenizer, n_batches: int
) -> tuple[list[dict], list[str] | None, list[dict]]:
    from ..data.batching import collate
    from ..recipe import load_data

    train_data, eval_data = load_data(cfg, tokenizer, log=lambda *_: None)
    ex = eval_data.examples
    bs = cfg.train.eval_batch_size or cfg.train.batch_size
    batches = [collate(ex[i : i + bs], tokenizer.pad_token_id, cfg.model.task) for i in range(0, len(ex), bs)]
    return batches[:n_batches], train_data.label_names, ex


def compare(
    cfg: RunConfig,
    methods: list[str],
    budget: Budget | int,
    out_dir: str | Path,
    overwrite: bool = False,
    latency_batches: int = 4,
    generation_tokens: int = 16,
    log=print,
) -> dict:
    """Train each method with the same budget (steps, or training time; skipping finished ones, resuming an
    interrupted one), then measure each run's inference cost against the base model (forward latency; generation
    tokens/s for generation tasks); writes compare.json and compare.png in `out_dir`."""
    from ..recipe import load_base, load_tokenizer, train
    from ..runs import load_run
    from ..threads import choose_threads

    if not cfg.data.eval and not cfg.data.eval_fraction and cfg.data.tasks is None:
        raise ConfigError(
            "compare evaluates every method on held-out data; set data.eval (or data.eval_fraction) in the config"
        )
    if isinstance(budget, int):
        budget = Budget(steps=budget)
    out = Path(out_dir)
    rows = []
    for m in methods:
        mcfg, lr_from = method_config(cfg, m, budget, out)
        run_dir = Path(mcfg.train.output_dir)
        summary = None if overwrite else _finished(run_dir, mcfg)
        if summary is not None:
            log(f"compare: {m}: finished earlier in {run_dir}; kept")
        else:
            log(
                f"compare: {m}: training {budget.describe()} at lr {mcfg.train.lr:g} ({lr_from}) in {run_dir}"
            )
            summary = train(mcfg, overwrite=overwrite, resume_or_start=not overwrite, log=log)
            if summary["status"] not in ("completed", "early-stopped"):
                raise RunDirError(
                    f"{run_dir}: {m} did not finish ({summary['status']}: {summary.get('error')})"
                )
        rows.append({"method": m, "lr": mcfg.train.lr, "lr_from": lr_from, "run_dir": str(run_dir),
                     "steps": summary["steps"], "status": summary["status"],
                     "stopped_by": summary.get("stopped_by"),
                     **{k: summary[k] for k in ("eval_loss", "eval_accuracy", "eval_perplexity") if k in summary},
                     "trainable_params": summary["trainable_params"], "total_params": summary["total_params"],
                     "train_time_s": summary["train_time_s"],
                     "storage_bytes": _dir_bytes(run_dir / "final")})  # fmt: skip
    torch.set_num_threads(choose_threads(cfg.train.threads, lambda *_: None))
    tokenizer = load_tokenizer(cfg)
    batches, labels, eval_examples = _eval_batches(cfg, tokenizer, latency_batches)
    base = load_base(cfg, tokenizer, labels)
    generates = cfg.model.task in GENERATION_TASKS
    prompts = prompts_of(eval_examples, cfg.model.task, cfg.train.eval_batch_size or cfg.train.batch_size)
    base_times, base_rates = [], []
    for r in rows:
        model, _, rcfg = load_run(r["run_dir"], trust_remote_code=cfg.model.trust_remote_code)
        spec = get_method(rcfg.method.name)
        r["merged"] = spec.merge is not None and rcfg.method.name != "full"
        if r["merged"]:
            model = spec.merge(model)
        s, base_s = latency(model, base, cfg.model.task, batches)
        base_times.append(base_s)
        r["latency_ms_per_example"] = 1000 * s
        r["latency_ratio"] = s / base_s
        if generates:
            rate, base_rate = generation_rate(model, base, prompts, tokenizer.pad_token_id, generation_tokens)
            base_rates.append(base_rate)
            r["generation_tokens_per_s"] = rate
            r["generation_ratio"] = rate / base_rate
        del model
    base_row = {"latency_ms_per_example": 1000 * statistics.median(base_times)}
    if generates:
        base_row["generation_tokens_per_s"] = statistics.median(base_rates)
    result = {
        "model": cfg.model.name,
        "task": cfg.model.task,
        "budget": budget.to_json(),
        "budget_steps": budget.steps,
        "metric": _metric(cfg.model.task),
        "base": base_row,
        "base_latency_ms_per_example": base_row["latency_ms_per_example"],
        "latency_examples": sum(int(b["input_ids"].shape[0]) for b in batches),
        "generation": {"prompts": len(prompts), "new_tokens": generation_tokens, "greedy": True}
        if generates
        else None,
        "threads": torch.get_num_threads(),
        "methods": rows,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / COMPARE_JSON).write_text(json.dumps(result, indent=2))
    plot(result, out / COMPARE_PNG)
    return result


def _metric(task: str) -> str:
    return "eval_accuracy" if task == "seq-cls" else "eval_loss"


def table_rows(result: dict) -> list[list[str]]:
    """Printable rows: method, metric, trainable params, steps, train time, storage, inference latency ratio,
    generation tokens/s ratio (generation tasks), lr."""
    metric = result["metric"]
    out = []
    for r in result["methods"]:
        share = r["trainable_params"] / r["total_params"]
        merged = " (merged)" if r.get("merged") else ""
        lat = f"{r['latency_ratio']:.2f}x{merged}"
        gen = f"{r['generation_ratio']:.2f}x{merged}" if r.get("generation_ratio") else "-"
        steps = f"{r['steps']}" + (" (time)" if r.get("stopped_by") == "max_time" else "")
        out.append([r["method"], f"{r[metric]:.4f}", f"{r['trainable_params']:,} ({100 * share:.2f}%)", steps,
                    f"{r['train_time_s']:.1f} s", _size(r["storage_bytes"]), lat, gen, f"{r['lr']:g}"])  # fmt: skip
    return out


HEADERS = ["method", "metric", "trainable", "steps", "train time", "storage", "latency vs base",
           "generation tok/s vs base", "lr"]  # fmt: skip


def _budget_text(result: dict) -> str:
    b = result.get("budget") or {"steps": result.get("budget_steps")}
    if b.get("steps") is not None:
        return f"{b['steps']} steps"
    return Budget(seconds=b["seconds"]).describe() + " of training"


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000:
            return f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} TB"


def plot(result: dict, path: Path) -> None:
    """Metric vs trainable parameters (log scale) and vs train time, one labelled point per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = result["metric"]
    rows = result["methods"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, key, label in ((axes[0], "trainable_params", "trainable parameters"),
                           (axes[1], "train_time_s", "train time (s)")):  # fmt: skip
        for r in rows:
            ax.scatter(r[key], r[metric])
            ax.annotate(
                r["method"], (r[key], r[metric]), textcoords="offset points", xytext=(4, 4), fontsize=8
            )
        ax.set_xlabel(label)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0].set_xscale("log")
    fig.suptitle(f"{Path(result['model']).name}: {_budget_text(result)} per method", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
