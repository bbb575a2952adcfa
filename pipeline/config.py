"""Typed run configuration: one YAML file describes a whole run.

Each component owns its section beside its code (`data:` pipeline/data/config.py, `model:`
pipeline/models/config.py, `loss:` pipeline/losses/config.py plus each loss's own keys, `optim:`/`train:`/
`deepspeed:` pipeline/train/config.py, `eval:`, `export:`, `slurm:` pipeline/launch/config.py); this module
assembles them into `RunConfig` and loads YAML. Every section forbids unknown keys, so a typo fails at load
time with one line naming the file, the key, the bad value and what is allowed (`pipeline.section.error_line`).
The sections that depend on what is registered (a loss's own options, `data.<modality>`, tower kinds; see
pipeline.registry) are validated against the registries when a config is parsed.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import Field, ValidationError, model_validator

from pipeline.data.config import DataConfig
from pipeline.errors import UserError
from pipeline.eval.config import EvalConfig
from pipeline.export.config import ExportConfig
from pipeline.launch.config import SlurmConfig
from pipeline.losses.config import LossSection
from pipeline.models.config import ModelConfig
from pipeline.registry import LOSSES, import_plugins
from pipeline.section import Section, error_line, registered
from pipeline.train.config import DeepSpeedConfig, OptimConfig, TrainConfig


class RunConfig(Section):
    output_dir: str
    plugins: list[str] = Field(default_factory=list, description="modules or .py files imported first, so they "
                               "can register losses, towers and modalities")
    data: DataConfig
    model: ModelConfig
    loss: Annotated[LossSection, registered("LOSSES", "loss")] = Field(
        default_factory=lambda: {"kind": "clip"}, validate_default=True)
    optim: OptimConfig
    train: TrainConfig = TrainConfig()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    eval: EvalConfig = EvalConfig()
    export: ExportConfig = ExportConfig()
    slurm: SlurmConfig = SlurmConfig()

    @model_validator(mode="after")
    def _consistent(self):
        if self.model.plugins != self.plugins:
            self.model.plugins = list(self.plugins)
        if "logit_bias" in LOSSES.get(self.loss.kind, "loss.kind").obj.requires and self.model.init_logit_bias is None:
            raise ValueError(f"loss.kind {self.loss.kind!r} needs model.init_logit_bias (SigLIP uses -10)")
        if self.train.compile != "none" and self.deepspeed.zero_stage == 3:
            # its trace fails on the partitioned weights, and that failure would turn the fused loss tiles off too
            raise ValueError(f"train.compile {self.train.compile!r} needs deepspeed.zero_stage <= 2: ZeRO-3 gathers "
                             "each layer's weights in hooks inside the forward, which torch.compile cannot trace")
        weights = self.data.train_weights
        if weights is not None and len(weights) != len(self.data.train.split("::")):
            raise ValueError(
                f"data.train_weights has {len(weights)} entries but data.train has "
                f"{len(self.data.train.split('::'))} sources"
            )
        return self

    @property
    def modalities(self) -> list[str]:
        return sorted(self.model.towers)


# ------------------------------------------------------------------------- loading
def _parse_scalar(text: str) -> Any:
    """`--set` values use YAML scalars: 3, 1e-3, true, null, [a, b], "str"."""
    return yaml.safe_load(text) if text.strip() else ""


def apply_overrides(raw: dict, overrides: list[str], source: str) -> dict:
    """Apply `a.b.c=value` strings to a nested dict, creating intermediate sections."""
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. --set optim.lr=1e-4")
        key, value = item.split("=", 1)
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise UserError(f"--set {key}: {part!r} in {source} is not a section")
            node = child
        node[parts[-1]] = _parse_scalar(value)
    return raw


def parse_config(raw: Any, source: str) -> RunConfig:
    if not isinstance(raw, dict):
        raise UserError(f"{source}: expected a YAML mapping at the top level, got {type(raw).__name__}")
    plugins = raw.get("plugins") or []
    if not isinstance(plugins, list):
        raise UserError(f"{source}: plugins must be a list of modules or .py files")
    base = Path(source).parent
    raw["plugins"] = [str((base / p).resolve()) if p.endswith(".py") and not Path(p).is_file() else
                      str(Path(p).resolve()) if p.endswith(".py") else p for p in plugins]
    import_plugins(raw["plugins"], source)
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise UserError(f"{source}: {error_line(exc.errors()[0], raw=raw)}") from None
    except UserError as exc:  # a registry lookup inside a section
        raise UserError(f"{source}: {exc}") from None


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a YAML run config, apply `--set` overrides, validate."""
    path = Path(path)
    if path.is_dir():
        hint = f" (this run's own is {path / 'config.yaml'})" if (path / "config.yaml").is_file() else ""
        raise UserError(f"config {path} is a directory; give a YAML run config file such as configs/demo.yaml{hint}")
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise UserError(f"config file {path} not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"config file {path} cannot be read ({exc}); give a YAML run config file") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    raw = apply_overrides(raw if raw is not None else {}, list(overrides), str(path))
    return parse_config(raw, str(path))


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config so a run directory documents itself (and can be resumed)."""
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
