"""Real Slurm, elastic: a 2-node job is signalled, requeued, given 1 node while it waits (as a cluster
short of nodes would), and finishes its epoch there with every sample trained on exactly once."""
import json
import subprocess
from collections import Counter

from helpers.runs import tiny_overrides
from helpers.slurm_jobs import completed, job_events, layout, released_after_requeue, submit, wait


def test_real_slurm_two_node_job_requeued_on_one_node_resumes_its_epoch(slurm_cluster, demo_shards, tmp_path):
    out, steps = tmp_path / "run", 93  # one epoch: 3000 samples // 32
    sets = {"train.checkpoint_every": 1000, "data.resampled": "false", "train.log_keys": "true"}
    job = submit(slurm_cluster, *tiny_overrides(demo_shards, out, steps, **sets), *layout(2, 1))
    metrics = out / "metrics.jsonl"
    wait(job, slurm_cluster, lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 5)
    subprocess.run(["scancel", "--signal=USR1", job], env=slurm_cluster, check=True)
    wait(job, slurm_cluster, lambda: len(job_events(out, "preempted")) == 2)
    stopped_at = job_events(out, "preempted")[0]["step"]
    shrink = lambda: subprocess.run(["scontrol", "update", f"jobid={job}", "NumNodes=1-1", "NumTasks=1"],  # noqa: E731
                                    env=slurm_cluster, check=True, capture_output=True)  # as a cluster short of nodes would
    wait(job, slurm_cluster, released_after_requeue(job, slurm_cluster, out, when_pending=shrink))
    wait(job, slurm_cluster, completed(job, slurm_cluster))
    resumed = job_events(out, "resume")
    assert [(e["rank"], e["world_size"], e["from_world_size"], e["step"]) for e in resumed] == [(0, 1, 2, stopped_at)]
    assert [e["node"] for e in job_events(out, "start")][2:] in (["node1"], ["node2"])
    log = next(out.glob("slurm-*.out")).read_text()
    assert f"resumed step {stopped_at} from 2 ranks on 1 ranks" in log and "restart 1" in log
    logged = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert logged == list(range(1, steps + 1))
    keys = Counter(k for f in (out / "keys").glob("rank*.jsonl") for line in f.read_text().splitlines()
                   for k in json.loads(line)["keys"])
    assert len(keys) == steps * 32 and set(keys.values()) == {1}  # no sample lost or repeated across the move
