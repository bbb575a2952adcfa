"""The base of every config section, and the one formatter that turns a validation error into one line.

Each component owns its section beside its code (`pipeline/data/config.py`, `pipeline/losses/config.py`, ...);
`pipeline.config` assembles them into a run config. Importing this pulls in pydantic only.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError

from pipeline import registry

if TYPE_CHECKING:
    from pydantic_core import ErrorDetails


class Section(BaseModel):
    """A config section: unknown keys are errors, and so are bad values assigned later."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def error_line(err: ErrorDetails, prefix: str = "", raw: Any = None) -> str:
    """One pydantic error as one line naming the key (under `prefix`), the bad value and what is allowed;
    the value is looked up in `raw` (the YAML as written) when given."""
    key = ".".join([*([prefix] if prefix else []), *(str(p) for p in err["loc"])]) or "(top level)"
    if err["type"] == "extra_forbidden":
        return f"unknown key '{key}'; remove it or check the spelling (see README 'Config')"
    if err["type"] == "missing":
        return f"missing required key '{key}'"
    if err["type"] == "value_error":
        return f"{key}: {err['msg'].removeprefix('Value error, ')}"
    value = err.get("input")
    if raw is not None:
        value = raw
        for part in err["loc"]:
            try:
                value = value[part]
            except (KeyError, IndexError, TypeError):
                value = err.get("input")
                break
    msg = err["msg"]
    if err["type"] == "literal_error":
        msg = f"allowed: {err.get('ctx', {}).get('expected', '')}"
    return f"key '{key}' has bad value {value!r}; {msg}"


def validate_section(cls: type[BaseModel], raw: Any, key: str) -> BaseModel:
    """`cls` from `raw`, a failure raised as a ValueError with one line about `key` (inside a validator)."""
    try:
        return cls.model_validate(raw)
    except ValidationError as exc:
        raise ValueError(error_line(exc.errors()[0], key)) from None


def registered(registry_name: str, key: str):
    """A `kind`-keyed section validated by the class its registered component names (a discriminated
    union whose members are whatever is registered, plugins included)."""
    def validate(raw):
        if isinstance(raw, BaseModel):
            return raw
        if not isinstance(raw, dict) or "kind" not in raw:
            raise ValueError(f"{key} needs a 'kind'")
        return validate_section(getattr(registry, registry_name).get(raw["kind"], f"{key}.kind").config, raw, key)
    return BeforeValidator(validate)
