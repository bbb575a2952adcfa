"""Typed run configuration: one YAML file describes a whole run.

Every section is a pydantic model that forbids unknown keys, so a typo fails at load time
with one line naming the file, the key, the bad value and what is allowed. The sections that
depend on what is registered (a loss's own options, `data.<modality>`, tower kinds; see
pipeline.registry) are validated against the registries when a config is parsed; importing this
module pulls in no model, loss or engine code.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from pipeline.errors import UserError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _one_line(exc: ValidationError, prefix: str) -> str:
    err = exc.errors()[0]
    key = ".".join([prefix, *(str(p) for p in err["loc"])])
    if err["type"] == "extra_forbidden":
        return f"unknown key '{key}'; remove it or check the spelling"
    if err["type"] == "value_error":
        return f"{key}: {err['msg'].removeprefix('Value error, ')}"
    return f"key '{key}' has bad value {err.get('input')!r}; {err['msg']}"


def registered(registry_name: str, key: str):
    """A `kind`-keyed section validated by the class its registered component names (a discriminated
    union whose members are whatever is registered, plugins included)."""
    def validate(raw):
        from pipeline import registry

        if isinstance(raw, BaseModel):
            return raw
        if not isinstance(raw, dict) or "kind" not in raw:
            raise ValueError(f"{key} needs a 'kind'")
        entry = getattr(registry, registry_name).get(raw["kind"], f"{key}.kind")
        try:
            return entry.config.model_validate(raw)
        except ValidationError as exc:
            raise ValueError(_one_line(exc, key)) from None
    return BeforeValidator(validate)


# ----------------------------------------------------------------------------- data
class HardNegatives(Section):
    modality: str = Field("text", description="the modality of the negatives (decoded and preprocessed like it)")
    extension: str = "neg.txt"
    k: int = Field(1, ge=1, description="negatives per sample; extra ones are dropped, missing ones repeat")


class DataConfig(Section):
    """Besides these keys, `data.<modality>` sections (e.g. `data.audio.sample_rate`) configure each modality;
    their keys are the modality's own (pipeline/modalities)."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    train: str = Field(description="shard spec: brace expansion, several sources joined with '::'")
    train_weights: Optional[list[float]] = None
    val: Optional[str] = None
    resampled: bool = True
    num_samples: Optional[int] = Field(None, gt=0, description="epoch size; default from sizes.json")
    batch_size: int = Field(gt=0, description="global batch (all ranks together)")
    workers: int = Field(2, ge=0)
    shuffle_buffer: int = Field(1000, ge=0, description="samples each loader worker shuffles among")
    shuffle_buffer_mib: float = Field(512, gt=0, description="bound on the raw bytes that buffer holds per worker "
                                      "(1000 60-s 48 kHz FLACs would be 8 GB)")
    missing_modality: Literal["mask", "drop"] = "mask"
    hard_negatives: Optional[HardNegatives] = None
    max_empty_shards: int = Field(16, ge=1, description="stop the run after this many shard reads in a row "
                                  "gave no sample (empty, unreadable or missing tars)")
    max_skips_in_a_row: int = Field(1000, ge=1, description="stop the run after this many samples in a row "
                                    "were skipped (every sample corrupt or lacking the configured modalities)")

    @model_validator(mode="after")
    def _modality_sections(self):
        from pipeline.registry import MODALITIES

        for name, raw in list((self.model_extra or {}).items()):
            if name not in MODALITIES:
                raise ValueError(f"unknown key 'data.{name}'; allowed: the keys of data and the modalities "
                                 f"{MODALITIES.names()}")
            if not isinstance(raw, BaseModel):
                try:
                    self.model_extra[name] = MODALITIES.get(name, "data").config.model_validate(raw or {})
                except ValidationError as exc:
                    raise ValueError(_one_line(exc, f"data.{name}")) from None
        return self

    def modality(self, name: str):
        """The `data.<name>` section (its defaults when the config does not set it)."""
        from pipeline.registry import MODALITIES

        return (self.model_extra or {}).get(name) or MODALITIES.get(name, "data").config()


# ---------------------------------------------------------------------------- model
class TowerConfig(Section):
    """One encoder. `kind` picks the registered builder (pipeline.registry.TOWERS); the other keys go to it."""

    kind: str
    name: Optional[str] = Field(None, description="timm model name, or a local transformers path/config")
    pretrained: Optional[str] = Field(None, description="local safetensors file or folder: the tower's, an "
                                      "open_clip model's, or a timm/transformers checkpoint")
    options: dict[str, Any] = Field(default_factory=dict, description="passed to the builder")


class ModelConfig(Section):
    embed_dim: int = Field(gt=0)
    towers: dict[str, TowerConfig]
    init_logit_scale: float = Field(2.6592, description="log of the initial multiplier (ln 1/0.07)")
    init_logit_bias: Optional[float] = Field(None, description="sigmoid loss bias init (SigLIP: -10)")
    plugins: list[str] = Field(default_factory=list, description="set from the run's plugins:, so that a saved "
                               "model's config can be loaded on its own")

    @model_validator(mode="after")
    def _registered_towers(self):
        from pipeline.registry import MODALITIES, TOWERS

        if len(self.towers) < 2:
            raise ValueError(f"needs at least two towers, got {sorted(self.towers)}")
        for modality, tower in self.towers.items():
            if modality not in MODALITIES:
                raise ValueError(f"model.towers.{modality}: unknown modality; allowed: {MODALITIES.names()}")
            try:
                entry = TOWERS.get(tower.kind, f"model.towers.{modality}.kind")
            except UserError as exc:
                raise ValueError(str(exc)) from None
            if entry.info["modality"] != modality:
                allowed = [n for n in TOWERS.names() if TOWERS.get(n, "").info["modality"] == modality]
                raise ValueError(f"model.towers.{modality}.kind: {tower.kind!r} is a {entry.info['modality']} tower, "
                                 f"not {modality}; allowed: {allowed}")
        return self


# ----------------------------------------------------------------------------- loss
class LossSection(Section):
    """What every loss section has; each registered loss adds its own keys (pipeline/losses)."""

    kind: str
    chunk_size: Optional[int] = Field(None, gt=0, description="tile rows; null picks a default")
    compute_dtype: Literal["auto", "fp32"] = Field(
        "auto", description="tile GEMMs in the features' dtype (auto) or fp32; statistics stay fp32")
    distributed: Literal["auto", "gather", "ring"] = Field(
        "auto", description="columns across ranks: all-gathered, or passed around a ring (O(B_local·D) a rank); "
                            "auto rings from 3 ranks on")


# --------------------------------------------------------------------- optimisation
class OptimConfig(Section):
    lr: float = Field(gt=0)
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = Field(1e-6, gt=0)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    total_steps: int = Field(gt=0)
    grad_clip: Optional[float] = Field(1.0, gt=0)


class TrainConfig(Section):
    seed: int = 0
    micro_batch: Optional[int] = Field(
        None, gt=0, description="GradCache chunk per rank; null encodes the local batch at once"
    )
    log_every: int = Field(10, gt=0)
    log_keys: bool = Field(False, description="each rank appends the keys of every batch it trains on to "
                           "keys/rank{R}.jsonl: an audit of what a run saw, e.g. across a resume on other ranks")
    checkpoint_every: int = Field(100, gt=0)
    keep_checkpoints: int = Field(2, ge=1)
    max_bad_steps: int = Field(10, ge=1, description="abort after this many NaN/inf losses")
    collective_timeout_s: int = Field(600, gt=0, description="a rank waiting this long in a collective (a dead "
                                      "or stuck peer) fails the run; torch's default is 30 min")
    keep_freed_memory: bool = Field(True, description="glibc malloc keeps freed memory for the next step instead "
                                    "of returning it to the kernel (pipeline.train.allocator)")


class DeepSpeedConfig(Section):
    zero_stage: Literal[0, 1, 2, 3] = 0
    precision: Literal["fp32", "bf16"] = "fp32"
    config_override: Optional[str] = Field(None, description="DeepSpeed JSON merged over the generated one")

    @model_validator(mode="after")
    def _bf16_needs_zero(self):
        # Without ZeRO, DeepSpeed's bf16 path accumulates gradients in bf16 and keeps fp32 master
        # weights that its checkpoint tools cannot consolidate; ZeRO >= 1 keeps both in fp32.
        if self.precision == "bf16" and self.zero_stage == 0:
            raise ValueError("precision 'bf16' needs zero_stage >= 1 (1 costs nothing on one rank)")
        return self


# ----------------------------------------------------------------------------- eval
class EvalTask(Section):
    task: Literal["zeroshot_classification", "zeroshot_retrieval", "symile_classification"]
    dataset: str = Field(description="CLIP_benchmark wds root or project shards")
    modality: str = "image"
    name: Optional[str] = None


class EvalConfig(Section):
    every_steps: Optional[int] = Field(None, gt=0)
    batch_size: int = Field(256, gt=0)
    tasks: list[EvalTask] = Field(default_factory=list)


class ExportConfig(Section):
    format: Literal["open_clip", "hf", "safetensors"] = "open_clip"
    dir: Optional[str] = None


class SlurmConfig(Section):
    nodes: int = Field(1, gt=0)
    tasks_per_node: int = Field(1, gt=0)
    gpus_per_node: int = Field(0, ge=0)
    cpus_per_task: int = Field(1, gt=0)
    mem: Optional[str] = None
    time: str = "01:00:00"
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    job_name: str = "mmclip"
    signal_seconds: int = Field(120, gt=0, description="USR1 this many seconds before the time limit")
    requeue: bool = True
    setup: list[str] = Field(default_factory=list, description="shell lines run before srun (modules, venv)")
    env: dict[str, str] = Field(default_factory=dict)
    extra_sbatch: list[str] = Field(default_factory=list, description="raw '#SBATCH' options")


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
        from pipeline.registry import LOSSES

        if self.model.plugins != self.plugins:
            self.model.plugins = list(self.plugins)
        if LOSSES.get(self.loss.kind, "loss.kind").info.get("needs_logit_bias") and self.model.init_logit_bias is None:
            raise ValueError(f"loss.kind {self.loss.kind!r} needs model.init_logit_bias (SigLIP uses -10)")
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


def _format_error(err: dict, source: str, raw: dict) -> str:
    key = ".".join(str(p) for p in err["loc"]) or "(top level)"
    if err["type"] == "extra_forbidden":
        return f"{source}: unknown key '{key}'; remove it or check the spelling (see README 'Config')"
    if err["type"] == "missing":
        return f"{source}: missing required key '{key}'"
    value = raw
    for part in err["loc"]:
        try:
            value = value[part]
        except (KeyError, IndexError, TypeError):
            value = err.get("input")
            break
    msg = err["msg"]
    if err["type"] == "literal_error":
        allowed = err.get("ctx", {}).get("expected", "")
        msg = f"allowed: {allowed}"
    elif err["type"] == "value_error":
        return f"{source}: {key or 'config'}: {msg.removeprefix('Value error, ')}"
    return f"{source}: key '{key}' has bad value {value!r}; {msg}"


def parse_config(raw: Any, source: str) -> RunConfig:
    from pipeline.registry import import_plugins

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
        raise UserError(_format_error(exc.errors()[0], source, raw)) from None
    except UserError as exc:  # a registry lookup inside a section
        raise UserError(f"{source}: {exc}") from None


def load_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
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
