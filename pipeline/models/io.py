"""Save and reload a MultiModalCLIP as plain files: `model.safetensors` + `model_config.yaml`.

This is the one weights format the rest of the project reads (eval, export, `pretrained`).
Training checkpoints (DeepSpeed) carry a consolidated copy in this format too.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from pipeline.errors import UserError
from pipeline.integrity import MANIFEST, newest_verified, verify
from pipeline.models.clip import MultiModalCLIP, build_model
from pipeline.models.config import ModelConfig
from pipeline.registry import import_plugins

WEIGHTS = "model.safetensors"
MODEL_CONFIG = "model_config.yaml"
CHECKPOINT_TAG = re.compile(r"step_\d{8}")


def save_model(state_dict: dict[str, torch.Tensor], model_cfg: ModelConfig, out_dir: str | Path) -> Path:
    """Write weights + the model section of the config; temp files then rename, so a crash leaves no half file."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state_dict.items()}
    tmp = out / (WEIGHTS + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt", "producer": "mmclip"})
    tmp.replace(out / WEIGHTS)
    tmp_cfg = out / (MODEL_CONFIG + ".tmp")
    saved_cfg = model_cfg.model_dump(mode="json")
    for tower in saved_cfg["towers"].values():
        tower["pretrained"] = None  # these weights supersede the init; loading them must not need that file
    tmp_cfg.write_text(yaml.safe_dump(saved_cfg, sort_keys=False))
    tmp_cfg.replace(out / MODEL_CONFIG)
    return out


def checkpoints_of(run_dir: Path) -> list[Path]:
    """A run directory's finished checkpoints `checkpoints/step_NNNNNNNN/`, oldest first (not `.tmp` saves in
    progress, not `.old` ones being replaced); whether their files are intact is for `verify` to say."""
    return sorted(p for p in (Path(run_dir) / "checkpoints").glob("step_*")
                  if CHECKPOINT_TAG.fullmatch(p.name) and (p / MANIFEST).is_file())


def resolve_weights_dir(path: str | Path) -> Path:
    """A run directory (its newest checkpoint that verifies), a checkpoint directory (verified) or an export
    directory -> the folder holding the weights."""
    p = Path(path)
    if (p / MANIFEST).is_file():  # a checkpoint: trusted only if its files are what was saved
        reason = verify(p)
        if reason:
            newest = newest_verified(checkpoints_of(p.parent.parent), announce=lambda line: None)
            hint = f"; the newest one that verifies is {newest}" if newest else ""
            raise UserError(f"{p}: checkpoint fails verification ({reason}){hint}")
        return p
    if (p / WEIGHTS).is_file() and (p / MODEL_CONFIG).is_file():
        return p
    if (p / "checkpoints").is_dir():
        found = newest_verified(checkpoints_of(p))
        if found:
            return found
        raise UserError(f"{p}: no checkpoint under {p / 'checkpoints'} verifies; resume training to write one")
    if not p.exists():
        raise UserError(f"{p}: no such run directory, checkpoint or export")
    raise UserError(f"{p}: found no {WEIGHTS} + {MODEL_CONFIG} (nor checkpoints); pass a run directory, a "
                    f"checkpoint directory or an `mmclip export --format safetensors` folder")


def load_model(path: str | Path) -> tuple[MultiModalCLIP, ModelConfig]:
    """Rebuild the model from its saved config and load the weights strictly (safetensors: no pickle)."""
    folder = resolve_weights_dir(path)
    try:
        raw = yaml.safe_load((folder / MODEL_CONFIG).read_text())
        import_plugins(raw.get("plugins") or [], str(folder / MODEL_CONFIG))
        model_cfg = ModelConfig.model_validate(raw)
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"{folder / MODEL_CONFIG}: not a valid model config ({exc})") from None
    model = build_model(model_cfg)
    try:
        state = load_file(str(folder / WEIGHTS))
    except Exception as exc:  # safetensors raises its own types for truncated or damaged files
        raise UserError(f"{folder / WEIGHTS}: not a readable safetensors file ({exc}); re-export it, or pass the "
                        f"run directory to use its newest checkpoint that verifies") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"{folder / WEIGHTS}: weights do not match {MODEL_CONFIG}: missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}")
    return model.eval(), model_cfg
