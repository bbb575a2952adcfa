"""Resuming on another number of ranks (a requeue with fewer nodes, a move to a bigger machine).

Every checkpoint records its layout in `layout.json`: ranks, ZeRO stage, precision, global batch,
data mode, and whether the epoch's seen samples are known by index. On as many ranks DeepSpeed
loads the checkpoint as it is. On another number, ZeRO 0 (fp32 only) keeps whole copies of the
weights and the optimizer in `mp_rank_00_model_states.pt`, which load as they are; ZeRO 1-3
partition them per rank, so rank 0 first converts the checkpoint with DeepSpeed's own tool
(`ds_to_universal`: per-parameter fp32 weights and Adam moments) and every rank loads the result
with `checkpoint.load_universal`. The loss state reshards itself (ContrastiveLoss.load_states) and
the data stream splits the epoch's unseen samples over the new ranks (pipeline.train.batches).
"""
from __future__ import annotations

import contextlib
import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

from pipeline.config import RunConfig
from pipeline.data.sources import Seen
from pipeline.errors import UserError

LAYOUT = "layout.json"
KEPT = {"zero_stage": "deepspeed.zero_stage", "precision": "deepspeed.precision", "batch_size": "data.batch_size",
        "resampled": "data.resampled"}  # what must match for a conversion (layout key -> config key)


def kept(cfg: RunConfig) -> dict:
    return {"zero_stage": cfg.deepspeed.zero_stage, "precision": cfg.deepspeed.precision,
            "batch_size": cfg.data.batch_size, "resampled": cfg.data.resampled}


def layout_of(cfg: RunConfig, world: int, run_state: dict) -> dict:
    return {"world_size": world, **kept(cfg),
            "seen_known": cfg.data.resampled or run_state["data"].get("seen") is not None}


def write_layout(folder: Path, cfg: RunConfig, world: int, run_state: dict) -> None:
    (folder / LAYOUT).write_text(json.dumps(layout_of(cfg, world, run_state), indent=1) + "\n")


@dataclass
class Plan:
    """How to load a checkpoint on `world` ranks: from `load_dir/tag`, through DeepSpeed's universal loader or not."""

    saved: int
    world: int
    load_dir: Path
    tag: str
    universal: bool = False

    @property
    def changed(self) -> bool:
        return self.saved != self.world

    def done(self) -> None:
        """Drop the converted copy once every rank has loaded it (called on rank 0 after a barrier)."""
        if self.universal:
            shutil.rmtree(self.load_dir, ignore_errors=True)


def plan_resume(cfg: RunConfig, folder: Path, world: int) -> Plan:
    """Check that the checkpoint in `folder` can continue on `world` ranks and convert it if it must be (rank 0)."""
    layout = read_layout(folder)
    saved = layout["world_size"] if layout else len(list(folder.glob("rank*_state.pt")))
    if saved == world:
        return Plan(world, world, folder.parent, folder.name)
    if layout is None:
        raise UserError(f"{folder} was written on {saved} ranks before checkpoints recorded their layout "
                        f"({LAYOUT}); resume it on {saved} ranks")
    current = kept(cfg)
    for key, name in KEPT.items():
        if layout[key] != current[key]:
            raise UserError(f"{folder} was written on {saved} ranks with {name}={layout[key]}; to resume it on "
                            f"{world} ranks keep that value (--set {name}={layout[key]})")
    if not layout["seen_known"]:
        raise UserError(f"{folder}: the samples this epoch already gave have no index (a shard without a count in "
                        f"sizes.json), so they cannot be split over {world} ranks; resume on {saved} ranks")
    if cfg.deepspeed.zero_stage == 0:  # whole weights and optimizer state in mp_rank_00: nothing to convert
        return Plan(saved, world, folder.parent, folder.name)
    out = Path(cfg.output_dir) / "universal" / folder.name
    shutil.rmtree(out.parent, ignore_errors=True)  # a conversion cut short
    to_universal(folder, out, saved)
    return Plan(saved, world, out.parent, out.name, universal=True)


def read_layout(folder: Path) -> Optional[dict]:
    """The checkpoint's layout; None for one written before layouts were recorded."""
    path = folder / LAYOUT
    return json.loads(path.read_text()) if path.is_file() else None


def to_universal(folder: Path, out: Path, saved: int) -> None:
    from deepspeed.checkpoint.ds_to_universal import main

    args = SimpleNamespace(input_folder=str(folder), output_folder=str(out), num_extract_workers=1,
                           num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            main(args)
    except Exception as exc:
        raise UserError(f"{folder}: DeepSpeed's universal-checkpoint conversion failed ({type(exc).__name__}: "
                        f"{exc}); resume it on {saved} ranks") from None


def describe(plan: Plan, step: int, cfg: RunConfig, data: dict) -> str:
    """The one line a resume on another number of ranks prints: what changed and what was kept."""
    stage = cfg.deepspeed.zero_stage
    states = (f"ZeRO-{stage} weights and optimizer converted through DeepSpeed's universal checkpoint" if plan.universal
              else "weights and optimizer loaded as saved (ZeRO 0 keeps whole copies)")
    b = cfg.data.batch_size
    micro = cfg.train.micro_batch or b // plan.world
    batch = f"global batch {b} kept ({b // plan.saved} -> {b // plan.world} per rank, GradCache chunk {micro})"
    if cfg.data.resampled:
        stream = f"resampled data reseeded from (seed {cfg.train.seed}, step {step}) on {plan.world} ranks"
    else:
        stream = (f"epoch {data['epoch']} continues without its {len(Seen(data['seen']))} samples already seen, "
                  f"split over {plan.world} ranks")
    return f"resumed step {step} from {plan.saved} ranks on {plan.world} ranks: {states}; {batch}; {stream}"
