"""Jobs on the local test Slurm (helpers.slurm_cluster): submit through `mmclip submit`, poll, read their events."""
import contextlib
import io
import json
import subprocess
import time
from pathlib import Path

import pytest

from helpers.paths import ROOT
from pipeline.cli import main

FAILED = {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def jobs(job, env) -> list[dict]:
    """`scontrol show job` fields of the job, or of each task of an array job."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job], env=env, capture_output=True, text=True).stdout
    return [dict(f.split("=", 1) for f in line.split() if "=" in f) for line in out.splitlines()]


def wait(job, env, done, timeout=600):
    """Poll done() until it holds; fail at once, with the job's log, if the job ends badly."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if done():
            return
        failed = [j for j in jobs(job, env) if j.get("JobState") in FAILED]
        if failed:
            log = Path(failed[0]["StdOut"])
            pytest.fail(f"job {job} {failed[0]['JobState']} ({failed[0].get('Reason')}): "
                        f"{log.read_text()[-3000:] if log.is_file() else ''}")
        time.sleep(1)
    pytest.fail(f"job {job} did not finish in {timeout}s: {jobs(job, env)}")


def completed(job, env):
    return lambda: {j.get("JobState") for j in jobs(job, env)} == {"COMPLETED"}


def job_events(out, kind=None):
    path = out / "events.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    return [e for e in records if kind in (None, e["event"])]


def submit(env, *args):
    """`mmclip submit` against the test cluster: sbatch passes this environment (SLURM_CONF...) to the job."""
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(printed):
        for k, v in env.items():
            mp.setenv(k, v)
        assert main(["submit", str(ROOT / "configs/demo.yaml"), *args]) == 0
    return printed.getvalue().split("job ")[1].split(":")[0]


def layout(nodes, tasks_per_node):
    return ["--nodes", str(nodes), "--set", f"slurm.tasks_per_node={tasks_per_node}", "--set", "slurm.cpus_per_task=1"]


def released_after_requeue(job, env, out, when_pending=None):
    """A wait() condition: true once the requeued run logged its resume. Requeue holds the job (BeginTime) while
    its nodes revoke the old run's credential; it is released seconds later, not within the revocation's second,
    or the nodes refuse it and it fails. `when_pending` runs once, when the job is first seen pending."""
    pending_since = []

    def done():
        if [j["JobState"] for j in jobs(job, env)] == ["PENDING"]:
            if not pending_since:
                pending_since.append(time.time())
                if when_pending is not None:
                    when_pending()
            elif time.time() - pending_since[0] > 3:
                subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], env=env, capture_output=True)
        return bool(job_events(out, "resume"))
    return done
