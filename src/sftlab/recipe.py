"""`sftlab train` as a recipe: setup -> train -> save. Each line is one step of the spine."""

from __future__ import annotations

import json
import os
import random
import resource
import time
from pathlib import Path

import torch

from .config import RunConfig, dump_config, save_config
from .data import load_data
from .methods import MethodContext, get_method
from .methods._targets import count_parameters
from .models import TINY_NAMES, enable_activation_checkpointing, load_model, load_tokenizer
from .runs import save_final
from .train.loop import Trainer, TrainingDiverged


def _setup_run_dir(cfg: RunConfig, resume: bool, overwrite: bool) -> Path:
    run_dir = Path(cfg.train.output_dir)
    existing = run_dir / "config.yaml"
    if existing.exists() and not resume and not overwrite:
        if (run_dir / "checkpoints").exists() or (run_dir / "final").exists():
            raise FileExistsError(
                f"{run_dir} already holds a run; pass --resume to continue it or --overwrite to start over"
            )
    if resume and existing.exists() and existing.read_text() != dump_config(cfg):
        print(f"warning: config differs from the one {run_dir} started with; resuming with the new one")
    run_dir.mkdir(parents=True, exist_ok=True)
    if overwrite and not resume:
        import shutil

        for name in ("checkpoints", "final", "metrics.jsonl", "summary.json", "loss.png"):
            p = run_dir / name
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    return run_dir


def physical_cores() -> int:
    """Cores this process may use, counting hyper-threads once: a second thread on a core only slows matmuls."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        cores, phys = set(), None
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, val = line.partition(":")
            if key.strip() == "physical id":
                phys = val.strip()
            elif key.strip() == "core id":
                cores.add((phys, val.strip()))
        return max(1, min(usable, len(cores) or usable))
    except OSError:
        return max(1, usable)


def _set_threads(n: int | None) -> None:
    torch.set_num_threads(n or physical_cores())


def prepare(cfg: RunConfig, log=print):
    """Load tokenizer, data, model; apply the method. Returns (model, tokenizer, train_data, eval_data)."""
    m = cfg.model
    tokenizer = load_tokenizer(m.name, m.trust_remote_code)
    train_data, eval_data = load_data(cfg.data, tokenizer, m.task, cfg.train.seed)
    st = train_data.stats
    log(
        f"data: {st.get('examples')} train examples, {st.get('supervised_tokens')} supervised tokens, "
        f"{st.get('truncated', 0)} truncated to {cfg.data.max_length}, {st.get('dropped', 0)} dropped"
        + (f"; {len(eval_data.examples)} eval examples" if eval_data else "")
    )
    labels = train_data.label_names
    torch.manual_seed(cfg.train.seed)
    model, _ = load_model(
        m.name,
        m.task,
        m.dtype,
        len(labels) if labels else None,
        m.trust_remote_code,
        m.attn_implementation,
        tokenizer=None if m.name in TINY_NAMES else tokenizer,
    )
    if labels:
        model.config.id2label = dict(enumerate(labels))
        model.config.label2id = {v: i for i, v in enumerate(labels)}
    ctx = MethodContext(task=m.task, tokenizer=tokenizer, base_model_name=m.name)
    torch.manual_seed(cfg.train.seed)
    get_method(cfg.method.name).apply(model, cfg.method, ctx)
    if cfg.train.gradient_checkpointing:
        enable_activation_checkpointing(model)
        model.config.use_cache = False
    return model, tokenizer, train_data, eval_data


def train(cfg: RunConfig, resume: bool = False, overwrite: bool = False, log=print) -> dict:
    """Train per `cfg`; returns the summary (also written to summary.json)."""
    t_start = time.perf_counter()
    run_dir = _setup_run_dir(cfg, resume, overwrite)
    _set_threads(cfg.train.threads)
    random.seed(cfg.train.seed)
    model, tokenizer, train_data, eval_data = prepare(cfg, log)
    trainable, total = count_parameters(model)
    log(
        f"model: {cfg.model.name} ({total:,} params), method {cfg.method.name}: "
        f"{trainable:,} trainable ({100 * trainable / total:.3f}%)"
    )
    trainer = Trainer(
        model=model,
        cfg=cfg.train,
        task=cfg.model.task,
        train_examples=train_data.examples,
        pad_id=tokenizer.pad_token_id,
        run_dir=run_dir,
        eval_examples=eval_data.examples if eval_data else None,
        log=log,
    )
    error = None
    try:
        state = trainer.fit(resume=resume)
    except TrainingDiverged as e:
        state, error = trainer.state, str(e)
        log(f"error: {e}")
    if state.status in ("completed", "early-stopped"):
        save_final(model, tokenizer, cfg, run_dir, train_data.label_names)
    summary = {
        "status": state.status,
        "error": error,
        "steps": state.step,
        "total_steps": trainer.total_steps,
        "train_loss": state.last_loss,
        **state.last_eval,
        "tokens": state.tokens,
        "supervised_tokens": state.supervised,
        "train_time_s": state.train_time,
        "tokens_per_s": state.tokens / state.train_time if state.train_time else None,
        "wall_time_s": time.perf_counter() - t_start,
        "trainable_params": trainable,
        "total_params": total,
        "trainable_share": trainable / total,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "data": train_data.stats,
        "run_dir": str(run_dir),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
