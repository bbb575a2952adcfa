"""The training loop and the run state it carries from checkpoint to checkpoint.

    while step < total: batch -> train_step -> maybe_log -> maybe_eval -> maybe_checkpoint

`Trainer.state_dict()` is everything a resumed run needs besides the engine's own state (weights,
optimizer, schedule): step, samples seen, skip counts, bad steps and the data stream's position.
"""
from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from pipeline.batch import Batch
from pipeline.config import RunConfig
from pipeline.errors import UserError
from pipeline.train.batches import BatchStream
from pipeline.train.checkpoint import save_checkpoint
from pipeline.train.gradcache import grad_cache_step
from pipeline.train.metrics import RunLog, plot_loss
from pipeline.train.phases import PhaseTimes
from pipeline.train.ranks import any_rank, sum_over_ranks
from pipeline.train.signals import Interrupted, StopSignals, exit_code


def to_device(batch: Batch, device: torch.device | None, dtype: torch.dtype) -> Batch:
    """Move tensors; float inputs take the engine's dtype (bf16), token ids and masks stay as they are."""
    def move(v: Any) -> Any:
        if torch.is_tensor(v):
            v = v.to(device, non_blocking=True)
            return v.to(dtype) if v.is_floating_point() else v
        if isinstance(v, dict):
            return {k: move(x) for k, x in v.items()}
        return v
    return move(batch)


def model_inputs(batch: Batch, modalities: list[str]) -> Batch:
    """What the model reads, with only the masks of modalities some sample lacks: the model then takes the
    "missing" embedding path only where it changes something (and gives that parameter a gradient only then)."""
    keep = set(modalities) | {f"{m}_neg" for m in modalities}
    inputs: Batch = {}
    for k, v in batch.items():
        if k in keep:
            inputs[k] = v
    masks = {m: mask for m, mask in batch.get("mask", {}).items() if not bool(mask.all())}
    if masks:
        inputs["mask"] = masks
    return inputs


class Trainer:
    def __init__(self, cfg: RunConfig, engine, loss_module, make_loader, rank: int, world: int, log: RunLog):
        self.cfg, self.engine, self.loss_module = cfg, engine, loss_module
        self.rank, self.world, self.log = rank, world, log
        self.make_loader = make_loader
        self.modalities = cfg.modalities
        self.step, self.samples, self.bad_steps, self.skipped = 0, 0, 0, Counter()
        self.position: dict = {}
        self.saved_step = None  # the step of the newest checkpoint (None: none yet in this run)
        self.last_loss = float("nan")
        self.signals = StopSignals()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"step": self.step, "bad_steps": self.bad_steps, "samples": self.samples,
                "skipped": dict(self.skipped), "data": self.batches.state()}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.bad_steps, self.samples = state["step"], state["bad_steps"], state["samples"]
        self.skipped, self.position = Counter(state["skipped"]), state["data"]
        self.saved_step = self.step

    # ------------------------------------------------------------------- loop
    def fit(self) -> int:
        """Train to optim.total_steps; returns the exit code (0, or the signal's code after a stop)."""
        cfg = self.cfg
        self.batches = BatchStream(cfg.data, self.make_loader, self.world, self.step, self.position)
        self.progress = _progress(self.rank, self.step, cfg.optim.total_steps)
        self.engine.train()
        self.window = (time.time(), 0)
        self.phases = PhaseTimes(cfg.train.phase_times, self.engine.device)
        evaluated = False
        try:
            while self.step < cfg.optim.total_steps:
                with self.phases("step"):
                    try:
                        with self.signals.interruptible(), self.phases("data"):  # no wait outlasts a stop signal
                            batch = next(self.batches)
                    except Interrupted as exc:
                        return self.stopped(exc.signum)
                    self.train_step(batch)
                self.maybe_log()
                evaluated = self.maybe_eval()
                stop = self.maybe_checkpoint()
                if stop:
                    return self.stopped(stop)
        finally:
            self.batches.close()
            self.progress.close()
        self.finish(evaluated)
        return 0

    def train_step(self, batch: Batch) -> None:
        cfg, engine = self.cfg, self.engine
        self.skipped.update(batch.get("skipped", {}))
        if cfg.train.log_keys:
            self.log_keys(batch.get("key", []))
        inputs = to_device(model_inputs(batch, self.modalities), engine.device, engine.dtype)
        micro = cfg.train.micro_batch or cfg.data.batch_size // self.world
        index = batch.get("index")
        loss = grad_cache_step(engine.encode, lambda features: self.loss_module(features, self.step, index),
                               engine.backward, inputs, micro, grad_scale=float(self.world),
                               check_loss=lambda x: not any_rank(not torch.isfinite(x)),
                               extra_params=self.loss_module.extra_parameters(), timed=self.phases)
        finite = math.isfinite(loss.item())
        self.loss_module.step_end(finite)
        if finite:
            with self.phases("optimizer"):
                engine.step()
            self.last_loss = loss.item()
        else:
            self.bad_steps += 1
            engine.skip_step()
            if self.bad_steps >= cfg.train.max_bad_steps:
                raise UserError(f"loss was NaN/inf in {self.bad_steps} steps (train.max_bad_steps="
                                f"{cfg.train.max_bad_steps}); lower optim.lr or check the data")
        self.step += 1
        self.samples += cfg.data.batch_size
        self.window = (self.window[0], self.window[1] + cfg.data.batch_size)
        self.progress.update(1)

    def log_keys(self, keys: list[str]) -> None:
        folder = Path(self.cfg.output_dir) / "keys"
        folder.mkdir(exist_ok=True)
        with open(folder / f"rank{self.rank}.jsonl", "a") as f:
            f.write(json.dumps({"step": self.step + 1, "keys": keys}) + "\n")

    def maybe_log(self) -> None:
        if self.step % self.cfg.train.log_every and self.step != self.cfg.optim.total_steps:
            return
        start, seen = self.window
        module = self.engine.module
        totals = sum_over_ranks(self.skipped)
        record = {"loss": self.last_loss, "lr": self.engine.lr,
                  "logit_scale": float(module.logit_scale.detach().float().exp()) if module.logit_scale.numel() else None,
                  "samples_per_s": seen / max(time.time() - start, 1e-9), "samples": self.samples,
                  "bad_steps": self.bad_steps, **{f"skipped/{k}": v for k, v in totals.items()},
                  **self.phases.window(seen // self.cfg.data.batch_size)}
        self.log.metrics(self.step, record)
        self.progress.set_postfix(loss=f"{self.last_loss:.4f}", sps=f"{record['samples_per_s']:.0f}")
        self.window = (time.time(), 0)

    def maybe_eval(self) -> bool:
        every = self.cfg.eval.every_steps
        if not (every and self.cfg.eval.tasks and self.step % every == 0):
            return False
        self.log.metrics(self.step, self.evaluate())
        self.engine.train()
        return True

    def maybe_checkpoint(self) -> int:
        """Checkpoint when due or when any rank got a stop signal; returns that signal (0: keep going)."""
        stop = int(any_rank(self.signals.received))
        due = self.step % self.cfg.train.checkpoint_every == 0 or self.step == self.cfg.optim.total_steps
        if stop or due:
            self.checkpoint()
            if not stop and self.step < self.cfg.optim.total_steps:
                self.batches.restart(self.step)
        return stop

    def checkpoint(self) -> None:
        path = save_checkpoint(self.engine.ds, self.cfg, self.step, self.state_dict(), self.rank,
                               self.loss_module.state_dict(), self.loss_module.exported_logit_scale())
        self.saved_step = self.step
        self.log.event("checkpoint", self.step, path=str(path))

    # ------------------------------------------------------------------- ends
    def stopped(self, signum: int) -> int:
        """After a stop signal: checkpoint if a step finished since the last one, say how to resume, exit code.

        A signal that ended a wait for data reaches this without the ranks agreeing first: Slurm and torchrun
        signal every rank, so all of them are waiting at the same step (else the collective timeout ends it)."""
        if self.step and self.saved_step != self.step:
            self.checkpoint()
        name = signal.Signals(signum).name
        self.log.event("preempted" if signum != signal.SIGINT else "interrupted", self.step, signal=name)
        if self.rank == 0:
            where = (f"last checkpoint {Path(self.cfg.output_dir) / 'checkpoints' / f'step_{self.saved_step:08d}'}; "
                     f"continue with the same command plus --resume latest") if self.saved_step else \
                "no step had finished, so there is no checkpoint; run the same command again"
            print(f"mmclip: stopped by {name} at step {self.step}; {where}", file=sys.stderr, flush=True)
        return exit_code(signum)

    def finish(self, evaluated: bool) -> None:
        totals = sum_over_ranks(self.skipped)
        if self.cfg.eval.tasks and not evaluated:  # the last step's periodic eval already is the final one
            self.log.metrics(self.step, self.evaluate())
        if self.rank == 0:
            plot_loss(self.cfg.output_dir)
            line = ", ".join(f"{k}={v}" for k, v in sorted(totals.items())) or "none"
            print(f"finished {self.step} steps; final loss {self.last_loss:.4f}; skipped samples: {line}; "
                  f"run directory {self.cfg.output_dir}")
        self.log.event("finished", self.step, skipped=dict(totals))

    def evaluate(self) -> dict:
        from pipeline.eval import evaluate_tasks

        self.engine.eval()
        with torch.no_grad():
            return evaluate_tasks(self.engine.module, self.cfg.eval.tasks, self.cfg.eval.batch_size, self.engine.device)


def _progress(rank: int, start: int, total: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=start, disable=rank != 0 or os.environ.get("MMCLIP_NO_PROGRESS") == "1",
                desc="train", unit="step", dynamic_ncols=True)
