"""DeepSpeed engine set-up in one place: the loop never knows which ZeRO stage it runs.

The optimizer (torch's fused AdamW, decoupled weight decay off for gains, biases, scales and
embeddings) and the warmup+cosine schedule are client objects handed to DeepSpeed, so
the same code runs on CPU (gloo) here and on GPUs (nccl) without DeepSpeed's compiled ops.
The fused kernel updates every tensor in one call on CPU and CUDA alike, where the default
per-tensor loop showed up as a large share of the step when profiling the demo model.
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from pipeline.config import RunConfig
from pipeline.errors import UserError
from pipeline.train.compile import compile_model

if TYPE_CHECKING:
    from pipeline.models.clip import MultiModalCLIP

NO_DECAY_KEYS = ("logit_scale", "logit_bias", "missing", "embedding", "cls_token", "class_embedding")


def param_groups(model: torch.nn.Module, weight_decay: float, loss_groups: Sequence[dict] = ()) -> list[dict]:
    """Decay / no-decay groups, then the groups the loss asks for (`ContrastiveLoss.param_groups`), whose
    parameters are left out of the first two."""
    claimed = {id(p) for group in loss_groups for p in group["params"]}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in claimed:
            (no_decay if p.ndim < 2 or any(k in name for k in NO_DECAY_KEYS) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0},
            *loss_groups]


def lr_lambda(step: int, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """Linear warmup, then cosine (or constant) decay to `min_ratio` of the peak at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def deepspeed_config(cfg: RunConfig, world_size: int, load_universal: bool = False) -> dict:
    """The DeepSpeed JSON this run implies; `deepspeed.config_override` is merged on top. `load_universal`:
    the checkpoint to resume is a universal one (converted to resume on another number of ranks)."""
    local_batch = cfg.data.batch_size // world_size
    ds = {
        "train_batch_size": local_batch * world_size,
        "train_micro_batch_size_per_gpu": local_batch,
        "gradient_accumulation_steps": 1,
        # GradCache backpropagates once per micro-chunk; step() is the single accumulation boundary.
        "managed_gradient_accumulation": False,
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage},
        "bf16": {"enabled": cfg.deepspeed.precision == "bf16"},
        "zero_allow_untested_optimizer": True,
        # With optimizer offload the client AdamW steps on the CPU copies; torch's fused CPU kernel is the
        # vectorised optimizer DeepSpeed otherwise insists on compiling (DeepSpeedCPUAdam) for.
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": load_universal},
    }
    if cfg.optim.grad_clip and cfg.deepspeed.zero_stage:  # ZeRO 0 clips in torch (clip_in_torch)
        ds["gradient_clipping"] = cfg.optim.grad_clip
    if cfg.deepspeed.config_override:
        path = Path(cfg.deepspeed.config_override)
        try:
            override = json.loads(path.read_text())
        except FileNotFoundError:
            raise UserError(f"deepspeed.config_override: {path} not found") from None
        except json.JSONDecodeError as exc:
            raise UserError(f"deepspeed.config_override: {path} is not valid JSON ({exc})") from None
        _merge(ds, override)
    return ds


def _merge(base: dict, extra: dict) -> None:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = v


def clip_in_torch(optimizer: torch.optim.Optimizer, max_norm: float) -> None:
    """Clip the global gradient norm right before each optimizer step, with torch's foreach kernels.

    Without ZeRO (fp32), DeepSpeed clips in a Python loop, one norm and one scaling per parameter. The hook runs
    inside DeepSpeed's step, after the gradients are averaged over ranks, so every rank clips the same norm,
    which DeepSpeed's clip would all-reduce once more. ZeRO 1-3 keep DeepSpeed's clip (the norm over partitions)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]

    def clip(*_) -> None:  # a step pre-hook that returns something would replace the step's arguments
        torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)

    optimizer.register_step_pre_hook(clip)


class Engine:
    """The one interface the loop uses: encode, backward, step (or skip), train/eval mode. DeepSpeed is behind
    it (`ds`, for checkpointing), so the loop never knows the ZeRO stage, the device or the precision."""

    def __init__(self, model: MultiModalCLIP, cfg: RunConfig, world_size: int, loss_groups: Sequence[dict] = (),
                 load_universal: bool = False):
        import deepspeed

        compile_model(model, cfg.train.compile)
        o = cfg.optim
        groups = param_groups(model, o.weight_decay, loss_groups)
        optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=o.betas,
                                      eps=o.eps, fused=True)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_lambda(s, o.warmup_steps, o.total_steps, o.schedule, o.min_lr_ratio))
        # deepspeed annotates lr_scheduler as the old torch _LRScheduler; any LRScheduler works
        self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler,  # pyright: ignore[reportArgumentType]
            config=deepspeed_config(cfg, world_size, load_universal))
        if cfg.deepspeed.zero_stage == 0 and o.grad_clip:
            clip_in_torch(optimizer, o.grad_clip)
        if world_size == 1 and cfg.deepspeed.zero_stage == 0:
            # One rank has nothing to average, but DeepSpeed would still flatten, "reduce" and copy back every
            # gradient at each step. (ZeRO stages >= 1 keep their reduction: it fills their partitions.)
            self.ds.enable_backward_allreduce = False
        self.dtype = torch.bfloat16 if cfg.deepspeed.precision == "bf16" else torch.float32

    @property
    def module(self) -> torch.nn.Module:
        module = self.ds.module
        assert isinstance(module, torch.nn.Module)  # nn.Module's __getattr__ is typed Tensor | Module
        return module

    @property
    def device(self) -> torch.device | None:
        """None with DeepSpeed's CPU accelerator when no local rank is set: tensors then stay where they are."""
        return self.ds.device

    def encode(self, inputs):
        return self.ds(inputs)

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss, scale_wrt_gas=False)  # GradCache calls it once per chunk; step() is the boundary

    def step(self) -> None:
        self.ds.step()

    def skip_step(self) -> None:
        """A step whose loss was not finite: no update, but the schedule stays aligned with the step counter."""
        self.scheduler.step()

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def train(self) -> None:
        self.ds.train()

    def eval(self) -> None:
        self.ds.eval()
