"""Checkpoints: atomic, every N steps and at the end, last k kept, resumable bit for bit.

Layout under `output_dir/checkpoints/`: `step_00000100/` (DeepSpeed's files, one RNG file per
rank, and a consolidated `model.safetensors` + `model_config.yaml`), and `latest` naming the
newest complete one. A checkpoint is written under `step_X.tmp` and renamed when every rank is
done, so a kill at any moment leaves the previous checkpoint intact; if a kill leaves `latest`
naming no complete checkpoint, `--resume latest` takes the newest complete one.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from pipeline.config import RunConfig
from pipeline.errors import UserError
from pipeline.models.io import WEIGHTS, save_model

LATEST = "latest"


TAG = re.compile(r"step_\d{8}")  # what tag_for writes; `.tmp` and `.old` siblings do not match


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def checkpoint_root(cfg: RunConfig) -> Path:
    return Path(cfg.output_dir) / "checkpoints"


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def save_checkpoint(engine, cfg: RunConfig, step: int, client_state: dict, rank: int) -> Path:
    root = checkpoint_root(cfg)
    tag = tag_for(step)
    tmp_tag = tag + ".tmp"
    if rank == 0 and (root / tmp_tag).exists():
        shutil.rmtree(root / tmp_tag)  # leftover of a killed save
    _barrier()
    engine.save_checkpoint(str(root), tag=tmp_tag, client_state=client_state, save_latest=False)
    torch.save(_rng_state(), root / tmp_tag / f"rng_rank{rank}.pt")
    _barrier()
    state = consolidated_state_dict(engine, root, tmp_tag, cfg.deepspeed.zero_stage)
    if rank == 0:
        save_model(state, cfg.model, root / tmp_tag)
        final, aside = root / tag, root / (tag + ".old")
        if final.exists():  # the same step saved again (a resume from an earlier checkpoint): swap, then delete
            shutil.rmtree(aside, ignore_errors=True)
            final.rename(aside)
        (root / tmp_tag).rename(final)
        _write_latest(root, tag)
        shutil.rmtree(aside, ignore_errors=True)
        _prune(root, cfg.train.keep_checkpoints)
    _barrier()
    return root / tag


def consolidated_state_dict(engine, root: Path, tag: str, zero_stage: int) -> Optional[dict]:
    """Full fp32 weights on rank 0 (None elsewhere): from the module, or from ZeRO's fp32 partitions."""
    if zero_stage == 0 and not engine.bfloat16_enabled():
        return {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    if not dist.is_initialized() or dist.get_rank() == 0:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
        buffers = {k: v for k, v in engine.module.state_dict().items() if k not in state and v.numel() > 0}
        return {**buffers, **state}
    return None


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(path: Path) -> None:
    if not path.is_file():
        return  # checkpoints written with a different world size: RNG streams restart
    state = torch.load(path, weights_only=True)
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _write_latest(root: Path, tag: str) -> None:
    tmp = root / (LATEST + ".tmp")
    tmp.write_text(tag + "\n")
    tmp.replace(root / LATEST)


def complete_checkpoints(root: Path) -> list[Path]:
    """Finished checkpoints, oldest first (not `.tmp` saves in progress, not `.old` ones being replaced)."""
    return sorted(p for p in root.glob("step_*") if TAG.fullmatch(p.name) and (p / WEIGHTS).is_file())


def _prune(root: Path, keep: int) -> None:
    for old in complete_checkpoints(root)[:-keep]:
        shutil.rmtree(old)


def find_resume_tag(cfg: RunConfig, resume: Optional[str]) -> Optional[str]:
    """`latest` -> newest complete checkpoint or None (fresh start); a path -> that checkpoint's tag."""
    if resume is None:
        return None
    root = checkpoint_root(cfg)
    if resume == "latest":
        latest = root / LATEST
        tag = latest.read_text().strip() if latest.is_file() else None
        if tag is not None and (root / tag / WEIGHTS).is_file():
            return tag
        # `latest` is missing or names a checkpoint a kill cut short: the newest complete one is the truth
        done = complete_checkpoints(root)
        return done[-1].name if done else None
    path = Path(resume)
    if not path.is_dir() or path.parent.resolve() != root.resolve():
        raise UserError(f"--resume {resume}: not a checkpoint directory under {root}; use --resume latest "
                        f"or one of {sorted(p.name for p in root.glob('step_*'))[-3:]}")
    return path.name


def load_checkpoint(engine, cfg: RunConfig, tag: str, rank: int) -> dict:
    root = checkpoint_root(cfg)
    load_path, client_state = engine.load_checkpoint(str(root), tag=tag)
    if load_path is None:
        raise UserError(f"checkpoint {root / tag} could not be loaded; remove it or pass --resume with another one")
    restore_rng(root / tag / f"rng_rank{rank}.pt")
    return client_state
