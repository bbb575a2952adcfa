"""open_clip `local-dir:` export: open_clip_config.json + open_clip_model.safetensors (+ extra towers)."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

from pipeline.errors import UserError

CONFIG, WEIGHTS, EXTRA = "open_clip_config.json", "open_clip_model.safetensors", "extra_towers"


def copy_hf_text(tower, folder: Path, final: Path) -> dict:
    """A transformers text tower built from a local path: its config + tokenizer go into the export folder
    itself, where open_clip's `local-dir:` tokenizer looks for them (`final`: where that folder will live)."""
    from transformers import AutoTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    tower.encoder.config.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tower.preprocess.hf_tokenizer).save_pretrained(folder)
    return {**tower.export_cfg, "hf_model_name": str(final), "hf_tokenizer_name": str(final),
            "hf_model_pretrained": False}


def open_clip_state_dict(model) -> dict[str, torch.Tensor]:
    """towers.image.encoder.* -> visual.*; towers.text.encoder.* -> CLIP's top-level text keys; scalars as []."""
    text_prefix = "text." if model.towers["text"].kind == "hf_text" else ""  # CustomTextCLIP nests the text tower
    out = {}
    for key, value in model.state_dict().items():
        if key.startswith("towers.image.encoder."):
            out["visual." + key.removeprefix("towers.image.encoder.")] = value
        elif key.startswith("towers.text.encoder."):
            out[text_prefix + key.removeprefix("towers.text.encoder.")] = value
        elif key in ("logit_scale", "logit_bias"):
            out[key] = value.reshape(())
    return {k: v.detach().float().contiguous() for k, v in out.items()}


def open_clip_config(model, model_cfg) -> dict:
    image, text = model.towers["image"], model.towers["text"]
    cfg = {"embed_dim": model_cfg.embed_dim, "vision_cfg": image.export_cfg, "text_cfg": text.export_cfg}
    if model.logit_bias is not None:
        cfg["init_logit_bias"] = float(model.logit_bias.detach().item())
    pre = image.preprocess
    preprocess = {"size": pre.image_size, "mean": list(pre.mean), "std": list(pre.std),
                  "interpolation": pre.interpolation, "resize_mode": pre.resize_mode}
    return {"model_cfg": cfg, "preprocess_cfg": preprocess}


def export_open_clip(model, model_cfg, out_dir: str | Path, announce=print, final_dir: str | Path | None = None) -> Path:
    """Write the export into `out_dir`; `final_dir` is where it will be read from, if it is moved there after."""
    for modality in ("image", "text"):
        tower = model.towers[modality] if modality in model.towers else None  # noqa: SIM401 (a ModuleDict)
        if tower is None or tower.export_cfg is None:  # e.g. a model of image + audio only
            kind = tower.kind if tower else "no"
            raise UserError(f"open_clip export needs open_clip/timm image and open_clip text towers; this model has "
                            f"{kind} {modality} tower; use --format safetensors")
    out = Path(out_dir).resolve()
    final = Path(final_dir).resolve() if final_dir else out
    extra = [m for m in model.towers if m not in ("image", "text")]
    if extra:  # said first, before any file is written
        announce(f"note: open_clip cannot express the {', '.join(extra)} tower(s); they are written to "
                 f"{final / EXTRA}/<modality>/ (tower.safetensors + tower.yaml), not into the open_clip model")
    config = open_clip_config(model, model_cfg)
    if model.towers["text"].kind == "hf_text":
        announce(f"note: the transformers text tower's config.json and tokenizer are written into {final}; "
                 f"open_clip_config.json names that absolute path as hf_model_name, so re-export after moving it")
        config["model_cfg"]["text_cfg"] = copy_hf_text(model.towers["text"], out, final)
    out.mkdir(parents=True, exist_ok=True)
    save_file(open_clip_state_dict(model), str(out / WEIGHTS))
    (out / CONFIG).write_text(json.dumps(config, indent=2))
    for m in extra:
        write_extra_tower(model, model_cfg, m, out / EXTRA / m)
    return out


def write_extra_tower(model, model_cfg, modality: str, folder: Path) -> Path:
    """A tower no target library expresses: its weights + config, rebuilt by the pipeline's own builder."""
    folder.mkdir(parents=True, exist_ok=True)
    tower = model.towers[modality]
    save_file({k: v.detach().float().contiguous() for k, v in tower.encoder.state_dict().items()},
              str(folder / "tower.safetensors"))
    (folder / "tower.yaml").write_text(yaml.safe_dump({
        "embed_dim": model_cfg.embed_dim, "tower": model_cfg.towers[modality].model_dump(mode="json"),
        "preprocess": asdict(tower.preprocess),
        "load": "pipeline.models.build_tower(modality, TowerConfig(**tower), embed_dim).encoder"
                ".load_state_dict(safetensors.torch.load_file('tower.safetensors'))"}, sort_keys=False))
    return folder
