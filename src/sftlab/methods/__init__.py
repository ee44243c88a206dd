"""Registry of fine-tuning methods: name -> module that defines `METHOD: MethodSpec`.

Adding a method = one module in this folder + one line here. Modules are imported lazily so a
method's optional dependencies never slow down or break the others.
"""

from __future__ import annotations

import importlib

from ._base import MethodConfigBase, MethodContext, MethodSpec

_REGISTRY: dict[str, str] = {
    "full": "sftlab.methods.full",
    "freeze": "sftlab.methods.full",
    "lora": "sftlab.methods.lora",
    "adapter": "sftlab.methods.adapter",
    "prefix": "sftlab.methods.prefix",
    "ptuning": "sftlab.methods.prompt",
    "prompt": "sftlab.methods.prompt",
}


def method_names() -> list[str]:
    return list(_REGISTRY)


def get_method(name: str) -> MethodSpec:
    if name not in _REGISTRY:
        raise KeyError(f"method.name: {name!r} is not one of {', '.join(_REGISTRY)}")
    module = importlib.import_module(_REGISTRY[name])
    methods = getattr(module, "METHODS", None) or {module.METHOD.name: module.METHOD}
    return methods[name]


__all__ = ["MethodConfigBase", "MethodContext", "MethodSpec", "get_method", "method_names"]
