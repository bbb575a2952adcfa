"""Lazy package exports: a package's public API without importing torch when only its config section is wanted.

`pipeline.config` imports every component's `config` module, which runs the component package's
`__init__`; with `__getattr__ = lazy_exports(__name__, {...})` there, `from pipeline.models import build_model`
still works but imports `pipeline.models.clip` (and torch, open_clip) only on first use.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_exports(package: str, exports: dict[str, str]) -> Callable[[str], Any]:
    """A module-level `__getattr__` resolving each name in `exports` from the module path it maps to."""
    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(exports[name]), name)
    return __getattr__
