"""`sftlab train` as a recipe of explicit steps, each a function a pipeline or a multi-task run can call alone:

    load_tokenizer -> load_data -> load_base -> add_task_heads -> apply_method -> fit -> save_final (runs.py)

`prepare` runs the setup steps; `train` runs them all into a run directory and writes summary.json.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import resource
import time
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from . import hub
from .config import RunConfig
from .data import EncodedData
from .data import load_data as _read_and_encode
from .data.corpus import load_corpus
from .data.mixture import mixture_table
from .data.tasks import TaskSet, load_tasks, longest_max_length
from .errors import RunDirError
from .methods import multitask
from .methods._targets import count_parameters
from .models import check_positions, enable_activation_checkpointing
from .quant import weight_memory
from .rundir import check_run_dir, owned_entries, started_run
from .runs import method_of, save_final
from .threads import choose_threads
from .train import distributed
from .train.checkpoint import list_checkpoints
from .train.device import resolve_device
from .train.loop import Trainer, TrainingDiverged
from .train.task_eval import TaskEval, summary_rows, task_specs

# -- the steps ------------------------------------------------------------------------------------------


def load_tokenizer(cfg: RunConfig) -> PreTrainedTokenizerBase:
    return hub.load_tokenizer(cfg.model.name, cfg.model.trust_remote_code)


def load_data(
    cfg: RunConfig, tokenizer: PreTrainedTokenizerBase, log=print
) -> tuple[EncodedData, EncodedData | None]:
    """(train, eval or None), encoded; bad records raise before any model is loaded. With data.tasks, each task's
    data joined into a TaskSet (data/tasks.py) whose train side carries the mixture."""
    if cfg.data.tasks is not None:
        return load_tasks(cfg.data, tokenizer, cfg.model.task, cfg.train.seed, log)
    if cfg.train.objective != "sft":  # unlabelled text: blocks, corrupted per epoch (data/corpus.py)
        train_data, eval_data = load_corpus(cfg.data, tokenizer, cfg.model.name, cfg.train)
    else:
        train_data, eval_data = _read_and_encode(cfg.data, tokenizer, cfg.model.task, cfg.train.seed)
    st = train_data.stats
    log(
        f"data: {st.get('examples')} train examples, {st.get('supervised_tokens')} supervised tokens, "
        f"{st.get('truncated', 0)} truncated to {cfg.data.max_length}, {st.get('dropped', 0)} dropped"
        + (f"; {len(eval_data.examples)} eval examples" if eval_data else "")
    )
    return train_data, eval_data


def describe_mixture(trainer: Trainer, train_data: EncodedData, log=print) -> list[dict] | None:
    """Print a mixture's plan for this run (per task: examples, share, draws, epochs over it); its rows, or None."""
    mixture = trainer.mixture
    if mixture is None or not isinstance(train_data, TaskSet):
        return None
    epochs = trainer.total_steps * trainer.cfg.grad_accum / trainer.batches_per_epoch
    supervised = [p.stats.get("supervised_tokens", 0) for p in train_data.parts]
    log(mixture_table(mixture, epochs, supervised))
    return mixture.describe(epochs, supervised)


def task_evaluation(
    cfg: RunConfig, tokenizer: PreTrainedTokenizerBase, model: torch.nn.Module | None = None
) -> TaskEval | None:
    """How a multi-task run scores each task's eval set (train/task_eval.py); None for a one-task run. A model with
    per-task heads/adapters generates each task's answers through its own (methods/multitask.routed)."""
    if cfg.data.tasks is None:
        return None
    route = None
    if model is not None and multitask.routes(model):
        route = lambda index, _rows: multitask.routed(model, index)  # noqa: E731
    return TaskEval(
        task_specs(cfg.data, cfg.model.task),
        tokenizer,
        cfg.train.eval_generate_limit,
        getattr(cfg.method, "num_virtual_tokens", 0) or 0,
        route=route,
    )


def task_table(tasks: list[dict], trainer: Trainer) -> list[dict]:
    """summary.json's per-task table: the mixture plan's row of each task plus its eval at the last and the best
    (lowest overall eval loss) evals."""
    if trainer.task_eval is None:
        return tasks
    s = trainer.state
    evals = summary_rows(trainer.task_eval.tasks, s.task_eval, s.best_task_eval)
    return [{**row, **evals.get(row["task"], {})} for row in tasks]


def load_base(
    cfg: RunConfig,
    tokenizer: PreTrainedTokenizerBase,
    label_names: list[str] | None = None,
    init_from: str | Path | None = None,
) -> torch.nn.Module:
    """The base model, seeded; with `init_from` (a model directory, e.g. a previous run's final/ full model or a
    merged one) its weights instead of `model.name`'s. A seq-cls head gets one output per label name."""
    m = cfg.model
    torch.manual_seed(cfg.train.seed)
    model, _ = hub.load_model(
        str(init_from) if init_from is not None else m.name,
        m.task,
        m.dtype,
        len(label_names) if label_names else None,
        m.trust_remote_code,
        m.attn_implementation,
        tokenizer=tokenizer,
        quant=m.quant_spec(),
    )
    if label_names:
        model.config.id2label = dict(enumerate(label_names))
        model.config.label2id = {v: i for i, v in enumerate(label_names)}
    return model


def add_task_heads(model: torch.nn.Module, cfg: RunConfig, train_data: EncodedData) -> None:
    """A seq-cls mixture: one classification head per task, each with its task's label set (methods/task_heads.py),
    in place of the model's head, seeded."""
    if cfg.data.tasks is None or cfg.model.task != "seq-cls" or not isinstance(train_data, TaskSet):
        return
    torch.manual_seed(cfg.train.seed)
    multitask.add_heads(model, train_data.names, train_data.task_labels)


def apply_method(model: torch.nn.Module, cfg: RunConfig, tokenizer: PreTrainedTokenizerBase) -> None:
    """Freeze the base and add the method's trainable parts, seeded (a multi-task run: shared by its tasks, or one
    adapter per task); activation checkpointing if asked."""
    spec, ctx = method_of(cfg, tokenizer)
    torch.manual_seed(cfg.train.seed)
    if cfg.data.tasks is not None:
        multitask.apply_method(model, spec, cfg.method, ctx, [t.name for t in cfg.data.tasks])
    else:
        spec.apply(model, cfg.method, ctx)
    if cfg.train.gradient_checkpointing:
        enable_activation_checkpointing(model)
        model.config.use_cache = False


def prepare(cfg: RunConfig, log=print):
    """The setup steps. Returns (model, tokenizer, train_data, eval_data)."""
    tokenizer = load_tokenizer(cfg)
    train_data, eval_data = load_data(cfg, tokenizer, log)
    model = load_base(cfg, tokenizer, train_data.label_names)
    virtual = getattr(cfg.method, "num_virtual_tokens", 0) or 0  # prompt/prefix methods take positions too
    length, key = longest_max_length(cfg.data)
    check_positions(model, length, key, virtual, f"method {cfg.method.name}")
    add_task_heads(model, cfg, train_data)
    apply_method(model, cfg, tokenizer)
    return model, tokenizer, train_data, eval_data


def run_dir_of(cfg: RunConfig) -> Path:
    return Path(cfg.train.output_dir)


def resume_mode(cfg: RunConfig, resume: bool, resume_or_start: bool, overwrite: bool) -> tuple[bool, bool]:
    """(resume, overwrite) for this run: `--resume` needs a checkpoint to resume from; `--resume-or-start` resumes
    when there is one and otherwise starts over (replacing a run that never wrote one, not a finished run)."""
    run_dir = Path(cfg.train.output_dir)
    ckpts = list_checkpoints(run_dir / "checkpoints")
    finished = (run_dir / "final").exists()
    if resume_or_start:
        if ckpts:
            return True, False
        if finished and not overwrite:
            raise RunDirError(
                f"{run_dir} holds a finished run (final/) and no checkpoint to resume from; "
                "pass --overwrite to replace it, or choose another train.output_dir"
            )
        return False, owned_entries(run_dir) is not None or overwrite
    if resume and not ckpts:
        if finished:
            why = "the run there finished without writing checkpoints (train.save_every unset)"
        elif (run_dir / "config.yaml").exists():
            why = "the run there stopped before its first checkpoint was complete"
        else:
            why = "no run has been started there"
        raise RunDirError(
            f"--resume: there is no checkpoint in {run_dir / 'checkpoints'} ({why}); drop --resume to start a "
            "new run, or pass --resume-or-start to resume when there is a checkpoint and start otherwise"
        )
    return resume, overwrite


def train(
    cfg: RunConfig,
    resume: bool = False,
    overwrite: bool = False,
    log=print,
    resume_or_start: bool = False,
) -> dict:
    """Train per `cfg`; returns the summary (also written to summary.json). `resume` continues the run's newest
    checkpoint that verifies (RunDirError when it has none); `resume_or_start` resumes when there is a checkpoint
    and starts over otherwise."""
    t_start = time.perf_counter()
    # torchrun: join the process group first (rank 0 alone writes the run directory; train/distributed.py)
    joined = distributed.initialized()
    local = distributed.env_world()[2]
    dist = distributed.setup(
        cfg.train.distributed, resolve_device(cfg.train.device, local), cfg.train.dist_timeout_s
    )
    try:
        return _train(cfg, resume, overwrite, log if dist.main else _quiet, resume_or_start, dist, t_start)
    finally:
        if dist.active and not joined:  # the group this call made (a caller's own group stays)
            distributed.teardown()


def _quiet(*_args) -> None:
    """The log of ranks other than 0."""


def _train(cfg, resume, overwrite, log, resume_or_start, dist, t_start) -> dict:
    resume, overwrite = resume_mode(cfg, resume, resume_or_start, overwrite)
    if resume_or_start:
        where = Path(cfg.train.output_dir) / "checkpoints"
        log(
            f"--resume-or-start: {'resuming from' if resume else 'no checkpoint, starting a new run in'} {where}"
        )
    check_run_dir(cfg, resume, overwrite)  # refuse before loading anything; nothing is written until fit
    distributed.barrier(dist, "the run-directory check")  # every rank checked before rank 0 writes
    threads = choose_threads(cfg.train.threads, log)
    if dist.active and cfg.train.threads is None:  # the processes on one machine share its cores
        threads = max(1, threads // int(os.environ.get("LOCAL_WORLD_SIZE", dist.world)))
    torch.set_num_threads(threads)
    random.seed(cfg.train.seed)
    model, tokenizer, train_data, eval_data = prepare(cfg, log)
    trainable, total = count_parameters(model)
    quantized = weight_memory(model) if cfg.model.quantize else None
    total += quantized["quantized_params"] if quantized else 0  # quantised weights are buffers
    log(
        f"model: {cfg.model.name} ({total:,} params), method {cfg.method.name}: "
        f"{trainable:,} trainable ({100 * trainable / total:.3f}%)"
    )
    if quantized:
        log(
            f"base: {quantized['quantized_layers']} linear layers held as {quantized['quantize']}: "
            f"{quantized['quantized_weight_bytes'] / 2**20:.1f} MiB (were {quantized['original_weight_bytes'] / 2**20:.1f}"
            f" MiB, {quantized['ratio']:.3f}x); other weights {quantized['other_bytes'] / 2**20:.1f} MiB"
        )
    trainer = Trainer(
        model=model,
        cfg=cfg.train,
        task=cfg.model.task,
        train_examples=train_data.examples,
        pad_id=tokenizer.pad_token_id,
        run_dir=Path(cfg.train.output_dir),
        eval_examples=eval_data.examples if eval_data else None,
        log=log,
        perf=cfg.perf,
        mixture=getattr(train_data, "mixture", None),
        task_eval=task_evaluation(cfg, tokenizer, model),
        transform=getattr(train_data, "transform", None),
        dist=dist,
    )
    if dist.active:
        log(
            f"distributed: {dist.world} processes ({dist.kind}, {distributed.backend_for(trainer.device)}), global "
            f"batch {cfg.train.batch_size} x {cfg.train.grad_accum} x {dist.world} examples"
        )
    tasks = describe_mixture(trainer, train_data, log)
    if resume:
        trainer.resume()  # a checkpoint that does not fit this config fails here, before config.yaml changes
    error = None
    started = (
        started_run(cfg, resume, overwrite, log) if dist.main else contextlib.nullcontext(run_dir_of(cfg))
    )
    with started as run_dir:
        try:
            state = trainer.fit(resume=resume)
        except TrainingDiverged as e:
            state, error = trainer.state, str(e)
            log(f"error: {e}")
        if state.status in ("completed", "early-stopped"):
            if dist.kind == "fsdp":
                distributed.unshard(model)  # every rank gathers the whole weights; rank 0 saves them
            if dist.main:
                save_final(model, tokenizer, cfg, run_dir, train_data.label_names)
        distributed.barrier(dist, "saving final/")
        if not dist.main:
            return {"status": state.status, "steps": state.step, "rank": dist.rank}
        summary = {
            "status": state.status,
            "error": error,
            "steps": state.step,
            "total_steps": trainer.total_steps,
            "stopped_by": trainer.stopped_by,
            "train_loss": state.last_loss,
            **state.last_eval,
            "warnings": state.warnings,
            "tokens": state.tokens,
            "supervised_tokens": state.supervised,
            "train_time_s": state.train_time,
            "tokens_per_s": state.tokens / state.train_time if state.train_time else None,
            "wall_time_s": time.perf_counter() - t_start,
            "trainable_params": trainable,
            "total_params": total,
            "trainable_share": trainable / total,
            **({"quantized_base": quantized} if quantized else {}),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "data": train_data.stats,
            **({"tasks": task_table(tasks, trainer)} if tasks else {}),
            "run_dir": str(run_dir),
        }
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
