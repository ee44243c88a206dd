"""Shared test helpers: small datasets on disk and a config builder (loop and CLI tests); tiny models, random
batches and a few-step training loop (method tests)."""

from __future__ import annotations

import copy
import hashlib
import json
import random
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F

from sftlab.config import PerfConfig, build_config
from sftlab.data import IGNORE
from sftlab.models import build_tiny
from sftlab.train import patches
from sftlab.train.objective import Objective

WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "fish", "bird"]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def file_tree(root: Path) -> dict[str, str]:
    """Every file under root with its content hash: a run directory compared byte for byte before and after."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def alpaca_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        w = rng.choice(WORDS)
        rows.append({"instruction": f"Repeat: {w}", "input": "", "output": f"{w} {w}"})
    return rows


def messages_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.choice(WORDS), rng.choice(WORDS)
        rows.append(
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": f"first {a}"},
                    {"role": "assistant", "content": a},
                    {"role": "user", "content": f"then {b}"},
                    {"role": "assistant", "content": b},
                ]
            }
        )
    return rows


def classification_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        pos = rng.random() < 0.5
        w = rng.choice(["good", "great", "fine"] if pos else ["bad", "awful", "poor"])
        rows.append({"text": f"this is {w} stuff", "label": "pos" if pos else "neg"})
    return rows


def seq2seq_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"source": f"upper {w}", "target": w.upper()} for w in (rng.choice(WORDS) for _ in range(n))]


FORMAT_FOR_TASK = {
    "causal-lm": ("alpaca", alpaca_rows),
    "seq-cls": ("classification", classification_rows),
    "seq2seq": ("seq2seq", seq2seq_rows),
}


def make_config(
    tmp: Path,
    model: str = "tiny-llama",
    task: str = "causal-lm",
    fmt: str | None = None,
    rows=None,
    n: int = 32,
    **sections,
):
    """A RunConfig over a fresh dataset in tmp; `sections` are dicts merged into method/data/train."""
    fmt_default, gen = FORMAT_FOR_TASK[task]
    fmt = fmt or fmt_default
    if rows is None:
        rows = {"alpaca": alpaca_rows, "messages": messages_rows}.get(fmt, gen)(n)
    tmp.mkdir(parents=True, exist_ok=True)
    train = write_jsonl(tmp / f"train-{fmt}.jsonl", rows)
    raw = {
        "model": {"name": model, "task": task},
        "method": {"name": "full", **sections.get("method", {})},
        "data": {"train": str(train), "format": fmt, "max_length": 128, **sections.get("data", {})},
        "train": {
            "output_dir": str(tmp / "run"),
            "max_steps": 10,
            "batch_size": 4,
            "lr": 1e-3,
            "schedule": "constant",
            "progress": False,
            "threads": 1,
            **sections.get("train", {}),
        },
        "perf": {**sections.get("perf", {})},
    }
    return build_config(raw)


# ---- the training objective, as training runs it, and a plain reference ---------------------------------

LEVERS = {  # short names the loss tests use -> perf: keys
    "chunk_size": "loss_chunk_size",
    "fused": "fused_loss",
    "varlen_attn": "varlen_attention",
    "trim_last_mlp": "trim_last_mlp",
    "fused_rope": "fused_rope",
    "onednn_gemm": "onednn_gemm",
}


def patched(model: torch.nn.Module):
    """The process-wide patches a training step runs in (oneDNN off), for tests whose backward must run there too:
    under activation checkpointing backward re-runs the forward."""
    return patches.applied(model, PerfConfig(onednn_gemm=False), malloc=False)


def compute_loss(model: torch.nn.Module, batch: dict, task: str, chunk_size: int = 512, **levers: bool):
    """(loss sum, supervised count) of one batch through `Objective` inside the process-wide patches, as the
    trainer runs it (malloc left alone). Levers default on, except oneDNN (torch's BLAS unless asked)."""
    kw = {"onednn_gemm": False, **levers, "chunk_size": chunk_size}
    perf = PerfConfig(**{LEVERS[k]: v for k, v in kw.items()})
    with patches.applied(model, perf, malloc=False):
        out = Objective(model, task, perf)(batch)
    return out.loss, out.count


def naive_causal_lm_loss(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
    """Reference: full logits over every position (what HF models do with labels=)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits.float()
    logits, target = logits[:, :-1], batch["labels"][:, 1:]
    n = int((target != IGNORE).sum())
    loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )
    return loss, n


# ---- tiny models, random batches, a few training steps (method tests) ------------------------------------

FAMILIES = [
    ("tiny-llama", "causal-lm"),
    ("tiny-gpt2", "causal-lm"),
    ("tiny-bert", "seq-cls"),
    ("tiny-t5", "seq2seq"),
]
PEFT_TASK = {"causal-lm": "CAUSAL_LM", "seq-cls": "SEQ_CLS", "seq2seq": "SEQ_2_SEQ_LM"}


@cache
def _built(name: str, task: str) -> torch.nn.Module:
    return build_tiny(name, task, 2 if task == "seq-cls" else None)[0]


def tiny_model(name: str, task: str) -> torch.nn.Module:
    """A fresh copy of the seeded tiny model (eval mode). build_tiny forks the RNG, so a deepcopy of a cached build
    is the same model and leaves the global RNG where a fresh build would, at a fraction of the cost."""
    return copy.deepcopy(_built(name, task))


def random_inputs(
    task: str,
    batch: int = 3,
    seq: int = 9,
    seed: int = 1,
    pad: str | None = "right",
    pad_id: int | None = None,
    dec_len: int = 5,
) -> dict[str, torch.Tensor]:
    """Random byte ids (batch, seq); `pad` masks 3 positions of the last row on that side (ids set to pad_id when
    given); seq2seq adds decoder_input_ids (batch, dec_len)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 260, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    if pad == "right":
        mask[-1, -3:] = 0
    elif pad == "left":
        mask[-1, :3] = 0
    if pad_id is not None:
        ids = ids.masked_fill(mask == 0, pad_id)
    out = {"input_ids": ids, "attention_mask": mask}
    if task == "seq2seq":
        out["decoder_input_ids"] = torch.randint(4, 260, (batch, dec_len), generator=g)
    return out


def with_labels(batch: dict[str, torch.Tensor], task: str) -> dict[str, torch.Tensor]:
    """Add labels in place: causal LM every real token, seq-cls 0/1, seq2seq the decoder ids (moved to labels)."""
    if task == "causal-lm":
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    elif task == "seq-cls":
        batch["labels"] = torch.tensor([0, 1, 1, 0][: len(batch["input_ids"])])
    else:
        batch["labels"] = batch.pop("decoder_input_ids")
    return batch


@torch.no_grad()
def logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).logits


def adamw(model: torch.nn.Module, lr: float) -> torch.optim.AdamW:
    """AdamW over the trainable parameters only (frozen ones get no optimizer state)."""
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)


def train_steps(
    model: torch.nn.Module, batch: dict, task: str, steps: int, opt: torch.optim.Optimizer
) -> list[float]:
    """`steps` updates on one batch through sftlab.train.loss; the mean loss before each update."""
    losses = []
    for _ in range(steps):
        loss_sum, n = compute_loss(model, batch, task)
        loss = loss_sum / n
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def mean_loss(model: torch.nn.Module, batch: dict, task: str) -> float:
    loss_sum, n = compute_loss(model, batch, task)
    return (loss_sum / n).item()


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of the state dict (parameters and persistent buffers), for `changed_keys`."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def changed_keys(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> set[str]:
    """State-dict entries whose values differ from the snapshot `before`."""
    return {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}


def with_lora(model: torch.nn.Module, name: str, tokenizer=None) -> torch.nn.Module:
    """LoRA r=4 on every linear, B drawn N(0, 0.05) so the adapters change outputs; eval mode (no dropout), so
    two runs of a comparison see the same network."""
    from sftlab.methods import MethodContext, get_method

    spec = get_method("lora")
    torch.manual_seed(0)
    cfg = spec.config(name="lora", r=4, target_modules="all-linear")
    spec.apply(model, cfg, MethodContext("causal-lm", tokenizer, name))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    return model.eval()


def causal_lm_with_method(name: str, method: str, **method_kw) -> torch.nn.Module:
    """A seeded tiny causal LM with `method` applied (its config fields: method_kw; LoRA without them: r=4,
    alpha=8 on all linears), LoRA B drawn non-zero so the adapters carry gradient through the base path, in
    eval mode: no dropout, so two paths see one network."""
    from sftlab.methods import MethodContext, get_method

    model, tok = build_tiny(name)
    cfg_kw = method_kw or ({"r": 4, "alpha": 8, "target_modules": "all-linear"} if method == "lora" else {})
    spec = get_method(method)
    torch.manual_seed(0)
    spec.apply(model, spec.config(name=method, **cfg_kw), MethodContext("causal-lm", tok, name))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    return model.eval()


def interrupt_after(monkeypatch, step: int):
    """Ctrl-C as optimizer step `step` + 1 begins (a checkpoint at `step` is what resume finds); returns the real
    Trainer._optimizer_step, to put back before resuming."""
    from sftlab.train.loop import Trainer

    real = Trainer._optimizer_step

    def stop(self):
        if self.state.step == step:
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(Trainer, "_optimizer_step", stop)
    return real
