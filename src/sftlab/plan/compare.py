"""`sftlab compare`: train several methods with the same step budget on the user's data and measure them side by
side (eval metric, trainable parameters, train time, storage, inference latency vs the base model): the survey's
method table, measured on the user's task. Each method is a normal run directory under the compare directory,
trained with resume-or-start semantics, so rerunning after a kill redoes nothing that finished."""

from __future__ import annotations

import json
import re
import statistics
import time
from pathlib import Path

import torch

from ..config import RunConfig, build_config
from ..errors import ConfigError, RunDirError
from ..methods import get_method, method_names
from ..rundir import config_changes, describe_changes
from .planner import LEARNING_RATES

COMPARE_JSON = "compare.json"
COMPARE_PNG = "compare.png"


def parse_budget(text: str) -> int:
    """`--budget 200` -> 200 optimizer steps per method. A time budget (`10m`) is refused with the reason: the
    training loop stops on steps, and a per-method step count guessed from a time would not be the same budget."""
    s = str(text).strip()
    if re.fullmatch(r"\d+", s):
        steps = int(s)
        if steps > 0:
            return steps
        raise ConfigError(
            f"--budget: {text!r} steps; expected a positive number of optimizer steps, e.g. 200"
        )
    if re.fullmatch(r"\d+(\.\d+)?\s*[smh]", s):
        raise ConfigError(
            f"--budget: {text!r} is a time; compare takes a step budget for now (e.g. --budget 200), the same "
            "optimizer steps for every method; its table reports each method's train time"
        )
    raise ConfigError(
        f"--budget: {text!r} is not a step count; expected a positive integer, e.g. --budget 200"
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


def method_config(cfg: RunConfig, method: str, steps: int, out_dir: Path) -> tuple[RunConfig, str]:
    """The run config of one method: the user's config with this method (its own settings when the config
    already names it, the method's defaults otherwise), `steps` optimizer steps, its run dir under `out_dir`, and
    the learning rate: the config's train.lr when it sets one explicitly (then every method uses it), else the
    method's default from LEARNING_RATES. Returns (config, where the lr comes from)."""
    raw = cfg.model_dump(mode="json")
    if cfg.method.name != method:
        raw["method"] = {"name": method}
    explicit_lr = "lr" in cfg.train.model_fields_set
    train = raw["train"]
    if not explicit_lr:
        train["lr"] = LEARNING_RATES.get(method, 2e-4)
    train["max_steps"] = steps
    train["epochs"] = None
    train["output_dir"] = str(out_dir / method)
    if cfg.train.save_every is None:  # checkpoints make a killed method resumable
        train["save_every"] = max(1, steps // 4)
    return build_config(raw, f"compare ({method})"), ("config train.lr" if explicit_lr else "method default")


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


@torch.no_grad()
def _latency(model: torch.nn.Module, base: torch.nn.Module, task: str, batches: list[dict], rounds: int = 3):
    """(model, base) seconds per example of a forward over `batches`: the two timed alternately, `rounds` times
    each after a warm-up, medians, so a machine whose load drifts (shared cores) slows both alike."""
    from ..train.objective import Objective

    objs = [Objective(model, task), Objective(base, task)]
    n = sum(int(b["input_ids"].shape[0]) for b in batches)
    times: list[list[float]] = [[], []]
    for o in objs:
        o.eval()
        o(batches[0])
    for _ in range(rounds):
        for o, ts in zip(objs, times):
            t = time.perf_counter()
            for b in batches:
                o(b)
            ts.append(time.perf_counter() - t)
    return statistics.median(times[0]) / n, statistics.median(times[1]) / n


def _eval_batches(cfg: RunConfig, tokenizer, n_batches: int) -> tuple[list[dict], list[str] | None]:
    from ..data.batching import collate
    from ..recipe import load_data

    train_data, eval_data = load_data(cfg, tokenizer, log=lambda *_: None)
    ex = eval_data.examples
    bs = cfg.train.eval_batch_size or cfg.train.batch_size
    batches = [collate(ex[i : i + bs], tokenizer.pad_token_id, cfg.model.task) for i in range(0, len(ex), bs)]
    return batches[:n_batches], train_data.label_names


def compare(
    cfg: RunConfig,
    methods: list[str],
    steps: int,
    out_dir: str | Path,
    overwrite: bool = False,
    latency_batches: int = 4,
    log=print,
) -> dict:
    """Train each method for `steps` steps (skipping finished ones, resuming an interrupted one), then measure
    each run's inference latency against the base model; writes compare.json and compare.png in `out_dir`."""
    from ..recipe import load_base, load_tokenizer, train
    from ..runs import load_run
    from ..threads import choose_threads

    if not cfg.data.eval and not cfg.data.eval_fraction and cfg.data.tasks is None:
        raise ConfigError(
            "compare evaluates every method on held-out data; set data.eval (or data.eval_fraction) in the config"
        )
    out = Path(out_dir)
    rows = []
    for m in methods:
        mcfg, lr_from = method_config(cfg, m, steps, out)
        run_dir = Path(mcfg.train.output_dir)
        summary = None if overwrite else _finished(run_dir, mcfg)
        if summary is not None:
            log(f"compare: {m}: finished earlier in {run_dir}; kept")
        else:
            log(f"compare: {m}: training {steps} steps at lr {mcfg.train.lr:g} ({lr_from}) in {run_dir}")
            summary = train(mcfg, overwrite=overwrite, resume_or_start=not overwrite, log=log)
            if summary["status"] not in ("completed", "early-stopped"):
                raise RunDirError(
                    f"{run_dir}: {m} did not finish ({summary['status']}: {summary.get('error')})"
                )
        rows.append({"method": m, "lr": mcfg.train.lr, "lr_from": lr_from, "run_dir": str(run_dir),
                     "steps": summary["steps"], "status": summary["status"],
                     **{k: summary[k] for k in ("eval_loss", "eval_accuracy", "eval_perplexity") if k in summary},
                     "trainable_params": summary["trainable_params"], "total_params": summary["total_params"],
                     "train_time_s": summary["train_time_s"],
                     "storage_bytes": _dir_bytes(run_dir / "final")})  # fmt: skip
    torch.set_num_threads(choose_threads(cfg.train.threads, lambda *_: None))
    tokenizer = load_tokenizer(cfg)
    batches, labels = _eval_batches(cfg, tokenizer, latency_batches)
    base = load_base(cfg, tokenizer, labels)
    base_times = []
    for r in rows:
        model, _, rcfg = load_run(r["run_dir"], trust_remote_code=cfg.model.trust_remote_code)
        spec = get_method(rcfg.method.name)
        r["merged"] = spec.merge is not None and rcfg.method.name != "full"
        if r["merged"]:
            model = spec.merge(model)
        s, base_s = _latency(model, base, cfg.model.task, batches)
        base_times.append(base_s)
        r["latency_ms_per_example"] = 1000 * s
        r["latency_ratio"] = s / base_s
        del model
    base_s = statistics.median(base_times)
    result = {
        "model": cfg.model.name,
        "task": cfg.model.task,
        "budget_steps": steps,
        "metric": _metric(cfg.model.task),
        "base_latency_ms_per_example": 1000 * base_s,
        "latency_examples": sum(int(b["input_ids"].shape[0]) for b in batches),
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
    """Printable rows: method, metric, trainable params, train time, storage, inference latency ratio."""
    metric = result["metric"]
    out = []
    for r in result["methods"]:
        share = r["trainable_params"] / r["total_params"]
        lat = f"{r['latency_ratio']:.2f}x" + (" (merged)" if r.get("merged") else "")
        out.append([r["method"], f"{r[metric]:.4f}", f"{r['trainable_params']:,} ({100 * share:.2f}%)",
                    f"{r['train_time_s']:.1f} s", _size(r["storage_bytes"]), lat, f"{r['lr']:g}"])  # fmt: skip
    return out


HEADERS = ["method", "metric", "trainable", "train time", "storage", "latency vs base", "lr"]


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
    fig.suptitle(f"{Path(result['model']).name}: {result['budget_steps']} steps per method", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
