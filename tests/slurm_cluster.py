"""A real single-node Slurm (munged + slurmctld + slurmd) under a temporary directory, for the suite.

Started once per session when the binaries exist and we are root; stopped by the PIDs in its pid
files. Tests that need it skip, with the reason, when it cannot run here.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _why_not() -> str | None:
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing:
        return f"Slurm binaries not found ({', '.join(missing)}); `make test` installs them when run as root"
    if os.geteuid() != 0:
        return "the local Slurm needs root (SlurmdUser=root)"
    return None


def _write_conf(root: Path, host: str) -> Path:
    mem_mib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20 // 2
    conf = root / "slurm.conf"
    conf.write_text(f"""ClusterName=mmclip-test
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
SchedulerParameters=defer
NodeName={host} CPUs={os.cpu_count()} RealMemory={mem_mib} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
""")
    return conf


MUNGE_PID = Path("/run/munge/munged.pid")


def _start_munge() -> bool:
    """Start munged as the munge user unless one runs; True if we started it (and must stop it)."""
    if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode == 0:
        return False
    MUNGE_PID.parent.mkdir(parents=True, exist_ok=True)
    shutil.chown(MUNGE_PID.parent, "munge", "munge")
    subprocess.run(["runuser", "-u", "munge", "--", "munged"], check=True)
    return True


def _drain(env: dict, timeout: float = 60) -> None:
    """Cancel every job and wait until the queue is empty: slurmstepd needs slurmd alive to finish."""
    subprocess.run(["scancel", "--full", "--user", "root"], env=env, capture_output=True)
    deadline = time.time() + timeout
    while time.time() < deadline:
        queue = subprocess.run(["squeue", "-h"], env=env, capture_output=True, text=True).stdout.strip()
        steps = subprocess.run(["pgrep", "-f", "slurmstepd"], capture_output=True).returncode == 0
        if not queue and not steps:
            return
        time.sleep(0.5)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    reason = _why_not()
    if reason:
        print(f"\nSlurm tests skipped: {reason}")
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("slurm")
    (root / "state").mkdir()
    (root / "spool").mkdir()
    host = socket.gethostname().split(".")[0]
    conf = _write_conf(root, host)
    env = {**os.environ, "SLURM_CONF": str(conf)}
    started_munge = _start_munge()
    subprocess.run(["slurmctld", "-f", str(conf)], env=env, check=True)
    subprocess.run(["slurmd", "-f", str(conf)], env=env, check=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            state = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True).stdout
            if "idle" in state:
                break
            time.sleep(0.5)
        else:
            pytest.skip(f"local Slurm did not become idle: {(root / 'slurmctld.log').read_text()[-500:]}")
        yield env
    finally:
        _drain(env)
        pid_files = [root / "slurmd.pid", root / "slurmctld.pid"] + ([MUNGE_PID] if started_munge else [])
        for pid_file in pid_files:
            if pid_file.is_file():
                try:
                    os.kill(int(pid_file.read_text().strip()), 15)
                except (ProcessLookupError, ValueError):
                    pass
