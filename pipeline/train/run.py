"""`mmclip train`: the training loop, top to bottom.

set up ranks -> build model, loss, engine -> resume -> for each step: batch, GradCache
forward/backward, step, log, eval, checkpoint -> final checkpoint, plot.
The loop does not know the ZeRO stage, the device or how many ranks there are.
"""
from __future__ import annotations

import math
import os
import time
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline.config import RunConfig, load_config, save_config
from pipeline.errors import UserError
from pipeline.launch.env import REQUEUE_EXIT_CODE, discover_env, export_torch_env
from pipeline.train.batches import BatchStream
from pipeline.train.checkpoint import find_resume_tag, load_checkpoint, save_checkpoint
from pipeline.train.gradcache import grad_cache_step
from pipeline.train.metrics import RunLog, plot_loss
from pipeline.train.preemption import PreemptionFlag


def add_train_args(p) -> None:
    p.add_argument("config", help="YAML run config, e.g. configs/demo.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set optim.lr=1e-4 (repeatable)")
    p.add_argument("--resume", metavar="latest|PATH", default=None,
                   help="continue from the latest checkpoint in output_dir (fresh start if none) or from PATH")


def run_train(args) -> int:
    cfg = load_config(args.config, args.overrides)
    try:
        return train(cfg, resume=args.resume)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def init_distributed():
    """Rank from the environment (torchrun, deepspeed launcher, srun, or none); gloo on CPU, nccl on GPU."""
    import deepspeed

    env = discover_env()
    export_torch_env(env)
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank)
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                               auto_mpi_discovery=False, verbose=False)
    return env


def to_device(batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """Move tensors; float inputs take the engine's dtype (bf16), token ids and masks stay as they are."""
    def move(v):
        if torch.is_tensor(v):
            v = v.to(device, non_blocking=True)
            return v.to(dtype) if v.is_floating_point() else v
        if isinstance(v, dict):
            return {k: move(x) for k, x in v.items()}
        return v
    return move(batch)


def model_inputs(batch: dict, modalities: list[str]) -> dict:
    keep = set(modalities) | {f"{m}_neg" for m in modalities} | {"mask"}
    return {k: v for k, v in batch.items() if k in keep}


def all_ranks_finite(loss: torch.Tensor) -> bool:
    bad = torch.tensor([0.0 if torch.isfinite(loss).item() else 1.0])
    if dist.is_initialized():
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return bad.item() == 0.0


def sum_over_ranks(counter: Counter) -> Counter:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return counter
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, dict(counter))
    return sum((Counter(c) for c in gathered), Counter())


def train(cfg: RunConfig, resume: str | None = None) -> int:
    from accelerate.utils import set_seed

    from pipeline.data.loader import build_loader
    from pipeline.losses import ContrastiveLoss
    from pipeline.models import build_model
    from pipeline.models.preprocess import tower_preprocessors
    from pipeline.train.engine import build_engine

    env = init_distributed()
    rank, world = env.rank, env.world_size
    if cfg.data.batch_size % world:
        raise UserError(f"data.batch_size={cfg.data.batch_size} is not divisible by the {world} ranks")
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        save_config(cfg, out / "config.yaml")
    log = RunLog(cfg.output_dir, rank, world)
    set_seed(cfg.train.seed)  # accelerate's utility: python, numpy and torch (all devices) at once

    model = build_model(cfg.model)
    group = dist.group.WORLD if world > 1 else None
    loss_module = ContrastiveLoss(kind=cfg.loss.kind, chunk_size=cfg.loss.chunk_size,
                                  hard_negative_alpha=cfg.loss.hard_negative_alpha,
                                  hard_negative_beta=cfg.loss.hard_negative_beta,
                                  symile_negatives=cfg.loss.symile_negatives,
                                  compute_dtype=cfg.loss.compute_dtype, distributed=cfg.loss.distributed,
                                  group=group, seed=cfg.train.seed)
    engine, _, scheduler = build_engine(model, cfg, world)
    dtype = torch.bfloat16 if cfg.deepspeed.precision == "bf16" else torch.float32
    modalities = cfg.modalities
    preprocess = tower_preprocessors(model, cfg.data.audio, train=True)

    step, skipped, bad_steps, samples, position = 0, Counter(), 0, 0, {}
    tag = find_resume_tag(cfg, resume)
    if tag is not None:
        state = load_checkpoint(engine, cfg, tag, rank)
        step, bad_steps, samples = state["step"], state["bad_steps"], state["samples"]
        skipped, position = Counter(state["skipped"]), state["data"]
        log.event("resume", step, checkpoint=tag)
    log.event("start", step)

    def make_loader(at_step: int, epoch: int):
        return build_loader(cfg.data, split="train", modalities=modalities, preprocess=preprocess, rank=rank,
                            world_size=world, seed=cfg.train.seed, start_step=at_step, epoch=epoch)

    def loss_fn(features: dict) -> torch.Tensor:
        negs = {m: features[f"{m}_neg"] for m in modalities if f"{m}_neg" in features}
        feats = {m: features[m] for m in modalities}
        return loss_module(feats, features["logit_scale"], features.get("logit_bias"), hard_negatives=negs or None)

    local_batch = cfg.data.batch_size // world
    micro = cfg.train.micro_batch or local_batch
    preempt = PreemptionFlag()
    batches = BatchStream(cfg.data, make_loader, step, position.get("epoch", 0), position.get("batches_in_epoch", 0))
    progress = _progress(rank, step, cfg.optim.total_steps)
    engine.train()
    t0, window_samples, last_loss, evaluated = time.time(), 0, float("nan"), False
    while step < cfg.optim.total_steps:
        batch = next(batches)
        skipped.update(batch.get("skipped", {}))
        loss_module.reseed(step)  # Symile's negatives depend on the step only: same on every rank and after resume
        inputs = to_device(model_inputs(batch, modalities), engine.device, dtype)
        loss = grad_cache_step(engine, loss_fn, lambda s: engine.backward(s, scale_wrt_gas=False), inputs,
                               micro, grad_scale=float(world), check_loss=all_ranks_finite)
        if math.isfinite(loss.item()):
            engine.step()
            last_loss = loss.item()
        else:
            bad_steps += 1
            scheduler.step()  # keep the schedule aligned with the step counter
            if bad_steps >= cfg.train.max_bad_steps:
                raise UserError(f"loss was NaN/inf in {bad_steps} steps (train.max_bad_steps="
                                f"{cfg.train.max_bad_steps}); lower optim.lr or check the data")
        step += 1
        samples += cfg.data.batch_size
        window_samples += cfg.data.batch_size
        progress.update(1)

        if step % cfg.train.log_every == 0 or step == cfg.optim.total_steps:
            elapsed = time.time() - t0
            totals = sum_over_ranks(skipped)
            record = {"loss": last_loss, "lr": scheduler.get_last_lr()[0],
                      "logit_scale": float(engine.module.logit_scale.detach().float().exp())
                      if engine.module.logit_scale.numel() else None,
                      "samples_per_s": window_samples / max(elapsed, 1e-9), "samples": samples,
                      "bad_steps": bad_steps, **{f"skipped/{k}": v for k, v in totals.items()}}
            log.metrics(step, record)
            progress.set_postfix(loss=f"{last_loss:.4f}", sps=f"{record['samples_per_s']:.0f}")
            t0, window_samples = time.time(), 0

        evaluated = bool(cfg.eval.every_steps and cfg.eval.tasks and step % cfg.eval.every_steps == 0)
        if evaluated:
            log.metrics(step, _evaluate(engine, cfg))
            engine.train()

        stopping = preempt.any_rank()
        if stopping or step % cfg.train.checkpoint_every == 0 or step == cfg.optim.total_steps:
            state = {"step": step, "bad_steps": bad_steps, "samples": samples, "skipped": dict(skipped),
                     "data": batches.state()}
            path = save_checkpoint(engine, cfg, step, state, rank)
            log.event("checkpoint", step, path=str(path))
            if stopping:
                log.event("preempted", step)
                progress.close()
                return REQUEUE_EXIT_CODE
            if step < cfg.optim.total_steps:
                batches.restart(step)

    progress.close()
    totals = sum_over_ranks(skipped)
    if cfg.eval.tasks and not evaluated:  # the last step's periodic eval already is the final one
        log.metrics(step, _evaluate(engine, cfg))
    if rank == 0:
        plot_loss(cfg.output_dir)
        skipped_line = ", ".join(f"{k}={v}" for k, v in sorted(totals.items())) or "none"
        print(f"finished {step} steps; final loss {last_loss:.4f}; skipped samples: {skipped_line}; "
              f"run directory {out}")
    log.event("finished", step, skipped=dict(totals))
    log.close()
    return 0


def _evaluate(engine, cfg: RunConfig) -> dict:
    from pipeline.eval import evaluate_tasks

    engine.eval()
    with torch.no_grad():
        return evaluate_tasks(engine.module, cfg.eval.tasks, cfg.eval.batch_size, engine.device)


def _progress(rank: int, start: int, total: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=start, disable=rank != 0 or os.environ.get("MMCLIP_NO_PROGRESS") == "1",
                desc="train", unit="step", dynamic_ncols=True)
