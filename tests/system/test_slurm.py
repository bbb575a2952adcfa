"""Slurm: rendered scripts, submit errors, rank discovery, and real jobs on a local two-node Slurm
(training on one node x 2 tasks and on 2 nodes x 1 task, a signalled job that requeues itself and
resumes from its checkpoint in both layouts, and an eval job array spread over the two nodes)."""
import json
import subprocess

import pytest

from helpers.paths import ROOT
from helpers.runs import tiny_overrides
from helpers.slurm_cluster import NODES
from helpers.slurm_jobs import completed, job_events, jobs, layout, released_after_requeue, submit, wait
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.launch.env import REQUEUE_EXIT_CODE, discover_env, first_slurm_host
from pipeline.launch.slurm import check_script, render_sbatch


def test_multi_node_gpu_script_has_every_option(tmp_path):
    cfg = load_config(ROOT / "configs/vit_b16_laion.yaml", [f"output_dir={tmp_path}", "slurm.account=proj1",
                                                           "slurm.qos=high"])
    script = render_sbatch(cfg, config_path="configs/vit_b16_laion.yaml", overrides=["optim.lr=1e-4"])
    check_script(script)
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --account=proj1", "#SBATCH --qos=high", "#SBATCH --requeue",
                 "#SBATCH --signal=USR1@300", "#SBATCH --open-mode=append", "module load cuda/12.4",
                 "export NCCL_ASYNC_ERROR_HANDLING=1", "--resume latest --set optim.lr=1e-4",
                 f'if [ "$code" -eq {REQUEUE_EXIT_CODE} ]', 'scontrol requeue "$SLURM_JOB_ID"'):
        assert line in script, line


def test_dry_run_prints_and_submits_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["submit", str(ROOT / "configs/demo.yaml"), "--dry-run", "--set", f"output_dir={out}",
                 "--nodes", "2", "--kind", "eval"]) == 0
    printed = capsys.readouterr().out
    assert "#SBATCH --array=0-1" in printed and "zeroshot_retrieval" in printed
    assert not out.exists()


def test_missing_sbatch_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty PATH: no sbatch
    assert main(["submit", str(ROOT / "configs/demo.yaml"), "--set", f"output_dir={tmp_path / 'r'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "mmclip: error: sbatch not found on PATH; install the Slurm client tools or use --dry-run"


def test_rank_discovery_from_launchers():
    srun = {"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0",
            "SLURM_JOB_ID": "123", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURMD_NODENAME": "gpu08"}
    env = discover_env(srun)
    assert (env.rank, env.world_size, env.local_rank, env.master_port, env.node) == (3, 8, 1, 20123, "gpu08")
    assert env.master_addr == first_slurm_host("gpu[07-08]") and env.master_addr.startswith("gpu")
    torchrun = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29400"}
    assert discover_env(torchrun).master_addr == "10.0.0.1" and discover_env({}).world_size == 1


def _check_ranks(starts, nodes):
    """Two ranks, numbered in node order (rank r on the job's node r // tasks_per_node), the master on rank 0's."""
    assert sorted(e["rank"] for e in starts) == [0, 1] and {e["world_size"] for e in starts} == {2}
    by_rank = [e["node"] for e in sorted(starts, key=lambda e: e["rank"])]
    assert len(set(by_rank)) == nodes and set(by_rank) <= set(NODES) and by_rank == sorted(by_rank)
    assert {e["master"].split(":")[0] for e in starts} == {by_rank[0]}


LAYOUTS = pytest.mark.parametrize("nodes, tasks_per_node", [(1, 2), (2, 1)], ids=["1node-2tasks", "2nodes-1task"])


def test_real_slurm_two_task_training(slurm_cluster, demo_shards, tmp_path):
    out = tmp_path / "run"
    job = submit(slurm_cluster, *tiny_overrides(demo_shards, out, 8), *layout(1, 2),
                  "--set", "deepspeed.zero_stage=2")
    wait(job, slurm_cluster, completed(job, slurm_cluster))
    _check_ranks(job_events(out, "start"), nodes=1)
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000008"
    assert (out / "train.sbatch").is_file()


@pytest.fixture(scope="module")
def two_node_run(slurm_cluster, demo_shards, tmp_path_factory):
    """The run directory of a 2-node x 1-task training job that ran to the end."""
    out = tmp_path_factory.mktemp("two_nodes") / "run"
    job = submit(slurm_cluster, *tiny_overrides(demo_shards, out, 8), *layout(2, 1))
    wait(job, slurm_cluster, completed(job, slurm_cluster))
    return out


def test_real_slurm_two_node_training(two_node_run):
    _check_ranks(job_events(two_node_run, "start"), nodes=2)
    assert sorted((e["rank"], e["step"]) for e in job_events(two_node_run, "finished")) == [(0, 8), (1, 8)]
    assert [json.loads(line)["step"] for line in (two_node_run / "metrics.jsonl").read_text().splitlines()] == \
        list(range(1, 9))
    assert (two_node_run / "checkpoints" / "latest").read_text().strip() == "step_00000008"
    log = next(two_node_run.glob("slurm-*.out")).read_text()
    assert "on node[1-2], master node1:" in log


def test_real_slurm_eval_array_on_two_nodes(slurm_cluster, two_node_run, demo_shards):
    from pipeline.eval.run import evaluate
    from pipeline.models.io import load_model

    datasets = {"zeroshot_classification": demo_shards / "demo/wds/fashion_mnist",
                "zeroshot_retrieval": demo_shards / "demo/wds/fashion_mnist_retrieval"}
    tasks = ", ".join(f"{{task: {task}, dataset: {path}, name: {task}}}" for task, path in datasets.items())
    # a whole node per array task: the two tasks run side by side, one on each node
    job = submit(slurm_cluster, "--kind", "eval", "--set", f"output_dir={two_node_run}",
                  "--set", f"eval.tasks=[{tasks}]", "--cpus-per-task", "2")
    wait(job, slurm_cluster, completed(job, slurm_cluster))
    assert sorted(j["BatchHost"] for j in jobs(job, slurm_cluster)) == list(NODES)
    model, _ = load_model(two_node_run)
    for task, path in datasets.items():
        result = json.loads((two_node_run / "eval" / f"{task}.json").read_text())
        assert result["metrics"] == pytest.approx(evaluate(model, task, str(path)), abs=1e-6)


@LAYOUTS
def test_real_slurm_signal_requeues_and_resumes(slurm_cluster, demo_shards, tmp_path, nodes, tasks_per_node):
    out, steps = tmp_path / "run", 200  # the signal comes within a few steps of the 5th; ~10 steps/s here
    job = submit(slurm_cluster, *tiny_overrides(demo_shards, out, steps, **{"train.checkpoint_every": 1000}),
                  *layout(nodes, tasks_per_node))
    metrics = out / "metrics.jsonl"
    wait(job, slurm_cluster, lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 5)
    subprocess.run(["scancel", "--signal=USR1", job], env=slurm_cluster, check=True)
    wait(job, slurm_cluster, lambda: len(job_events(out, "preempted")) == 2)
    stopped_at = job_events(out, "preempted")[0]["step"]
    assert sorted((e["rank"], e["step"]) for e in job_events(out, "preempted")) == [(0, stopped_at), (1, stopped_at)]
    assert sorted(p.name for p in (out / "checkpoints" / f"step_{stopped_at:08d}").glob("rank*_state.pt")) == \
        ["rank0_state.pt", "rank1_state.pt"]  # each rank saved its part

    wait(job, slurm_cluster, released_after_requeue(job, slurm_cluster, out))
    wait(job, slurm_cluster, completed(job, slurm_cluster))
    assert sorted((e["rank"], e["step"]) for e in job_events(out, "resume")) == [(0, stopped_at), (1, stopped_at)]
    assert 0 < stopped_at < steps
    starts = job_events(out, "start")
    _check_ranks(starts[:2], nodes)
    _check_ranks(starts[2:], nodes)
    log = next(out.glob("slurm-*.out")).read_text()
    assert "requeueing job" in log and "restart 1" in log
    logged = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert logged == list(range(1, steps + 1))  # every step once: nothing lost, nothing repeated
