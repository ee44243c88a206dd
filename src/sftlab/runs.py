"""The run directory: its layout, the atomic `final/` write, and reloading a trained run for use.

run_dir/config.yaml      resolved config
run_dir/metrics.jsonl    one row per logged step / eval
run_dir/loss.png         train and eval loss vs step
run_dir/checkpoints/step-N/
run_dir/final/           adapter (PEFT layout where PEFT has the method) or full HF model, plus tokenizer
run_dir/final/sftlab.json  method, task, base model, label names
run_dir/summary.json
run_dir/.sftlab-run.json  the entries sftlab wrote: what --overwrite may delete (rundir.py)
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from torch import nn

from . import hub
from .config import RunConfig, ignore_saved_remote_code, load_config
from .errors import RunDirError
from .files import check_safetensors, read_json, read_json_object
from .methods import MethodContext, MethodSpec, get_method

RUN_INFO = "sftlab.json"


def method_of(cfg: RunConfig, tokenizer) -> tuple[MethodSpec, MethodContext]:
    """The run's method and what it may know of the run: the one place both are made."""
    ctx = MethodContext(task=cfg.model.task, tokenizer=tokenizer, base_model_name=cfg.model.name)
    return get_method(cfg.method.name), ctx


def save_final(
    model: nn.Module, tokenizer, cfg: RunConfig, run_dir: Path, label_names: list[str] | None
) -> Path:
    """Write final/ into a temp dir and rename, so a crash never leaves a half-written final model."""
    final, tmp = run_dir / "final", run_dir / ".final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    spec, ctx = method_of(cfg, tokenizer)
    spec.save(model, cfg.method, tmp, ctx)
    tokenizer.save_pretrained(tmp)
    info = {
        "method": cfg.method.name,
        "task": cfg.model.task,
        "base_model": cfg.model.name,
        "label_names": label_names,
    }
    (tmp / RUN_INFO).write_text(json.dumps(info, indent=2))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def load_run(
    run_dir: str | Path, which: str = "final", trust_remote_code: bool = False
) -> tuple[nn.Module, object, RunConfig]:
    """(model, tokenizer, config) of a trained run, ready for eval or generation. The model's own code (auto_map)
    runs only with `trust_remote_code` (the user's --trust-remote-code); the run's config.yaml cannot turn it on."""
    run = Path(run_dir)
    cfg_path = run / "config.yaml"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{run}: not a run directory (no config.yaml)")
    cfg = ignore_saved_remote_code(load_config(cfg_path, migrate=True), trust_remote_code, str(cfg_path))
    final = run / which
    info_path = final / RUN_INFO
    if not info_path.is_file():
        raise FileNotFoundError(f"{final}: no trained model here (did the run finish? try --resume)")
    info = read_json_object(info_path, "run info")
    labels = info.get("label_names")
    if labels is not None and (not isinstance(labels, list) or not all(isinstance(x, str) for x in labels)):
        raise RunDirError(
            f"{info_path}: label_names: expected a list of strings or null (got {labels!r:.60})"
        )
    num_labels = len(labels) if labels else None
    check_files(final)
    m = cfg.model
    tokenizer = hub.load_tokenizer(str(final), m.trust_remote_code)
    spec, ctx = method_of(cfg, tokenizer)
    source = str(final) if spec.saves_full_model else m.name
    model, _ = hub.load_model(
        source, m.task, m.dtype, num_labels, m.trust_remote_code, m.attn_implementation, tokenizer=tokenizer
    )
    if not spec.saves_full_model:
        spec.apply(model, cfg.method, ctx)
        spec.load(model, cfg.method, final, ctx)
    if labels:  # a rebuilt base names its classes LABEL_0..; the run's names say what each output means
        model.config.id2label = dict(enumerate(labels))
        model.config.label2id = {name: i for i, name in enumerate(labels)}
    model.eval()
    return model, tokenizer, cfg


def check_files(final: Path) -> None:
    """Every JSON and safetensors file in final/ parses (safetensors: its header), so a truncated or garbled one is
    a RunDirError naming it, before transformers or a method's loader trips over it."""
    for f in sorted(final.glob("*.json")):
        read_json(f, "JSON file")
    for f in sorted(final.glob("*.safetensors")):
        check_safetensors(f)
