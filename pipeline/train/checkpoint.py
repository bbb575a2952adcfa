"""Checkpoints: atomic, every N steps and at the end, last k kept, resumable bit for bit.

Layout under `output_dir/checkpoints/`: `step_00000100/` (DeepSpeed's files, one `rank{R}_state.pt`
per rank with its RNG state and its share of the loss's state, a consolidated `model.safetensors` +
`model_config.yaml`, `layout.json` with the ranks, ZeRO stage and batch it was written with (see
pipeline.train.elastic), and `manifest.json` with every file's size and CRC32), and `latest` naming the
newest one. A checkpoint is written under `step_X.tmp` and renamed when every rank is done, so a kill
at any moment leaves the previous checkpoint intact. Each rank hashes the files it wrote right after
writing them; rank 0 merges the lists and writes the manifest last. Only a checkpoint whose manifest verifies is resumed
from: `--resume latest` passes over (and names) any that do not.
"""
from __future__ import annotations

import shutil
from fnmatch import fnmatch
from pathlib import Path
from typing import Any, Optional, cast

import torch
import torch.distributed as dist

from pipeline.config import RunConfig
from pipeline.errors import UserError
from pipeline.integrity import MANIFEST, hash_files, newest_verified, verify, write_manifest
from pipeline.models.io import checkpoints_of, save_model
from pipeline.train.elastic import Plan, write_layout
from pipeline.train.ranks import barrier, decide_on_rank0, distributed

LATEST = "latest"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def checkpoint_root(cfg: RunConfig) -> Path:
    return Path(cfg.output_dir) / "checkpoints"


def _own_files(folder: Path, rank: int) -> list[str]:
    """The files this rank wrote: DeepSpeed names per-rank partitions `*pp_rank_R_*`; the rank state is ours."""
    return [p.name for p in folder.iterdir() if fnmatch(p.name, f"*pp_rank_{rank}_*") or p.name == _rank_file(rank)]


def _rank_file(rank: int) -> str:
    return f"rank{rank}_state.pt"


def _gather_records(records: dict) -> dict:
    if not distributed():
        return records
    parts: list[Any] = [None] * dist.get_world_size()  # filled with each rank's records
    dist.all_gather_object(parts, records)
    return {k: v for part in parts for k, v in part.items()}


def save_checkpoint(engine, cfg: RunConfig, step: int, client_state: dict, rank: int, loss_state: dict,
                    logit_scale: float | None = None) -> Path:
    """`client_state` is the run's (saved once); `loss_state` this rank's share of the loss's state;
    `logit_scale`, if given, replaces the model's in model.safetensors (what eval and export read)."""
    root = checkpoint_root(cfg)
    tag = tag_for(step)
    tmp_tag = tag + ".tmp"
    if rank == 0 and (root / tmp_tag).exists():
        shutil.rmtree(root / tmp_tag)  # leftover of a killed save
    barrier()
    engine.save_checkpoint(str(root), tag=tmp_tag, client_state=client_state, save_latest=False)
    folder = root / tmp_tag
    torch.save({"rng": _rng_state(), "loss": loss_state}, folder / _rank_file(rank))
    barrier()  # every rank's files are written (a rank may hash only once its own writes are done)
    records = _gather_records(hash_files(folder, _own_files(folder, rank)))
    state = consolidated_state_dict(engine, root, tmp_tag, cfg.deepspeed.zero_stage)
    if rank == 0:
        assert state is not None  # rank 0 gets the full weights
        if logit_scale is not None:
            state["logit_scale"] = torch.full_like(state["logit_scale"], logit_scale)
        save_model(state, cfg.model, folder)
        write_layout(folder, cfg, dist.get_world_size() if dist.is_initialized() else 1, client_state)
        rest = [p.name for p in folder.iterdir() if p.is_file() and p.name not in records and p.name != MANIFEST]
        write_manifest(folder, {**records, **hash_files(folder, rest)})
        final, aside = root / tag, root / (tag + ".old")
        if final.exists():  # the same step saved again (a resume from an earlier checkpoint): swap, then delete
            shutil.rmtree(aside, ignore_errors=True)
            final.rename(aside)
        folder.rename(final)
        _write_latest(root, tag)
        shutil.rmtree(aside, ignore_errors=True)
        _prune(root, cfg.train.keep_checkpoints)
    barrier()
    return root / tag


def consolidated_state_dict(engine, root: Path, tag: str, zero_stage: int) -> Optional[dict]:
    """Full fp32 weights on rank 0 (None elsewhere): from the module, or from ZeRO's fp32 partitions."""
    if zero_stage == 0 and not engine.bfloat16_enabled():
        return {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    if not dist.is_initialized() or dist.get_rank() == 0:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        # a dict of tensors (not lazy_mode); deepspeed is unannotated and its inferred return type is wider
        state = cast(dict[str, torch.Tensor], get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag))
        buffers = {k: v for k, v in engine.module.state_dict().items() if k not in state and v.numel() > 0}
        return {**buffers, **state}
    return None


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rank_state(folder: Path, rank: int) -> list[dict]:
    """Restore this rank's RNG (streams restart if the checkpoint had fewer ranks); return every saved
    rank's loss state, in rank order (the loss may reshard them)."""
    states = [torch.load(folder / _rank_file(r), weights_only=True)
              for r in range(len(list(folder.glob("rank*_state.pt"))))]
    if rank < len(states):
        rng = states[rank]["rng"]
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return [s["loss"] for s in states]


def _write_latest(root: Path, tag: str) -> None:
    tmp = root / (LATEST + ".tmp")
    tmp.write_text(tag + "\n")
    tmp.replace(root / LATEST)


def _prune(root: Path, keep: int) -> None:
    for old in checkpoints_of(root.parent)[:-keep]:
        shutil.rmtree(old)


def newest_checkpoint(root: Path, announce=print) -> Optional[Path]:
    """The newest checkpoint under `root` whose manifest verifies (damaged ones are named and passed over)."""
    return newest_verified(checkpoints_of(root.parent), announce)


def find_resume_tag(cfg: RunConfig, resume: Optional[str]) -> Optional[str]:
    """`latest` -> newest checkpoint that verifies, or None (fresh start); a path -> that checkpoint, verified."""
    if resume is None:
        return None
    root = checkpoint_root(cfg)

    def decide() -> Optional[str]:
        if resume == "latest":
            found = newest_checkpoint(root)
            return found.name if found else None
        path = Path(resume)
        if not path.is_dir() or path.parent.resolve() != root.resolve():
            raise UserError(f"--resume {resume}: not a checkpoint directory under {root}; use --resume latest "
                            f"or one of {sorted(p.name for p in root.glob('step_*'))[-3:]}")
        reason = verify(path)
        if reason:
            raise UserError(f"--resume {resume}: this checkpoint fails verification ({reason}); use --resume latest "
                            f"to take the newest one that verifies")
        return path.name

    return decide_on_rank0(decide)


def _repair_universal_load(engine, groups: list[dict]) -> None:
    """Undo two slips of DeepSpeed's ZeRO-3 universal loader (a no-op after ZeRO 1-2): it gives every param
    group the first one's settings (weight decay included), and one `step` tensor to every group, which the
    fused AdamW then advances once per group at each step (bias correction runs ahead). `groups`: the
    settings before the load; the learning rates are the restored schedule's."""
    for group, own, lr in zip(engine.optimizer.param_groups, groups, engine.lr_scheduler.get_last_lr()):
        group.update(own, lr=lr)
    for state in engine.optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def load_checkpoint(engine, cfg: RunConfig, tag: str, rank: int, plan: Plan) -> tuple[dict, list[dict]]:
    """-> (the run's client state, every saved rank's loss state); DeepSpeed's states come from where `plan`
    says (the checkpoint, or its universal conversion)."""
    root = checkpoint_root(cfg)
    groups = [{k: v for k, v in g.items() if k != "params"} for g in engine.optimizer.param_groups]
    load_path, client_state = engine.load_checkpoint(str(plan.load_dir), tag=plan.tag)
    if load_path is None:
        raise UserError(f"checkpoint {root / tag} could not be loaded; remove it or pass --resume with another one")
    if plan.universal:
        _repair_universal_load(engine, groups)
    return client_state, restore_rank_state(root / tag, rank)
