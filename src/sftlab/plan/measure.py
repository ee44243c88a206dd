"""`sftlab plan --measure`: a few real training steps per candidate on this machine, beside the estimates.

Each candidate runs in its own subprocess (`python -m sftlab.plan.measure SPEC.json`), so its peak RSS is its own:
the worker loads the data (the user's files through sftlab's readers, or synthetic examples of the stated
length), reads its resident memory, builds the model (the real weights where there are some, else random weights
from the config: the same sizes), applies the method, then runs `steps` optimizer steps through sftlab's Trainer
inside the training patches. Measured memory is the peak RSS during the steps minus the RSS before the model was
built (Linux: the peak is reset once the model is built, so a loader's transient copies do not count; without
/proc/self/clear_refs the lifetime peak is used); tokens/s is over the steps after the first (which allocates the
optimizer state). The worker prints one JSON line.

On a shared machine the CPU's speed moves between the plan's probes and a candidate's steps minutes later, so the
worker also probes the time model's rates (plan/timing.py) just before and just after its steps, in its own
process; the planner re-estimates tokens/s with them ("estimated beside the steps"), which separates the time
model's error from the load's drift.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

DEFAULT_STEPS = 3


@dataclass
class Measured:
    peak_rss_delta: float | None = None  # bytes
    tokens_per_s: float | None = None
    rates: dict | None = None  # the time model's rates probed beside the steps (timing.Rates fields)
    seconds: float = 0.0
    error: str | None = None
    skipped: str | None = None


def _status(key: str) -> int | None:
    try:
        m = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(m.group(1)) * 1024 if m else None


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss() -> int:
    hwm = _status("VmHWM")
    if hwm is not None:
        return hwm
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def synthetic_examples(task: str, n: int, length: int, share: float, target: int, vocab: int, seed: int = 0):
    """Encoded examples of `length` random tokens (causal-lm: the last `share` of them supervised)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        ids = [rng.randrange(4, vocab) for _ in range(length)]
        if task == "causal-lm":
            k = min(length - 1, round(length * (1 - share)))
            out.append({"input_ids": ids, "labels": [-100] * k + ids[k:]})
        elif task == "seq2seq":
            out.append({"input_ids": ids, "labels": [rng.randrange(4, vocab) for _ in range(target)]})
        else:
            out.append({"input_ids": ids, "labels": i % 2})
    return out


def worker(spec: dict) -> dict:
    """Run one candidate's steps as the spec says; the measurements as a dict."""
    import torch

    from .. import recipe
    from ..config import build_config
    from ..methods._targets import count_parameters
    from ..quant import is_quantized_layer
    from ..train import patches
    from ..train.loop import Trainer
    from ..train.memory import trim_heap

    torch.set_num_threads(spec["threads"])
    cfg = build_config(spec["config"], "plan --measure")
    synth = spec.get("synthetic")
    if synth:
        examples = synthetic_examples(cfg.model.task, **synth)
        tokenizer, labels, pad_id = None, ["0", "1"] if cfg.model.task == "seq-cls" else None, 0
    else:
        from ..hub import load_tokenizer

        tokenizer = load_tokenizer(spec["tokenizer"], cfg.model.trust_remote_code)
        train, _ = recipe.load_data(cfg, tokenizer, log=lambda *_: None)
        examples, labels, pad_id = train.examples, train.label_names, tokenizer.pad_token_id
    before = _status("VmRSS") or 0
    if spec["weights"]:
        model = recipe.load_base(cfg, tokenizer, labels)
    else:
        model = random_model(spec["config_path"], cfg, labels)
    recipe.apply_method(model, cfg, tokenizer)
    before_rates = _probe(spec)
    trim_heap()  # what building the model freed (a quantised base's fp32 weights) is not training's memory
    reset = _reset_peak()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(
            model, cfg.train, cfg.model.task, examples, pad_id, Path(tmp), log=lambda *_: None,
            perf=cfg.perf, callbacks=[],
        )  # fmt: skip
        seconds = tokens = 0.0
        with patches.applied(model, cfg.perf):
            for i in range(spec["steps"]):
                r = trainer.step()
                if i > 0 or spec["steps"] == 1:
                    seconds, tokens = seconds + r.seconds, tokens + r.real_tokens
    trainable, total = count_parameters(model)
    peak = _peak_rss() - before
    return {
        "peak_rss_delta": peak,
        "peak_reset": reset,
        "rates": _mean_rates(before_rates, _probe(spec)),
        "tokens_per_s": tokens / seconds if seconds else None,
        "seconds": seconds,
        "trainable": trainable,
        "total": total,
        "quantized_layers": sum(1 for m in model.modules() if is_quantized_layer(m)),
    }


def _probe(spec: dict) -> dict | None:
    """The time model's rates on this process's threads now (spec["probe"]: the plan's probe shapes)."""
    probe = spec.get("probe")
    if not probe:
        return None
    from dataclasses import asdict

    from . import timing

    rates = timing.calibrate(timing.ProbeShape(**probe["shape"]), spec["threads"], tuple(probe["widths"]),
                             autocast=probe.get("autocast"))  # fmt: skip
    return asdict(rates)


def _mean_rates(a: dict | None, b: dict | None) -> dict | None:
    """Field by field geometric mean of two probes (before and after the steps)."""
    if a is None or b is None:
        return a or b
    out = {k: (a[k] * b[k]) ** 0.5 for k in a if k != "thin"}
    out["thin"] = {w: (a["thin"][w] * b["thin"][w]) ** 0.5 for w in a["thin"]}
    return out


def random_model(config_path: str, cfg, labels):
    """Random weights from a config (a plan for a model known by its config only): same sizes as the real one."""
    import torch
    from transformers import AutoConfig

    from ..models import _AUTO_CLASSES, DTYPES

    config = AutoConfig.from_pretrained(config_path)
    if labels:
        config.num_labels = len(labels)
    model = _AUTO_CLASSES[cfg.model.task].from_config(
        config, dtype=DTYPES[cfg.model.dtype], attn_implementation=cfg.model.attn_implementation
    )
    torch.manual_seed(cfg.train.seed)
    spec = cfg.model.quant_spec()
    if spec is not None:  # model.quantize, as `load_model` applies it to a loaded checkpoint
        from ..quant import quantize_model

        quantize_model(model, spec)
    return model


def run(spec: dict, timeout: float) -> Measured:
    """One candidate in a fresh interpreter; its JSON line, or the error it ended with."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
        path = f.name
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "sftlab.plan.measure", path],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
    except subprocess.TimeoutExpired:
        return Measured(error=f"no result within {timeout:.0f} s", seconds=time.perf_counter() - t0)
    finally:
        os.unlink(path)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        return Measured(error=tail[:300], seconds=time.perf_counter() - t0)
    out = json.loads(lines[-1])
    return Measured(out["peak_rss_delta"], out["tokens_per_s"], out.get("rates"), out["seconds"])


def main(argv: list[str]) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import logging
    import warnings

    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    spec = json.loads(Path(argv[0]).read_text())
    print(json.dumps(worker(spec)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
