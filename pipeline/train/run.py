"""`mmclip train`: set up the ranks, the run directory, the model, loss and engine, then hand over to the Trainer.

set up ranks -> lock output_dir -> plan the resume (convert the checkpoint if the number of ranks changed)
-> build model, loss, engine -> resume -> Trainer.fit() -> exit code.
"""
from __future__ import annotations

import gc
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline.config import RunConfig, load_config, save_config
from pipeline.errors import UserError
from pipeline.launch.env import discover_env, exit_now, export_torch_env


def add_train_args(p) -> None:
    p.add_argument("config", help="YAML run config, e.g. configs/demo.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set optim.lr=1e-4 (repeatable)")
    resume = p.add_mutually_exclusive_group()
    resume.add_argument("--resume", metavar="latest|PATH", default=None,
                        help="continue from the newest checkpoint in output_dir that verifies (fresh start if none) "
                             "or from PATH")
    resume.add_argument("--restart", action="store_true",
                        help="start over in an output_dir that holds an earlier run, deleting its checkpoints and logs")


def run_train(args) -> int:
    cfg = load_config(args.config, args.overrides)
    env = init_distributed(cfg.train.collective_timeout_s)
    from pipeline.train.ranks import PeerWatch, barrier

    watch = PeerWatch(env.rank)
    try:
        code = train(cfg, env, resume=args.resume, restart=args.restart)
        watch.stop()  # from here on, peers leaving is the normal end
        barrier()
        if code:  # stopped by a signal, checkpoint written: leave now, not after waiting on data readers
            exit_now(code)  # (closing a `pipe:` shard waits for its command, e.g. a stalled download)
        return code
    except BaseException as exc:
        watch.post(str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}")
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def init_distributed(timeout_s: int):
    """Rank from the environment (torchrun, deepspeed launcher, srun, or none); gloo on CPU, nccl on GPU."""
    import deepspeed

    env = discover_env()
    export_torch_env(env)
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank)
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                               auto_mpi_discovery=False, verbose=False, timeout=timedelta(seconds=timeout_s))
    return env


def claim_output_dir(cfg: RunConfig, resume: str | None, restart: bool):
    """Rank 0 locks output_dir and checks it may start here; every rank learns the outcome (one line if not)."""
    from pipeline.train.ranks import decide_on_rank0
    from pipeline.train.rundir import RunLock, prepare_output_dir

    out = Path(cfg.output_dir)
    lock = RunLock(out)

    def claim() -> None:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"output_dir {out}: cannot create it ({exc.strerror})") from None
        lock.acquire()
        prepare_output_dir(out, resume, restart)
        save_config(cfg, out / "config.yaml")

    decide_on_rank0(claim)
    return lock


def require_sample_counts(cfg: RunConfig) -> int | None:
    """A loss that keeps per-sample state needs global sample indices, hence every shard's sample count:
    -> the dataset's sample count (None when the loss does not index samples)."""
    from pipeline.data.sources import expand_spec, shard_sizes
    from pipeline.registry import LOSSES

    if "sample_index" not in LOSSES.get(cfg.loss.kind, "loss.kind").obj.requires:
        return None
    urls = [u for s in expand_spec(cfg.data.train, cfg.data.train_weights) for u in s.urls]
    sizes = shard_sizes(urls)
    missing = [u for u in urls if u not in sizes]
    if missing:
        raise UserError(f"loss.kind {cfg.loss.kind!r} indexes samples by shard order and per-shard counts, but "
                        f"{len(missing)} shard(s) have none, e.g. {missing[0]}; put sizes.json (mmclip shards writes "
                        f"it) or img2dataset's _stats.json next to them")
    return sum(sizes[u] for u in urls)


def train(cfg: RunConfig, env, resume: str | None = None, restart: bool = False) -> int:
    from accelerate.utils import set_seed

    from pipeline.data.loader import build_loader
    from pipeline.losses import build_loss
    from pipeline.modalities.preprocess import preprocessors
    from pipeline.models import build_model
    from pipeline.train.allocator import keep_freed_memory
    from pipeline.train.checkpoint import checkpoint_root, find_resume_tag, load_checkpoint
    from pipeline.train.elastic import describe, plan_resume
    from pipeline.train.engine import Engine
    from pipeline.train.metrics import RunLog
    from pipeline.train.ranks import barrier, decide_on_rank0
    from pipeline.train.trainer import Trainer

    rank, world = env.rank, env.world_size
    if cfg.train.keep_freed_memory:
        keep_freed_memory()
    if cfg.data.batch_size % world:
        raise UserError(f"data.batch_size={cfg.data.batch_size} is not divisible by the {world} ranks")
    num_samples = require_sample_counts(cfg)
    lock = claim_output_dir(cfg, resume, restart)
    try:
        log = RunLog(cfg.output_dir, rank, world)
        set_seed(cfg.train.seed)  # accelerate's utility: python, numpy and torch (all devices) at once
        model = build_model(cfg.model)
        group = dist.group.WORLD if world > 1 else None
        loss_module = build_loss(cfg.loss, group=group, seed=cfg.train.seed, num_samples=num_samples)
        tag = find_resume_tag(cfg, resume)
        plan = decide_on_rank0(lambda: plan_resume(cfg, checkpoint_root(cfg) / tag, world)) if tag else None
        engine = Engine(model, cfg, world, loss_module.param_groups(model), load_universal=bool(plan and plan.universal))
        preprocess = preprocessors(model.inputs(), cfg.data, train=True)

        def make_loader(at_step: int, epoch: int, seen):
            return build_loader(cfg.data, split="train", modalities=cfg.modalities, preprocess=preprocess, rank=rank,
                                world_size=world, seed=cfg.train.seed, start_step=at_step, epoch=epoch, seen=seen)

        trainer = Trainer(cfg, engine, loss_module, make_loader, rank, world, log)
        if tag is not None:
            assert plan is not None  # planned above whenever there is a checkpoint to resume
            run_state, loss_states = load_checkpoint(engine.ds, cfg, tag, rank, plan)
            trainer.load_state_dict(run_state)
            loss_module.load_states(loss_states)
            barrier()
            if rank == 0:
                plan.done()
            log.event("resume", trainer.step, checkpoint=tag, from_world_size=plan.saved)
            if plan.changed and rank == 0:
                print(describe(plan, trainer.step, cfg, run_state["data"]), flush=True)
        log.event("start", trainer.step, node=env.node, master=f"{env.master_addr}:{env.master_port}")
        # The millions of objects the imports made (torch, inductor, transformers) live for the whole run: out of
        # the collector's reach, a full collection during training does not walk them (the benches ran so).
        gc.freeze()
        code = trainer.fit()
        log.close()
        return code
    finally:
        lock.release()
