"""Global contrastive loss (SogCLR / FastCLIP): small batches estimate the whole dataset's denominators.

For anchor i with temperature τ_i, the batch estimates g_i = mean over its N−1 negatives j of
exp((z_ij − z_ii)/τ_i) (z = cosine similarity). Each anchor keeps a moving average
u_i ← (1−γ)·u_i + γ·g_i across epochs, and the objective τ_i·(log g_i + ρ) is followed with the
compositional gradient τ_i·∇g_i/u_i (and log u_i + ρ + τ_i·∂_τ g_i/u_i for τ_i), so the negatives
of a small batch are weighted by the dataset-wide 1/u_i instead of the batch's own normaliser.
Both directions (image anchors = rows, text anchors = columns) keep their own u. Everything
is in log space (log u, log-sum-exp over tiles), so small temperatures cannot overflow.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch
from pydantic import Field, model_validator

from pipeline.batch import Features, modalities_of
from pipeline.errors import UserError
from pipeline.losses.base import ContrastiveLoss
from pipeline.losses.comm import gather_with_grad, rank_and_world, sum_ranks
from pipeline.losses.config import LossSection
from pipeline.losses.sample_table import SampleTable
from pipeline.losses.tiles import AnchorLogSumExp, TileSpec, accumulator_dtype
from pipeline.registry import LOSSES


def moving_average(log_u: torch.Tensor, log_g: torch.Tensor, gamma: float) -> torch.Tensor:
    """log of (1−γ)·u + γ·g; an anchor never seen (log u NaN) starts at its batch estimate, as in FastCLIP."""
    mixed = torch.logaddexp(log_u + math.log1p(-gamma), log_g + math.log(gamma)) if gamma < 1 else log_g
    return torch.where(torch.isnan(log_u), log_g, mixed)


def gamma_at(step: int, gamma: float, schedule: str, decay_steps: int | None) -> float:
    """γ for this step: `constant`, or `cosine` from 1 down to `gamma` over `decay_steps`, then flat."""
    if schedule == "constant":
        return gamma
    if schedule != "cosine":
        raise ValueError(f"unknown gamma_schedule {schedule!r}; allowed: constant, cosine")
    if not decay_steps or decay_steps < 1:
        raise ValueError("gamma_schedule cosine needs gamma_decay_steps >= 1 (e.g. the run's total steps)")
    progress = min(max(step, 0) / decay_steps, 1.0)
    return gamma + (1 - gamma) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class GlobalClipOutput:
    loss: torch.Tensor  # value: the batch's own objective; gradient: the u-weighted estimator
    log_u_image: torch.Tensor  # [n] the image anchors' new log u, to commit after a finite step
    log_u_text: torch.Tensor


def global_clip_loss(a: torch.Tensor, b: torch.Tensor, image_scale: torch.Tensor, text_scale: torch.Tensor,
                     log_u_image: torch.Tensor, log_u_text: torch.Tensor, *, gamma: float, rho: float,
                     chunk_size: int | None = None, group=None, distributed: str = "auto") -> GlobalClipOutput:
    """½·mean over the global batch of τ_i·(log g_i + ρ) for image anchors (a→b) and text anchors (b→a).

    `image_scale` / `text_scale` are 1/τ: a scalar (the model's logit scale) or one per local
    row [n] (per-sample temperatures). `log_u_*` [n] are the anchors' stored log u (NaN: never
    seen). The new log u are returned, not stored, so a step whose loss is not finite can skip
    them. With `group`, each rank passes its rows; every rank gets the global loss and its share
    of the gradient; `distributed` as in clip_loss (gathered columns, or the ring).
    Features of any float dtype; statistics in fp32 (fp64 stays fp64).
    """
    n = a.shape[0]
    acc = accumulator_dtype(a)
    spec = TileSpec.resolve(a.device, chunk_size, "fp32", distributed, group)
    ring = spec.ring
    N = n * spec.world
    s_img = image_scale.to(acc).expand(n)
    s_txt = text_scale.to(acc).expand(n)
    if ring:
        columns, column_scales = b, s_txt
    else:
        columns = gather_with_grad(b, group)
        column_scales = gather_with_grad(s_txt, group) if text_scale.dim() else text_scale.to(acc).expand(N)
    row_lse, col_lse = AnchorLogSumExp.apply(a, columns, s_img, column_scales, spec)
    positives = (a.to(acc) * b.to(acc)).sum(-1)
    surrogate, value, new_u = [], [], []
    for lse, scale, log_u in ((row_lse, s_img, log_u_image), (col_lse, s_txt, log_u_text)):
        log_g = lse - scale * positives - math.log(N - 1)
        u = moving_average(log_u.to(acc), log_g.detach(), gamma)
        tau = 1 / scale
        surrogate.append(tau.detach() * torch.exp(log_g - u) + tau * (u + rho))
        value.append(tau * (log_g + rho))
        new_u.append(u)
    local = 0.5 * (surrogate[0] + surrogate[1]).sum()
    objective = sum_ranks(0.5 * (value[0] + value[1]).sum().detach(), group)
    loss = (local - local.detach() + objective) / N  # this rank's share of the gradient, the global value
    return GlobalClipOutput(loss, new_u[0], new_u[1])


class GlobalClipConfig(LossSection):
    kind: Literal["global_clip"] = "global_clip"
    gamma: float = Field(0.2, gt=0, le=1, description="moving-average rate of u (with cosine: its final value)")
    gamma_schedule: Literal["constant", "cosine"] = "constant"
    gamma_decay_steps: Optional[int] = Field(None, gt=0, description="steps of the cosine decay of gamma from 1")
    temperature: Literal["global", "individual"] = "global"
    temperature_lr: Optional[float] = Field(None, gt=0, description="the temperature's own learning rate "
                                            "(global: the logit scale's optimiser group; null = optim.lr)")
    rho: float = Field(8.0, description="FastCLIP's rho: larger keeps a learned temperature larger")
    tau_init: float = Field(0.07, gt=0)
    tau_min: float = Field(0.01, gt=0)
    tau_max: float = Field(1.0, gt=0)

    @model_validator(mode="after")
    def _consistent(self):
        if self.gamma_schedule == "cosine" and self.gamma_decay_steps is None:
            raise ValueError("gamma_schedule 'cosine' needs gamma_decay_steps (e.g. optim.total_steps)")
        if self.temperature == "individual" and self.temperature_lr is None:
            raise ValueError("temperature 'individual' needs temperature_lr (its SparseAdam learning rate)")
        return self


@LOSSES.register("global_clip", config=GlobalClipConfig)
class GlobalClip(ContrastiveLoss):
    """The `global_clip` loss over two modalities, with its state: u tables (and per-sample temperatures)
    indexed by global sample index, sharded over ranks (pipeline.losses.sample_table).

    The first modality (sorted) plays the image role, the second the text role. A step's u updates are kept by
    `step_end(True)` only (finite loss, optimiser stepped). `temperature: global` uses the model's
    `logit_scale` (learned by the engine; `temperature_lr` gives it its own group); `individual` keeps one τ
    per sample and anchor direction whose Parameter gets sparse gradients, stepped here by its own SparseAdam
    outside the engine (each rank holds a shard: nothing to all-reduce); the model's logit scale is then
    unused, and `exported_logit_scale()` is what an export carries. The state is saved per rank and restored
    into any number of ranks."""

    requires = frozenset({"sample_index"})
    cfg: GlobalClipConfig

    def __init__(self, cfg: GlobalClipConfig, group=None, seed: int = 0, num_samples: int | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        super().__init__(cfg, group, seed)
        if not num_samples:
            raise UserError("loss.kind 'global_clip' needs the dataset's sample count (sizes.json next to the shards)")
        table: dict[str, Any] = dict(dtype=dtype, device=device, group=group)
        self.log_u = SampleTable(num_samples, 2, float("nan"), **table)  # columns: image anchors, text anchors
        individual = cfg.temperature == "individual"
        self.tau = SampleTable(num_samples, 2, cfg.tau_init, trainable=True, **table) if individual else None
        self.tau_optimizer = None
        if self.tau is not None:  # GlobalClipConfig requires temperature_lr with per-sample temperatures
            assert isinstance(self.tau.values, torch.nn.Parameter) and cfg.temperature_lr is not None
            self.tau_optimizer = torch.optim.SparseAdam([self.tau.values], lr=cfg.temperature_lr)
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None

    def param_groups(self, model: torch.nn.Module) -> list[dict]:
        """With `temperature_lr`, the model's logit scale learns at that rate, without weight decay."""
        if self.cfg.temperature_lr is None:
            return []
        return [{"params": [model.get_parameter("logit_scale")], "weight_decay": 0.0, "lr": self.cfg.temperature_lr}]

    def forward(self, features: Features, step: int = 0, index: torch.Tensor | None = None) -> torch.Tensor:
        modalities = modalities_of(features)
        if len(modalities) != 2:
            raise UserError(f"loss.kind 'global_clip' takes two modalities, the model has {modalities}")
        if index is None or bool((index < 0).any()):
            raise UserError("loss.kind 'global_clip' needs every sample's global index: put sizes.json next to "
                            "the shards")
        image, text = (features[m] for m in modalities)
        return self.anchor_loss(image, text, features["logit_scale"], index.to(image.device), step)

    def anchor_loss(self, image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, indices: torch.Tensor,
                    step: int) -> torch.Tensor:
        """This rank's rows of the two modalities at their global `indices`; the new u wait in `pending`."""
        cfg = self.cfg
        log_u = self.log_u.lookup(indices).to(image.device)
        if self.tau is None:
            image_scale = text_scale = logit_scale
        else:
            tau = self.tau.lookup(indices).to(image.device)
            image_scale, text_scale = 1 / tau[:, 0], 1 / tau[:, 1]
        out = global_clip_loss(image, text, image_scale, text_scale, log_u[:, 0], log_u[:, 1],
                               gamma=gamma_at(step, cfg.gamma, cfg.gamma_schedule, cfg.gamma_decay_steps),
                               rho=cfg.rho, chunk_size=cfg.chunk_size, group=self.group, distributed=cfg.distributed)
        self.pending = (indices, torch.stack([out.log_u_image, out.log_u_text], 1))
        return out.loss

    def commit(self) -> None:
        """Keep the last step's u (and clamp the temperatures the optimiser just stepped)."""
        if self.pending is None:
            raise RuntimeError("commit() without a loss computed since the last commit")
        self.log_u.write(*self.pending)
        self.pending = None
        if self.tau is not None:
            with torch.no_grad():
                self.tau.values.clamp_(self.cfg.tau_min, self.cfg.tau_max)

    def step_end(self, finite: bool) -> None:
        if finite:
            if self.tau_optimizer is not None:
                self.tau_optimizer.step()
            self.commit()
        else:
            self.pending = None
        if self.tau_optimizer is not None:
            self.tau_optimizer.zero_grad(set_to_none=True)

    def extra_parameters(self) -> list[torch.nn.Parameter]:
        if self.tau is None:
            return []
        assert isinstance(self.tau.values, torch.nn.Parameter)  # the τ table is made trainable
        return [self.tau.values]

    def mean_temperature(self) -> float | None:
        """Mean τ over every sample seen so far (all ranks); None for a global temperature."""
        if self.tau is None:
            return None
        seen = ~torch.isnan(self.log_u.values).any(1)
        totals = torch.stack([self.tau.values.detach()[seen].sum(), seen.sum().to(self.tau.values.dtype) * 2])
        total, count = sum_ranks(totals, self.group).tolist()
        return total / count if count else None

    def exported_logit_scale(self) -> float | None:
        """With per-sample temperatures, log(1/mean τ) over the samples seen (global: the model's own)."""
        tau = self.mean_temperature()
        return None if tau is None else -math.log(tau)

    def state_dict(self, *args, **kwargs) -> dict:
        tables = {"log_u": self.log_u.state_dict(), **({"tau": self.tau.state_dict()} if self.tau is not None else {})}
        return {"gcl": tables, **({"tau_optimizer": self.tau_optimizer.state_dict()} if self.tau_optimizer else {})}

    def load_states(self, states: list[dict]) -> None:
        """Restore from every saved rank's `state_dict()` (any number of ranks; the SparseAdam moments are per
        shard, so they come back only on the same number of ranks)."""
        tables = [s["gcl"] for s in states]
        if (self.tau is not None) != all("tau" in t for t in tables):
            raise UserError("the saved global contrastive loss state and this run differ in `temperature` "
                            "(global vs individual): resume with the temperature it was trained with")
        self.log_u.load_state_dict([t["log_u"] for t in tables])
        if self.tau is not None:
            self.tau.load_state_dict([t["tau"] for t in tables])
        rank, world = rank_and_world(self.group)
        if self.tau_optimizer is not None and len(states) == world:
            self.tau_optimizer.load_state_dict(states[rank]["tau_optimizer"])
