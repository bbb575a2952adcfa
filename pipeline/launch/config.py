"""The `slurm:` section: what `mmclip submit` renders into the sbatch script."""
from __future__ import annotations

from typing import Optional

from pydantic import Field

from pipeline.section import Section


class SlurmConfig(Section):
    nodes: int = Field(default=1, gt=0)
    tasks_per_node: int = Field(default=1, gt=0)
    gpus_per_node: int = Field(default=0, ge=0)
    cpus_per_task: int = Field(default=1, gt=0)
    mem: Optional[str] = None
    time: str = "01:00:00"
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    job_name: str = "mmclip"
    signal_seconds: int = Field(default=120, gt=0, description="USR1 this many seconds before the time limit")
    requeue: bool = True
    setup: list[str] = Field(default_factory=list, description="shell lines run before srun (modules, venv)")
    env: dict[str, str] = Field(default_factory=dict)
    extra_sbatch: list[str] = Field(default_factory=list, description="raw '#SBATCH' options")
