"""Worker processes for the distributed tests (tests/unit/train/test_distributed.py): each joins a gloo group on
127.0.0.1 and writes what it measured to a file the test reads. Module-level functions, so `spawn` can start them."""

from __future__ import annotations

import json
import os
import signal
import socket
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn, world: int, *args, timeout_s: float = 120) -> list[int]:
    """Run fn(rank, world, port, *args) in `world` processes; their exit codes."""
    port = free_port()
    ctx = mp.start_processes(fn, args=(world, port, *args), nprocs=world, join=False, start_method="spawn")
    for p in ctx.processes:
        p.join(timeout_s)
    codes = []
    for p in ctx.processes:
        if p.is_alive():
            p.kill()
            p.join()
        codes.append(p.exitcode)
    return codes


def _join(rank: int, world: int, port: int, timeout_s: float = 60) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        HF_HUB_OFFLINE="1",
    )
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=timedelta(seconds=timeout_s),
    )  # fmt: skip


def _quiet(*_a) -> None:
    pass


def trainer_for(cfg, run_dir: Path):
    from sftlab.recipe import prepare
    from sftlab.train.loop import Trainer

    torch.manual_seed(cfg.train.seed)
    model, tok, data, _ = prepare(cfg, log=_quiet)
    return Trainer(
        model=model,
        cfg=cfg.train,
        task=cfg.model.task,
        train_examples=data.examples,
        pad_id=tok.pad_token_id,
        run_dir=run_dir,
        perf=cfg.perf,
        callbacks=[],
        log=_quiet,
        mixture=getattr(data, "mixture", None),
    )


def first_step(cfg, run_dir: Path, steps: int = 1) -> dict:
    """Loss of each step and the gradients of the last one (before the update), per trainable parameter name."""
    t = trainer_for(cfg, run_dir)
    t.wrapped.train()
    losses = []
    for i in range(steps):
        passes = t.stream.next_step(t.state, cfg.train.grad_accum)
        loss, n, _ = t.train_step(passes)
        losses.append(loss)
        if i < steps - 1:
            t._optimizer_step()
            t.state.step += 1
    from sftlab.train.distributed import full

    grads = {
        name: full(p.grad).detach().clone() for name, p in t.model.named_parameters() if p.grad is not None
    }
    return {"losses": losses, "count": n, "grads": grads}


def grad_worker(rank: int, world: int, port: int, cases: list, out: str) -> None:
    """For each (name, cfg): the first step's loss and gradients on this rank, to out/name-rankR.pt."""
    _join(rank, world, port)
    try:
        for name, cfg, steps in cases:
            res = first_step(cfg, Path(out) / name, steps)
            torch.save(res, Path(out) / f"{name}-rank{rank}.pt")
            dist.barrier()
    finally:
        dist.destroy_process_group()


def _fake_generate(model, tokenizer, prompts, max_new_tokens=8, **_kw):
    """Deterministic answers that depend on the prompt, right for some and wrong for others (a task's generated
    metric is then neither 0 nor 1): "Repeat: w" -> "w" (F1 2/3 against "w w") when the sum of the prompt's ids is even,
    else "x"; a classification prompt -> "positive" or "negative" by that sum. Records how many it answered."""
    _GENERATED.append(len(prompts))
    out = []
    for p in prompts:
        text, even = tokenizer.decode(p), sum(p) % 2 == 0
        if "Repeat: " in text:
            answer = text.split("Repeat: ")[1].split("<")[0].split()[0] if even else "x"
        else:
            answer = "positive" if even else "negative"
        out.append(tokenizer(answer, add_special_tokens=False)["input_ids"])
    return out


_GENERATED: list[int] = []


def evaluated(cfg, run_dir: Path) -> dict:
    """The trainer's eval (the loop's numbers) on this rank, with the eval rows each rank ran forwards on and the
    prompts it generated answers for (a stub generator: task_eval's sharding is what is tested)."""
    import sftlab.train.task_eval as task_eval_mod
    from sftlab.recipe import prepare, task_evaluation
    from sftlab.train.loop import Trainer

    torch.manual_seed(cfg.train.seed)
    model, tok, data, eval_data = prepare(cfg, log=_quiet)
    t = Trainer(
        model=model, cfg=cfg.train, task=cfg.model.task, train_examples=data.examples, pad_id=tok.pad_token_id,
        run_dir=run_dir, perf=cfg.perf, callbacks=[], log=_quiet, mixture=getattr(data, "mixture", None),
        eval_examples=(eval_data or data).examples, task_eval=task_evaluation(cfg, tok, model),
    )  # fmt: skip
    rows: list[int] = []
    t.objective.register_forward_pre_hook(
        lambda m, args: None if m.training else rows.append(len(args[0]["labels"]))
    )
    real, task_eval_mod.generate_ids = task_eval_mod.generate_ids, _fake_generate
    _GENERATED.clear()
    try:
        overall, per_task = t.evaluate()
    finally:
        task_eval_mod.generate_ids = real
    return {
        "overall": overall,
        "tasks": per_task,
        "rows": sum(rows),
        "forwards": len(rows),
        "generated": sum(_GENERATED),
    }


def eval_worker(rank: int, world: int, port: int, cases: list, out: str) -> None:
    """For each (name, cfg): the trainer's eval on this rank, to out/name-rankR.pt."""
    _join(rank, world, port)
    try:
        for name, cfg in cases:
            torch.save(evaluated(cfg, Path(out) / name), Path(out) / f"{name}-rank{rank}.pt")
            dist.barrier()
    finally:
        dist.destroy_process_group()


def train_worker(rank: int, world: int, port: int, cfg, out: str, resume: bool, stop: dict | None) -> None:
    """recipe.train on this rank; `stop`: {"step": N, "how": "interrupt" | "sigint" | "sigint-one" | "die",
    "rank": R} ends it there (Ctrl-C on every rank before step N + 1's update, a real SIGINT to every rank right after
    that update, a real SIGINT to rank R alone in the middle of step N + 1's forward, or rank R's process dying with
    exit code 3). What happened goes to out/result-rankR.json."""
    _join(rank, world, port, timeout_s=cfg.train.dist_timeout_s)
    from sftlab.recipe import train
    from sftlab.train.loop import Trainer

    if stop and stop["how"] == "sigint-one":
        real_step = Trainer.train_step

        def signalled(self, passes):
            if self.state.step != stop["step"] or rank != stop["rank"]:
                return real_step(self, passes)
            kill = self.objective.register_forward_pre_hook(lambda *_: os.kill(os.getpid(), signal.SIGINT))
            try:  # after the step's first all-reduce, inside its forward: the other rank is not signalled
                return real_step(self, passes)
            finally:
                kill.remove()

        Trainer.train_step = signalled
    elif stop:
        real = Trainer._optimizer_step

        def stopping(self):
            if self.state.step == stop["step"]:
                if stop["how"] == "interrupt":
                    raise KeyboardInterrupt
                if stop["how"] == "sigint":
                    gnorm = real(self)
                    os.kill(os.getpid(), signal.SIGINT)
                    return gnorm
                if rank == stop["rank"]:
                    os._exit(3)
            return real(self)

        Trainer._optimizer_step = stopping
    result: dict = {}
    try:
        result = {"summary": train(cfg, resume=resume, log=_quiet)}
    except KeyboardInterrupt:
        result = {"interrupted": True}
    except Exception as e:  # noqa: BLE001 - the test reads what was raised
        result = {"error": type(e).__name__, "message": str(e), "tb": traceback.format_exc()}
    (Path(out) / f"result-rank{rank}.json").write_text(json.dumps(result, default=str))
    if dist.is_initialized():
        dist.destroy_process_group()


def generated_worker(rank: int, world: int, port: int, cfg, out: str, steps: int) -> None:
    """`steps` training steps (updates included), then real greedy generation: task 0's generated metric straight
    after the last update (no eval forward before it), then the trainer's whole eval. Both results and every
    generated answer's ids on this rank go to out/rankR.pt (an error's traceback instead, to out/rankR.txt)."""
    _join(rank, world, port)
    import sftlab.train.task_eval as task_eval_mod
    from sftlab.data.batching import TASK_KEY
    from sftlab.recipe import prepare, task_evaluation
    from sftlab.train.loop import Trainer

    real = task_eval_mod.generate_ids
    answers: list[list[int]] = []

    def recorded(*a, **kw):
        new = real(*a, **kw)
        answers.extend(new)
        return new

    try:
        torch.manual_seed(cfg.train.seed)
        model, tok, data, eval_data = prepare(cfg, log=_quiet)
        t = Trainer(
            model=model, cfg=cfg.train, task=cfg.model.task, train_examples=data.examples, pad_id=tok.pad_token_id,
            run_dir=Path(out) / "run", perf=cfg.perf, callbacks=[], log=_quiet,
            mixture=getattr(data, "mixture", None), eval_examples=(eval_data or data).examples,
            task_eval=task_evaluation(cfg, tok, model),
        )  # fmt: skip
        t.wrapped.train()
        for _ in range(steps):
            t.train_step(t.stream.next_step(t.state, cfg.train.grad_accum))
            t._optimizer_step()
            t.state.step += 1
        task_eval_mod.generate_ids = recorded
        te, size = t.task_eval, cfg.train.eval_batch_size
        first = te._generated(
            t.objective, 0, te.tasks[0], [e for e in t.eval_examples if e[TASK_KEY] == 0], size, t.dist
        )
        overall, per_task = t.evaluate()
        res = {"first": first, "overall": overall, "tasks": per_task, "answers": answers}
        torch.save(res, Path(out) / f"rank{rank}.pt")
    except Exception:  # noqa: BLE001 - the test reads what was raised
        (Path(out) / f"rank{rank}.txt").write_text(traceback.format_exc())
    finally:
        task_eval_mod.generate_ids = real
        dist.destroy_process_group()
