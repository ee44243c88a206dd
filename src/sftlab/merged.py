"""A run's method folded into its base weights, written as a plain Hugging Face model directory: what `sftlab merge`
writes, and what a pipeline stage after a LoRA stage starts from (`pipeline.py`)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .errors import RunDirError
from .methods import get_method, method_names
from .rundir import check_writable
from .runs import load_run


def check_out_dir(out: Path, force: bool) -> None:
    """Refuse a file, and a non-empty directory unless `force`; writes nothing."""
    if out.is_file() or out.is_symlink():
        raise FileExistsError(f"{out} is a file; give a directory for the merged model")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise FileExistsError(
            f"{out} is not empty ({', '.join(sorted(p.name for p in out.iterdir())[:5])}); "
            "choose a new directory or pass --force to replace it"
        )


def mergeable(method: str) -> bool:
    return get_method(method).merge is not None


def merge_run(
    run_dir: str | Path, out: str | Path, force: bool = False, trust_remote_code: bool = False
) -> Path:
    """Load the run, fold its method into the weights (the method's `merge`) and write model + tokenizer to `out`,
    beside it first and renamed, so `out` is either its old contents or the whole merged model."""
    out = Path(out)
    check_out_dir(out, force)
    check_writable(out.parent, "OUT_DIR (its parent)")  # merged beside OUT, then renamed
    model, tok, cfg = load_run(run_dir, trust_remote_code=trust_remote_code)
    spec = get_method(cfg.method.name)
    if spec.merge is None:
        names = [n for n in method_names() if mergeable(n)]
        raise RunDirError(
            f"{run_dir}: method {cfg.method.name!r} cannot be merged into the base weights "
            f"(mergeable methods: {', '.join(names)})"
        )
    merged = spec.merge(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.merge-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    weights = ("model.safetensors", "model.safetensors.index.json")
    if not (tmp / "config.json").is_file() or not any((tmp / w).is_file() for w in weights):
        shutil.rmtree(tmp, ignore_errors=True)
        raise FileNotFoundError(
            f"{out}: saving the merged model wrote no config.json/model.safetensors; nothing written"
        )
    if out.is_dir():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out
