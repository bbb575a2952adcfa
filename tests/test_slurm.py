"""Slurm: rendered scripts, submit errors, rank discovery, and real jobs on a local Slurm
(2-task training, and a signalled job that requeues itself and resumes from its checkpoint)."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.launch.env import REQUEUE_EXIT_CODE, discover_env, first_slurm_host
from pipeline.launch.slurm import check_script, render_sbatch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from test_train import tiny_overrides  # noqa: E402


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
            "SLURM_JOB_ID": "123", "SLURM_JOB_NODELIST": "gpu[07-08]"}
    env = discover_env(srun)
    assert (env.rank, env.world_size, env.local_rank, env.master_port) == (3, 8, 1, 20123)
    assert env.master_addr == first_slurm_host("gpu[07-08]") and env.master_addr.startswith("gpu")
    torchrun = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29400"}
    assert discover_env(torchrun).master_addr == "10.0.0.1" and discover_env({}).world_size == 1


def _wait(job, env, done, timeout=600):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if done():
            return
        time.sleep(1)
    log = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
    pytest.fail(f"job {job} did not finish in {timeout}s: {log[-1500:]}")


def _events(out):
    path = out / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _submit(cfg_args, env, capsys):
    os.environ.update(env)
    assert main(["submit", str(ROOT / "configs/demo.yaml"), *cfg_args]) == 0
    return capsys.readouterr().out.split("job ")[1].split(":")[0]


def test_real_slurm_two_task_training(slurm_cluster, demo_shards, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    args = tiny_overrides(demo_shards, out, 8) + ["--set", "slurm.tasks_per_node=2", "--set",
                                                  "slurm.cpus_per_task=1", "--set", "deepspeed.zero_stage=2"]
    for k, v in slurm_cluster.items():
        monkeypatch.setenv(k, v)
    job = _submit(args, slurm_cluster, capsys)
    _wait(job, slurm_cluster, lambda: any(e["event"] == "finished" for e in _events(out)))
    starts = [e for e in _events(out) if e["event"] == "start"]
    assert sorted(e["rank"] for e in starts) == [0, 1] and {e["world_size"] for e in starts} == {2}
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000008"
    assert (out / "train.sbatch").is_file()


def test_real_slurm_signal_requeues_and_resumes(slurm_cluster, demo_shards, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    args = tiny_overrides(demo_shards, out, 400, **{"train.checkpoint_every": 1000}) + [
        "--set", "slurm.tasks_per_node=2", "--set", "slurm.cpus_per_task=1"]
    for k, v in slurm_cluster.items():
        monkeypatch.setenv(k, v)
    job = _submit(args, slurm_cluster, capsys)
    metrics = out / "metrics.jsonl"
    _wait(job, slurm_cluster, lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 5)
    subprocess.run(["scancel", "--signal=USR1", job], env=slurm_cluster, check=True)
    _wait(job, slurm_cluster, lambda: any(e["event"] == "preempted" for e in _events(out)))
    stopped_at = next(e["step"] for e in _events(out) if e["event"] == "preempted")

    def released():  # requeue holds the job until BeginTime; let it go now
        subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], env=slurm_cluster,
                       capture_output=True)
        return any(e["event"] == "resume" for e in _events(out))

    _wait(job, slurm_cluster, released)
    _wait(job, slurm_cluster, lambda: any(e["event"] == "finished" for e in _events(out)))
    resume = next(e for e in _events(out) if e["event"] == "resume")
    assert resume["step"] == stopped_at and stopped_at < 400
    log = next(out.glob("slurm-*.out")).read_text()
    assert "requeueing job" in log and "restart 1" in log
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(1, 401))  # every step once: nothing lost, nothing repeated
