"""Validation errors as config lines: each names its dotted key, the bad value, the allowed values and a
"did you mean" for an unknown key."""

from __future__ import annotations

import difflib
import typing
from typing import Any

from pydantic import ValidationError

from ..strict import StrictModel


def _suggest(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _model_at(model: type[StrictModel] | None, loc: tuple) -> type[StrictModel] | None:
    for part in loc:
        if model is None:
            return None
        if str(part).startswith("[") or str(part).isdigit():
            continue  # an item of a list of sections (data.tasks[i])
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        model = _section(field.annotation)
    return model


def _section(ann: Any) -> type[StrictModel] | None:
    """The config section an annotation holds: X, X | None or list[X] for a StrictModel X."""
    if isinstance(ann, type) and not typing.get_args(ann) and issubclass(ann, StrictModel):
        return ann
    return next((m for m in map(_section, typing.get_args(ann)) if m is not None), None)


def _error_lines(err: ValidationError, prefix: str = "", *, model: type[StrictModel]) -> list[str]:
    """One line per error of `err`, raised validating `model` (keys named from `prefix`, the section it holds)."""
    lines = []
    for e in err.errors():
        loc = tuple(f"[{p}]" if isinstance(p, int) else str(p) for p in e["loc"])
        key = ".".join(((prefix,) if prefix else ()) + loc).replace(".[", "[")
        if e["type"] == "extra_forbidden":
            parent = _model_at(model, loc[:-1])
            options = list(parent.model_fields) if parent else []
            lines.append(f"{key}: unknown key{_suggest(loc[-1], options)}; allowed: {', '.join(options)}")
            continue
        msg = e["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        if e["type"] == "literal_error":
            allowed = e.get("ctx", {}).get("expected", "")
            lines.append(f"{key}: {e.get('input')!r} is not allowed; expected {allowed}")
        elif e["type"] == "missing":
            lines.append(f"{key}: required key is missing")
        elif (msg.startswith("method") or msg.startswith(key)) and ":" in msg.split(" ")[0]:
            lines.append(msg)  # already phrased by the method dispatcher or a validator naming its key
        else:
            lines.append(f"{key}: {msg} (got {e.get('input')!r})")
    return lines
