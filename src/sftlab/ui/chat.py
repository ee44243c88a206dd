"""The Chat page's model: a run loaded once (runs.load_run) and answered with generate.py, as `sftlab generate`.

Each message is one prompt rendered with the run's template (a user turn), exactly what `sftlab generate RUN
"message"` answers; earlier turns are shown, not sent, as the CLI has no conversation either.
"""

from __future__ import annotations

import threading
from pathlib import Path

from ..errors import RunDirError


class ChatModels:
    """The last run loaded, kept until another run (or a newer final/ of the same run) is asked for."""

    def __init__(self) -> None:
        self._key: tuple[str, float] | None = None
        self._loaded = None
        self._lock = threading.Lock()

    def load(self, run_dir: str):
        """(model, tokenizer, config) of the run's final/ model."""
        from ..runs import RUN_INFO, load_run

        info = Path(run_dir) / "final" / RUN_INFO
        if not info.is_file():
            raise RunDirError(f"{run_dir}: no trained model in final/ (has the run finished?)")
        key = (str(Path(run_dir).resolve()), info.stat().st_mtime)
        if self._key != key:
            self._loaded = None  # free the old model before loading the next
            self._loaded = load_run(run_dir)
            self._key = key
        return self._loaded

    def reply(self, run_dir: str, message: str, max_new_tokens: int = 64, temperature: float = 0.0) -> str:
        from ..generate import generate

        with self._lock:  # one generation at a time: two would share the CPU threads and the loaded model
            model, tok, cfg = self.load(run_dir)
            if cfg.model.task == "seq-cls":
                raise RunDirError(f"{run_dir}: a seq-cls run classifies, it does not chat; use `sftlab eval`")
            out = generate(
                model,
                tok,
                cfg.data,
                [message],
                max_new_tokens=int(max_new_tokens),
                temperature=float(temperature),
                reserved_positions=getattr(cfg.method, "num_virtual_tokens", 0) or 0,
            )
        return out[0]
