"""A real two-node Slurm on this one machine, for the suite: its own munged, one slurmctld and one
slurmd per node, all under a temporary directory.

Both nodes are this host: `slurmd -N nodeK` listens at 127.0.0.1 on the node's own port, `%n` in
the spool, pid and log paths keeps the two daemons apart, and /etc/hosts resolves the node names
(the job script takes MASTER_ADDR from the node list). Single-node jobs simply get one of the nodes.
The daemons run in the foreground as pytest's children and get SIGTERM when pytest exits however
it exits (PR_SET_PDEATHSIG), so no session leaves one behind; fresh ports, state and munge socket
keep concurrent sessions apart. Tests that need the cluster skip, with the reason, when it cannot run.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

NODES = ("node1", "node2")
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "squeue", "scancel")
HOSTS = Path("/etc/hosts")
PR_SET_PDEATHSIG = 1


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


def _address(name: str) -> str | None:
    try:
        return socket.gethostbyname(name)
    except OSError:
        return None


def _resolve_nodes() -> str | None:
    """Make the node names resolve to this machine (one /etc/hosts line, added once); else the reason why not."""
    addresses = {name: _address(name) for name in NODES}
    elsewhere = {name: a for name, a in addresses.items() if a is not None and not a.startswith("127.")}
    if elsewhere:
        return f"the test node names resolve to other machines ({elsewhere}), not to this one"
    if None in addresses.values():
        line = f"127.0.0.1 {' '.join(NODES)}  # mmclip tests: a two-node Slurm on this machine\n"
        try:
            text = HOSTS.read_text()
            with HOSTS.open("a") as f:
                f.write(line if text.endswith("\n") or not text else "\n" + line)
        except OSError as e:
            return f"the test node names do not resolve and {HOSTS} cannot take them ({e})"
    return None


def _write_conf(root: Path, host: str) -> Path:
    mem_mib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20 // 2
    nodes = "".join(f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={_free_port()} "
                    f"CPUs={os.cpu_count()} RealMemory={mem_mib} State=UNKNOWN\n" for name in NODES)
    conf = root / "slurm.conf"
    # FirstJobId varies so that concurrent sessions' jobs get different MASTER_PORTs (20000 + id % 20000)
    conf.write_text(f"""ClusterName=mmclip-test
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={root}/munge.socket
FirstJobId={_free_port() % 20000 + 1}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool-%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
SlurmctldPort={_free_port()}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
SchedulerParameters=defer
{nodes}PartitionName=debug Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
""")
    return conf


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM when pytest exits, even if it is killed."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class Daemons:
    """Foreground daemons started by this session, stopped in reverse order."""

    def __init__(self, root: Path, env: dict):
        self.root, self.env, self.procs = root, env, {}

    def start(self, name: str, *cmd: str) -> None:
        with open(self.root / f"{name}.out", "w") as out:
            self.procs[name] = subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                                preexec_fn=_die_with_parent)

    def failure(self) -> str | None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                return f"{name} exited ({proc.returncode}): {(self.root / f'{name}.out').read_text()[-500:]}"
        return None

    def stop(self) -> None:
        for proc in reversed(self.procs.values()):
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_until(ready, daemons: Daemons, what: str, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while not ready():
        failure = daemons.failure()
        if failure or time.time() > deadline:
            pytest.skip(f"local Slurm: {failure or what + ' not ready in %d s' % timeout}")
        time.sleep(0.5)


def _nodes_idle(env: dict) -> bool:
    states = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=env, capture_output=True, text=True).stdout.split()
    return len(states) == len(NODES) and set(states) == {"idle"}


def _drain(root: Path, env: dict, timeout: float = 60) -> None:
    """Cancel every job and wait until no step runs: slurmstepd needs its slurmd alive to finish."""
    subprocess.run(["scancel", "--full", "--user", "root"], env=env, capture_output=True)
    deadline = time.time() + timeout
    while time.time() < deadline:
        queue = subprocess.run(["squeue", "-h"], env=env, capture_output=True, text=True).stdout.strip()
        steps = [p for p in root.glob("spool-*/*") if p.is_socket()]  # each live slurmstepd holds one
        if not queue and not steps:
            return
        time.sleep(0.5)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """SLURM_CONF and the rest of the environment for the Slurm clients of a fresh two-node cluster."""
    reason = _why_not() or _resolve_nodes()
    if reason:
        print(f"\nSlurm tests skipped: {reason}")
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("slurm")
    (root / "state").mkdir()
    key = root / "munge.key"
    key.write_bytes(os.urandom(128))
    key.chmod(0o600)
    conf = _write_conf(root, socket.gethostname().split(".")[0])
    env = {**os.environ, "SLURM_CONF": str(conf)}
    daemons = Daemons(root, env)
    try:
        # root-owned munged (--force) with its own key and socket: the test cluster runs everything as root
        daemons.start("munged", "munged", "--foreground", "--force", f"--socket={root}/munge.socket",
                      f"--key-file={key}", f"--pid-file={root}/munged.pid", f"--seed-file={root}/munged.seed",
                      f"--log-file={root}/munged.log")
        _wait_until((root / "munge.socket").exists, daemons, "munged")
        daemons.start("slurmctld", "slurmctld", "-D", "-f", str(conf))
        for name in NODES:
            daemons.start(f"slurmd-{name}", "slurmd", "-D", "-f", str(conf), "-N", name)
        _wait_until(lambda: _nodes_idle(env), daemons, f"nodes {', '.join(NODES)} idle")
        yield env
    finally:
        if "slurmctld" in daemons.procs:
            _drain(root, env)
        daemons.stop()
