"""Registries: a config names a loss, a tower kind or a modality; the registry finds the code.

One small helper used three times (`LOSSES`, `TOWERS`, `MODALITIES`). A component registers itself
where it is defined (`@LOSSES.register("clip", config=ClipConfig)`), so adding one is one new file;
code outside the package registers the same way from a module named in the config's `plugins:`.
This module imports nothing heavy: the config can ask it for names without pulling in torch code.
The built-in components are imported on first lookup (`BUILTINS`), so every registry is complete
whichever module asks first.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from pipeline.errors import UserError


@dataclass
class Entry:
    name: str
    obj: Any
    config: Optional[type] = None  # the pydantic section that configures it, when it has one
    info: dict = field(default_factory=dict)  # e.g. a tower's modality


class Registry:
    def __init__(self, what: str, builtins: str, instances: bool = False):
        self.what, self.builtins, self.instances = what, builtins, instances
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, config: Optional[type] = None, **info) -> Callable:
        """Decorator; with `instances`, the registered object is an instance of the decorated class."""
        def add(obj):
            self._entries[name] = Entry(name, obj() if self.instances else obj, config, info)
            return obj
        return add

    def _load(self) -> None:
        importlib.import_module(self.builtins)

    def names(self) -> list[str]:
        self._load()
        return sorted(self._entries)

    def get(self, name: str, key: str) -> Entry:
        """The entry for `name`; unknown names fail in one line naming the config key and what is allowed."""
        self._load()
        if name not in self._entries:
            raise UserError(f"{key}: unknown {self.what} {name!r}; allowed: {', '.join(map(repr, self.names()))} "
                            f"(or register one from a module listed in plugins:)")
        return self._entries[name]

    def section(self, name: str, key: str) -> type:
        """The config section `name` registered with (every modality and loss registers one)."""
        config = self.get(name, key).config
        assert config is not None, f"{self.what} {name!r} was registered without config="
        return config

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._entries


LOSSES = Registry("loss", "pipeline.losses.objectives")
TOWERS = Registry("tower kind", "pipeline.models.towers")
MODALITIES = Registry("modality", "pipeline.modalities", instances=True)


def import_plugins(plugins: list[str], source: str) -> None:
    """Import each plugin (a module name, or a .py file path) so its registrations take effect."""
    for plugin in plugins:
        if plugin.endswith(".py"):
            path = Path(plugin)
            if not path.is_file():
                raise UserError(f"{source}: plugins: {plugin} not found")
            name = f"mmclip_plugin_{path.stem}"
            if name in sys.modules:
                continue
            spec = importlib.util.spec_from_file_location(name, path)
            assert spec is not None and spec.loader is not None  # a .py file always gets a source loader
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
        else:
            try:
                importlib.import_module(plugin)
            except ModuleNotFoundError as exc:
                raise UserError(f"{source}: plugins: cannot import {plugin!r} ({exc}); give an importable module "
                                f"or a .py file path") from None
