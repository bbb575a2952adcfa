"""One run per output directory: an advisory lock for the life of the run, and no silent restart over an old run.

Rank 0 holds `fcntl.flock` on `output_dir/.mmclip.lock`; the kernel releases it when the process
dies (kill -9 included), so a dead run's lock is simply taken over. The file records who holds it
(PID, host, Slurm job, start time) so a refusal can name the holder. A requeued Slurm job (same job
id) waits briefly for its previous incarnation's lock, then proceeds. flock is local to one
machine's kernel unless the filesystem forwards it (NFSv4 and Lustre with `flock` mounts do; others
may not): there it guards against two runs started on the same node, not across nodes.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Optional

from pipeline.errors import UserError
from pipeline.models.io import checkpoints_of

LOCK = ".mmclip.lock"
RUN_RECORDS = ("checkpoints", "metrics.jsonl", "events.jsonl", "tensorboard", "loss.png")
REQUEUE_WAIT_SECONDS = 60


class RunLock:
    def __init__(self, output_dir: Path):
        self.path = Path(output_dir) / LOCK
        self.fd: Optional[int] = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        job = os.environ.get("SLURM_JOB_ID")
        deadline = time.time() + REQUEUE_WAIT_SECONDS
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = self._holder()
                if job and holder.get("slurm_job") == job and time.time() < deadline:
                    time.sleep(1)  # our own job's previous run, being torn down by the requeue
                    continue
                os.close(fd)
                raise UserError(f"{self.path.parent} is in use by another run (lock {self.path} held by "
                                f"{self._describe(holder)}); wait for it to end or choose another output_dir") from None
        record = {"pid": os.getpid(), "host": socket.gethostname(), "slurm_job": job, "started": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        self.fd = fd

    def _holder(self) -> dict:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    @staticmethod
    def _describe(holder: dict) -> str:
        if not holder:
            return "a process that has not written its details yet"
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
        job = f", Slurm job {holder['slurm_job']}" if holder.get("slurm_job") else ""
        return f"PID {holder.get('pid')} on host {holder.get('host')}{job}, since {started}"

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock; the file stays, describing the last holder
            self.fd = None


def prepare_output_dir(out: Path, resume: Optional[str], restart: bool) -> None:
    """Refuse to start step 0 over an earlier run that trained (checkpoints or metrics) unless told to;
    `restart` deletes that run's records. A run that stopped before its first step leaves nothing to lose."""
    trained = any((out / "checkpoints").glob("step_*")) or (out / "metrics.jsonl").exists()
    if resume is not None or not (trained or restart):
        return
    if restart:
        for path in (out / name for name in RUN_RECORDS):
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        return
    done = checkpoints_of(out)
    held = f"checkpoints up to {done[-1].name}" if done else "metrics.jsonl"
    raise UserError(f"{out} already holds a run ({held}); continue it with --resume latest, choose another "
                    f"output_dir, or pass --restart to delete its checkpoints and logs and start over")
