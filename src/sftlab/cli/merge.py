"""sftlab merge RUN_DIR OUT_DIR: fold a run's method into the base (the method's `merge`) and write a plain HF model."""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

from ._args import add_trust_remote_code


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "merge",
        help="Merge a run's adapter (LoRA) into a plain Hugging Face model directory.",
        description="Fold the run's method into the base weights (LoRA: s·B·A and DoRA magnitudes); the result "
        "loads with AutoModel*.from_pretrained and has zero adapter overhead.",
    )
    p.add_argument("run_dir")
    p.add_argument("out_dir", help="new directory for the merged model (must not exist or be empty)")
    p.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR")
    add_trust_remote_code(p, "the run's model")
    p.set_defaults(func=run)


def check_out_dir(out: Path, force: bool) -> None:
    """Refuse a file, and a non-empty directory unless `force`; writes nothing."""
    if out.is_file() or out.is_symlink():
        raise FileExistsError(f"{out} is a file; give a directory for the merged model")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise FileExistsError(
            f"{out} is not empty ({', '.join(sorted(p.name for p in out.iterdir())[:5])}); "
            "choose a new directory or pass --force to replace it"
        )


def run(args: argparse.Namespace) -> int:
    from ..errors import RunDirError
    from ..methods import get_method, method_names
    from ..rundir import check_writable
    from ..runs import load_run

    out = Path(args.out_dir)
    check_out_dir(out, args.force)
    check_writable(out.parent, "OUT_DIR (its parent)")  # merged beside OUT, then renamed
    model, tok, cfg = load_run(args.run_dir, trust_remote_code=args.trust_remote_code)
    spec = get_method(cfg.method.name)
    if spec.merge is None:
        mergeable = [n for n in method_names() if get_method(n).merge is not None]
        raise RunDirError(
            f"{args.run_dir}: method {cfg.method.name!r} cannot be merged into the base weights "
            f"(mergeable methods: {', '.join(mergeable)})"
        )
    merged = spec.merge(model)
    # written beside OUT and renamed, so OUT is either the old contents or the whole merged model
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
    print(f"merged model written to {out}")
    return 0
