"""Where this process sits in the job: rank and world size from torchrun, the DeepSpeed launcher or Slurm.

The trainer calls `discover_env()` once and `export_torch_env()` so torch.distributed's env://
initialisation works the same under every launcher, and as a single process with no launcher.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, NoReturn

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: "checkpointed after a signal, run me again"; the sbatch template requeues


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    launcher: str = "none"
    node: str = field(default_factory=socket.gethostname)  # Slurm's node name, which may not be the hostname


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_slurm_host(nodelist: str) -> str:
    """First host of a Slurm node list ('node[01-04]' -> 'node01'), via scontrol when available."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
        return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        head = nodelist.split(",")[0]
        if "[" in head:
            prefix, rest = head.split("[", 1)
            return prefix + rest.rstrip("]").split(",")[0].split("-")[0]
        return head


def discover_env(environ: Mapping[str, str] = os.environ) -> DistEnv:
    if "RANK" in environ and "WORLD_SIZE" in environ:  # torchrun, deepspeed launcher, accelerate, or srun + exports
        return DistEnv(int(environ["RANK"]), int(environ["WORLD_SIZE"]), int(environ.get("LOCAL_RANK", 0)),
                       environ.get("MASTER_ADDR", "127.0.0.1"), int(environ.get("MASTER_PORT", 29500)), "torchrun")
    if "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ and "SLURM_STEP_ID" in environ:  # under srun
        job = int(environ.get("SLURM_JOB_ID", "0"))
        return DistEnv(int(environ["SLURM_PROCID"]), int(environ["SLURM_NTASKS"]), int(environ.get("SLURM_LOCALID", 0)),
                       environ.get("MASTER_ADDR") or first_slurm_host(environ.get("SLURM_JOB_NODELIST", "127.0.0.1")),
                       int(environ.get("MASTER_PORT", 20000 + job % 20000)), "slurm",
                       environ.get("SLURMD_NODENAME") or socket.gethostname())
    return DistEnv(master_port=_free_port())


def export_torch_env(env: DistEnv) -> None:
    os.environ.update(RANK=str(env.rank), WORLD_SIZE=str(env.world_size), LOCAL_RANK=str(env.local_rank),
                      MASTER_ADDR=env.master_addr, MASTER_PORT=str(env.master_port))


def _descendants(pid: int) -> list[int]:
    """This process's children, grandchildren, ... from /proc (Linux; elsewhere none are listed)."""
    found = []
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        for child in map(int, children.read_text().split()):
            found += [child, *_descendants(child)]
    return found


def exit_now(code: int) -> NoReturn:
    """Exit at once: flush the standard streams and logging, end the processes this one started (loader
    workers, `pipe:` shard commands), leave the process group, and skip the interpreter's teardown.

    That teardown (finalising the module graph torch, inductor and transformers leave behind) takes ~2 s per
    process here, paid by every rank of every run; whatever a command wrote is closed before it returns."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    for pid in _descendants(os.getpid()):
        with contextlib.suppress(ProcessLookupError):  # it may have ended meanwhile
            # SIGKILL: loader workers ignore SIGTERM (the main process decides when to stop), and one left
            # running can print a traceback from its fd-sharing thread once this process is gone
            os.kill(pid, signal.SIGKILL)
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_initialized():
        dist.destroy_process_group()
    os._exit(code)
