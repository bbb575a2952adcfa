"""The `optim:`, `train:` and `deepspeed:` sections: the optimizer and schedule, the loop, the engine."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from pipeline.section import Section


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
        default=None, gt=0, description="GradCache chunk per rank; null encodes the local batch at once"
    )
    compile: Literal["none", "model", "step"] = Field(
        default="none", description="torch.compile each tower's forward (model) or the whole model forward that "
        "GradCache's encode and re-encode call (step); once per shape, eager where inductor cannot build "
        "(pipeline.train.compile)")
    log_every: int = Field(default=10, gt=0)
    phase_times: bool = Field(default=False, description="log each step's time split (data, forward, loss, backward, "
                              "optimizer, other) as time/<phase>_ms; on CUDA this synchronises at every phase "
                              "boundary (pipeline.train.phases)")
    log_keys: bool = Field(default=False, description="each rank appends the keys of every batch it trains on to "
                           "keys/rank{R}.jsonl: an audit of what a run saw, e.g. across a resume on other ranks")
    checkpoint_every: int = Field(default=100, gt=0)
    keep_checkpoints: int = Field(default=2, ge=1)
    max_bad_steps: int = Field(default=10, ge=1, description="abort after this many NaN/inf losses")
    collective_timeout_s: int = Field(default=600, gt=0, description="a rank waiting this long in a collective (a dead "
                                      "or stuck peer) fails the run; torch's default is 30 min")
    keep_freed_memory: bool = Field(default=True, description="glibc malloc keeps freed memory for the next step instead "
                                    "of returning it to the kernel (pipeline.train.allocator)")


class DeepSpeedConfig(Section):
    zero_stage: Literal[0, 1, 2, 3] = 0
    precision: Literal["fp32", "bf16"] = "fp32"
    config_override: Optional[str] = Field(default=None, description="DeepSpeed JSON merged over the generated one")

    @model_validator(mode="after")
    def _bf16_needs_zero(self):
        # Without ZeRO, DeepSpeed's bf16 path accumulates gradients in bf16 and keeps fp32 master
        # weights that its checkpoint tools cannot consolidate; ZeRO >= 1 keeps both in fp32.
        if self.precision == "bf16" and self.zero_stage == 0:
            raise ValueError("precision 'bf16' needs zero_stage >= 1 (1 costs nothing on one rank)")
        return self
