"""The Train page's settings: form fields <-> a run config YAML, checked as `sftlab train` checks it, and the
planner's estimate for the choice.

The page never builds a RunConfig of its own: it writes a YAML (a loaded YAML with the form's values put in) and
starts `sftlab train THAT.yaml [key=value ...]`, so the run is what the CLI would do with that file. Only the form's
key settings are fields; every other key comes from the loaded YAML or the extra overrides.
"""

from __future__ import annotations

import copy
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from ..config import RunConfig, load_config, load_yaml
from ..errors import ConfigError

METHODS = ["full", "freeze", "lora", "adapter", "prefix", "ptuning", "prompt"]
FORMATS = ["alpaca", "messages", "sharegpt", "text", "classification", "seq2seq"]
VIRTUAL_TOKEN_METHODS = ("prefix", "ptuning", "prompt")
# the planner's candidate that stands for a form choice (LoRA: the one with the form's rank, when it has one)
PLAN_KEYS = {"full": "full", "freeze": "freeze", "adapter": "houlsby", "prefix": "prefix", "prompt": "prompt"}


@dataclass
class TrainForm:
    """The key settings the Train page shows; `None`, "" or 0 leaves the loaded YAML's value (or the default)."""

    model: str = "tiny-llama"
    train_file: str = ""
    eval_file: str = ""
    format: str = "alpaca"
    method: str = "lora"
    lr: float | None = 2e-4
    max_steps: int | None = 100
    batch_size: int | None = 8
    lora_r: int | None = 8
    virtual_tokens: int | None = 16
    output_dir: str = "runs/ui"
    eval_every: int | None = None
    save_every: int | None = None

    def values(self) -> list[Any]:
        return list(asdict(self).values())

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


def read_yaml(path: str) -> dict:
    """A config file as a mapping (the same parser and messages as `sftlab train`)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {path!r} does not exist")
    raw = load_yaml(p.read_text(), str(p)) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: top level must be a mapping with model/method/data/train")
    return raw


def form_from_config(path: str) -> TrainForm:
    """The form's fields filled from a config file (validated first, so a bad file is reported now)."""
    cfg = load_config(path)
    method = cfg.method
    return TrainForm(
        model=cfg.model.name,
        train_file=str(cfg.data.train or ""),
        eval_file=str(cfg.data.eval or ""),
        format=cfg.data.format,
        method=method.name,
        lr=cfg.train.lr,
        max_steps=cfg.train.max_steps,
        batch_size=cfg.train.batch_size,
        lora_r=getattr(method, "r", None),
        virtual_tokens=getattr(method, "num_virtual_tokens", None),
        output_dir=str(cfg.train.output_dir),
        eval_every=cfg.train.eval_every,
        save_every=cfg.train.save_every,
    )


def raw_config(form: TrainForm, base: dict | None = None) -> dict:
    """The config mapping the run uses: `base` (a loaded YAML) with the form's values set. A method other than the
    base's starts from that method's defaults (the old method's keys would not validate)."""
    raw = copy.deepcopy(base or {})
    for section in ("model", "method", "data", "train"):
        if not isinstance(raw.get(section), dict):
            raw[section] = {}
    model, method, data, train = raw["model"], raw["method"], raw["data"], raw["train"]
    if form.model:
        model["name"] = form.model.strip()
    if form.method and method.get("name") != form.method:
        method.clear()
        method["name"] = form.method
    if form.method == "lora" and form.lora_r:
        method["r"] = int(form.lora_r)
    if form.method in VIRTUAL_TOKEN_METHODS and form.virtual_tokens:
        method["num_virtual_tokens"] = int(form.virtual_tokens)
    if form.train_file:
        data["train"] = form.train_file.strip()
    if form.eval_file:
        data["eval"] = form.eval_file.strip()
    if form.format:
        data["format"] = form.format
    for key in ("lr", "max_steps", "batch_size", "eval_every", "save_every"):
        value = getattr(form, key)
        if value not in (
            None,
            "",
            0,
        ):  # an empty number field shows 0: the loaded YAML's value (or the default)
            train[key] = float(value) if key == "lr" else int(value)
    if form.output_dir:
        train["output_dir"] = form.output_dir.strip()
    return raw


def parse_extra(text: str) -> list[str]:
    """Extra `key=value` overrides, one per line (blank lines and `#` comments skipped)."""
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "=" not in line or not line.split("=", 1)[0].strip():
            raise ConfigError(
                f"extra overrides, line {n}: {line!r}: expected key=value (e.g. method.alpha=32)"
            )
        out.append(line)
    return out


def config_path(state_dir: str | Path, output_dir: str) -> Path:
    """Where the page keeps the YAML it runs for `output_dir` (one per run directory, rewritten at each start)."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", output_dir.strip()).strip("_") or "run"
    return Path(state_dir) / "configs" / f"{slug}.yaml"


def write_config(raw: dict, path: Path, overrides: list[str]) -> RunConfig:
    """Validate as `sftlab train` will (the same load_config), then write the YAML. Returns the resolved config."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "# written by `sftlab ui`; run it with: sftlab train " + str(path) + "\n"
    text += yaml.safe_dump(raw, sort_keys=False)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    try:
        cfg = load_config(tmp, overrides)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(path)
    return cfg


def plan_key(form: TrainForm, keys: list[str]) -> str | None:
    """The planner's candidate for the form's method, or None when it has none (ptuning, a LoRA rank it lacks)."""
    key = f"lora-r{form.lora_r}" if form.method == "lora" else PLAN_KEYS.get(form.method)
    return key if key in keys else None


PLAN_COLUMNS = ["", "method", "trainable", "peak memory", "fits", "time/epoch", "storage/task"]


def plan_estimate(form: TrainForm) -> tuple[list[list[Any]], str]:
    """`sftlab plan --model M --data FILE --format F --batch-size B` through its Python API: a row per candidate
    (the form's choice marked `>`, the recommendation `*`) and a text with the choice, the recommendation and its
    reasons."""
    from ..plan import PlanInputs, make_plan
    from ..plan.report import human_bytes, human_count, human_time, to_json

    if not form.train_file:
        raise ConfigError("data.train: give a training file for the estimate (it counts the tokens)")
    inp = PlanInputs(
        model=form.model.strip(), data=[form.train_file.strip()], format=form.format,
        batch_size=int(form.batch_size or 8),
    )  # fmt: skip
    plan = make_plan(inp, lambda *_: None)
    js = to_json(plan)
    keys = [c["key"] for c in js["candidates"]]
    mine, rec = plan_key(form, keys), js["recommendation"]
    rows = []
    for c in js["candidates"]:
        mark = (">" if c["key"] == mine else "") + ("*" if c["key"] == rec["choice"] else "")
        if "memory" not in c:
            rows.append([mark, c["label"], "n/a", "", "", "", ""])
            continue
        share = c["trainable_share"] or 0
        fits = "yes" if c["fits"] else ("ckpt" if c["fits_checkpointed"] else "no")
        rows.append([mark, c["label"], f"{human_count(c['trainable_params'])} ({share:.2%})",
                     human_bytes(c["memory"]["peak"]), fits, human_time(c["time_per_epoch_s"]),
                     human_bytes(c["storage_per_task"])])  # fmt: skip
    lines = [
        f"model: {js['model']['source']}; data: {js['workload']['described']}; device: {js['device']['name']}"
    ]
    if mine:
        e = next(c for c in js["candidates"] if c["key"] == mine)
        lines.append(f"your choice (>): {e['label']}, peak {human_bytes(e['memory']['peak'])}, "
                     f"{human_time(e['time_per_epoch_s'])} an epoch")  # fmt: skip
    else:
        lines.append(f"your choice ({form.method}) has no estimate of its own")
    if rec["choice"]:
        label = next(c["label"] for c in js["candidates"] if c["key"] == rec["choice"])
        lines.append(f"recommendation (*): {label} ({rec['rule']})")
    lines += [f"- {r['factor']}: {r['text']}" for r in rec["reasons"] + rec["advice"]]
    return rows, "\n".join(lines)
