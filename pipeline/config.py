"""Typed run configuration: one YAML file describes a whole run.

Every section is a pydantic model that forbids unknown keys, so a typo fails at load time
with one line naming the file, the key, the bad value and what is allowed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.errors import UserError

Modality = Literal["image", "text", "audio"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ----------------------------------------------------------------------------- data
class ImageData(Section):
    extensions: list[str] = ["jpg", "jpeg", "png", "webp"]


class TextData(Section):
    extensions: list[str] = ["txt"]
    json_key: str = Field("text", description="caption key in KEY.json when no text file exists")


class AudioData(Section):
    extensions: list[str] = ["flac", "wav", "mp3", "ogg"]
    sample_rate: int = Field(16000, gt=0)
    seconds: float = Field(2.0, gt=0)


class HardNegatives(Section):
    extension: str = "neg.txt"
    k: int = Field(1, ge=1, description="negatives per sample; extra ones are dropped, missing ones repeat")


class DataConfig(Section):
    train: str = Field(description="shard spec: brace expansion, several sources joined with '::'")
    train_weights: Optional[list[float]] = None
    val: Optional[str] = None
    resampled: bool = True
    num_samples: Optional[int] = Field(None, gt=0, description="epoch size; default from sizes.json")
    batch_size: int = Field(gt=0, description="global batch (all ranks together)")
    workers: int = Field(2, ge=0)
    shuffle_buffer: int = Field(1000, ge=0)
    missing_modality: Literal["mask", "drop"] = "mask"
    image: ImageData = ImageData()
    text: TextData = TextData()
    audio: AudioData = AudioData()
    hard_negatives: Optional[HardNegatives] = None


# ---------------------------------------------------------------------------- model
class TowerConfig(Section):
    """One encoder. `kind` picks the builder; the other keys are passed to it."""

    kind: Literal["timm", "open_clip_vision", "open_clip_text", "hf_text", "timm_audio", "hf_audio"]
    name: Optional[str] = Field(None, description="timm model name, or a local transformers path/config")
    pretrained: Optional[str] = Field(None, description="local safetensors file or folder: the tower's, an "
                                      "open_clip model's, or a timm/transformers checkpoint")
    options: dict[str, Any] = Field(default_factory=dict, description="passed to the builder")


class ModelConfig(Section):
    embed_dim: int = Field(gt=0)
    towers: dict[Modality, TowerConfig]
    init_logit_scale: float = Field(2.6592, description="log of the initial multiplier (ln 1/0.07)")
    init_logit_bias: Optional[float] = Field(None, description="sigmoid loss bias init (SigLIP: -10)")

    @model_validator(mode="after")
    def _at_least_two_towers(self):
        if len(self.towers) < 2:
            raise ValueError(f"needs at least two towers, got {sorted(self.towers)}")
        return self


# ----------------------------------------------------------------------------- loss
class LossConfig(Section):
    kind: Literal["clip", "siglip", "symile"] = "clip"
    chunk_size: Optional[int] = Field(None, gt=0, description="tile rows; null picks a default")
    hard_negative_alpha: float = Field(1.0, ge=0)
    hard_negative_beta: float = Field(0.0, ge=0)
    symile_negatives: Literal["n", "n_squared"] = "n"
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
    checkpoint_every: int = Field(100, gt=0)
    keep_checkpoints: int = Field(2, ge=1)
    max_bad_steps: int = Field(10, ge=1, description="abort after this many NaN/inf losses")


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
    modality: Modality = "image"
    name: Optional[str] = None


class EvalConfig(Section):
    every_steps: Optional[int] = Field(None, gt=0)
    batch_size: int = Field(256, gt=0)
    tasks: list[EvalTask] = Field(default_factory=list)


class ExportConfig(Section):
    format: Literal["open_clip", "safetensors"] = "open_clip"
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
    data: DataConfig
    model: ModelConfig
    loss: LossConfig = LossConfig()
    optim: OptimConfig
    train: TrainConfig = TrainConfig()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    eval: EvalConfig = EvalConfig()
    export: ExportConfig = ExportConfig()
    slurm: SlurmConfig = SlurmConfig()

    @model_validator(mode="after")
    def _consistent(self):
        if self.loss.kind == "siglip" and self.model.init_logit_bias is None:
            raise ValueError("loss.kind 'siglip' needs model.init_logit_bias (SigLIP uses -10)")
        if self.loss.kind != "symile" and len(self.model.towers) > 2 and self.loss.symile_negatives != "n":
            raise ValueError("loss.symile_negatives only applies to loss.kind 'symile'")
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
    if not isinstance(raw, dict):
        raise UserError(f"{source}: expected a YAML mapping at the top level, got {type(raw).__name__}")
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise UserError(_format_error(exc.errors()[0], source, raw)) from None


def load_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML run config, apply `--set` overrides, validate."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise UserError(f"config file {path} not found") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    raw = apply_overrides(raw if raw is not None else {}, list(overrides), str(path))
    return parse_config(raw, str(path))


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config so a run directory documents itself (and can be resumed)."""
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
