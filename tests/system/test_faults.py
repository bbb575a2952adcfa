"""Fault injection: bad inputs and faults end with one `mmclip: error:` line or finish with the damage counted;
never a hang, never a traceback, never a lost checkpoint. The rows follow the README's reliability table."""
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import pytest

from helpers.faults import KINDS, cases, damage, small_shard
from helpers.paths import ROOT
from helpers.runs import ENV, MMCLIP, metrics, mmclip, one_line_error, tiny_overrides, train_cmd


@pytest.fixture
def empty_tar(tmp_path) -> Path:
    path = tmp_path / "empty.tar"
    tarfile.open(path, "w").close()
    return path


# ------------------------------------------------------------------ data that yields nothing (rows 1-3, 10)
@pytest.mark.slow
@pytest.mark.parametrize("case", ["empty_resampled", "zero_bytes_no_workers", "empty_epoch_mode", "hf_offline"])
def test_a_source_that_yields_nothing_stops_the_run_in_one_line(demo_shards, tmp_path, empty_tar, case):
    sets = {"data.train": str(empty_tar)}
    if case == "zero_bytes_no_workers":
        zero = tmp_path / "zero.tar"
        zero.write_bytes(b"")
        sets = {"data.train": str(zero), "data.workers": 0}
    elif case == "empty_epoch_mode":
        sets.update({"data.resampled": "false", "data.batch_size": 16, "data.num_samples": 64})
    elif case == "hf_offline":  # opened through fsspec; offline every read fails, and that is one line too
        sets = {"data.train": "hf://datasets/nobody/nothing/train-000000.tar"}
    proc = subprocess.run(train_cmd(1, tiny_overrides(demo_shards, tmp_path / "out", 5, **sets)), cwd=ROOT,
                          env={**ENV, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=600)
    line = one_line_error(proc)
    started = [json.loads(x)["time"] for x in (tmp_path / "out/events.jsonl").read_text().splitlines()]
    assert time.time() - started[0] < 60  # from the loop's start (set-up time is not the loader's)
    if case == "empty_epoch_mode":
        assert "gave no batch of 16 samples" in line and "epochs 0 and 1" in line, line
    else:
        assert "shard reads in a row gave no sample" in line and "data.max_empty_shards" in line, line
        assert ("hf://" if case == "hf_offline" else "tar") in line


def test_a_config_that_is_a_directory_is_one_line(tmp_path):
    (tmp_path / "dircfg").mkdir()
    assert "is a directory" in one_line_error(mmclip(["train", str(tmp_path / "dircfg")]))


# -------------------------------------------------------------------------------------------- the fuzz
def test_fifty_seeded_damaged_shards_each_end_with_the_damage_counted(demo_shards, tmp_path):
    """Every case ends within seconds, and every sample of the shard either trains or is counted as skipped."""
    from pipeline.data.config import DataConfig
    from pipeline.data.loader import build_loader
    from pipeline.modalities.image import ImageTransform
    from pipeline.modalities.text import TextTokenizer

    n = small_shard(demo_shards / "demo/train/train-000000.tar", tmp_path / "good.tar", 40)
    good = (tmp_path / "good.tar").read_bytes()
    preprocess = {"image": ImageTransform(28, (0.5,) * 3, (0.5,) * 3, True), "text": TextTokenizer(16)}
    (tmp_path / "sizes.json").write_text(json.dumps({"case.tar": n}))
    seen_kinds = Counter()

    def too_slow(signum, frame):
        raise TimeoutError("a damaged shard did not end within 20 s")

    previous = signal.signal(signal.SIGALRM, too_slow)
    try:
        for seed, kind in cases(50):
            (tmp_path / "case.tar").write_bytes(damage(good, kind, random.Random(seed)))
            cfg = DataConfig(train=str(tmp_path / "case.tar"), batch_size=8, workers=0, resampled=False,
                             num_samples=n, shuffle_buffer=0)
            trained, skipped = 0, Counter()
            signal.alarm(20)
            for record in build_loader(cfg, split="train", modalities=["image", "text"], preprocess=preprocess):
                assert "fatal" not in record, (kind, seed, record)  # one shard: a bound of 16 cannot be hit
                skipped.update(record["skipped"])
                trained += len(record.get("key", []))
            signal.alarm(0)
            assert trained + sum(skipped.values()) >= n, (kind, seed, trained, skipped)
            seen_kinds[kind] += 1
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert set(seen_kinds) == set(KINDS) and sum(seen_kinds.values()) == 50


@pytest.mark.slow
def test_damaged_shards_through_mmclip_train_finish_and_report_their_skips(demo_shards, tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    sizes = {}
    for i, (seed, kind) in enumerate(cases(3, seed=1)):
        n = small_shard(demo_shards / f"demo/train/train-00000{i}.tar", tmp_path / "good.tar", 120)
        (folder / f"s{i}.tar").write_bytes(damage((tmp_path / "good.tar").read_bytes(), kind, random.Random(seed)))
        sizes[f"s{i}.tar"] = n
    (folder / "sizes.json").write_text(json.dumps(sizes))
    out = tmp_path / "out"
    proc = mmclip(train_cmd(1, tiny_overrides(demo_shards, out, 6, **{"data.train": str(folder / "s{0..2}.tar")})))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipped samples:" in proc.stdout and "Traceback" not in proc.stderr
    assert metrics(out)[-1]["step"] == 6


# ---------------------------------------------------------------------- checkpoints, run dirs, exports
@pytest.fixture(scope="module")
def finished_run(demo_shards, tmp_path_factory) -> Path:
    """A 6-step run with checkpoints at steps 3 and 6 (kept read-only by the tests that share it)."""
    out = tmp_path_factory.mktemp("faults") / "run"
    proc = mmclip(train_cmd(1, tiny_overrides(demo_shards, out, 6)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def copy_run(run: Path, dest: Path) -> Path:
    subprocess.run(["cp", "-a", str(run), str(dest)], check=True)
    return dest


def truncate(path: Path, size: int | None = None) -> None:
    with open(path, "r+b") as f:
        f.truncate(size if size is not None else path.stat().st_size // 2)


@pytest.mark.slow
def test_a_truncated_checkpoint_is_named_and_resume_takes_the_newest_that_verifies(demo_shards, finished_run,
                                                                                    tmp_path):
    out = copy_run(finished_run, tmp_path / "run")
    truncate(out / "checkpoints/step_00000006/mp_rank_00_model_states.pt", 1 << 20)
    proc = mmclip(train_cmd(1, tiny_overrides(demo_shards, out, 8), resume=True))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipping checkpoint" in proc.stdout and "step_00000006" in proc.stdout
    resumed = [json.loads(x) for x in (out / "events.jsonl").read_text().splitlines() if '"resume"' in x]
    assert resumed[-1]["checkpoint"] == "step_00000003"
    assert [m["step"] for m in metrics(out)][-5:] == [4, 5, 6, 7, 8]


@pytest.mark.slow
def test_a_truncated_model_file_is_one_line_and_a_run_directory_falls_back(finished_run, demo_shards, tmp_path):
    out = copy_run(finished_run, tmp_path / "run")
    truncate(out / "checkpoints/step_00000006/model.safetensors")
    line = one_line_error(mmclip(["export", str(out / "checkpoints/step_00000006"), "--out", str(tmp_path / "e")]))
    assert "step_00000006" in line and "fails verification" in line and "step_00000003" in line
    evaluated = mmclip(["eval", "--checkpoint", str(out), "--dataset", str(demo_shards / "demo/wds/fashion_mnist")])
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "skipping checkpoint" in evaluated.stdout and "acc1" in evaluated.stdout
    exported = mmclip(["export", str(out), "--format", "safetensors", "--out", str(tmp_path / "st")])
    assert exported.returncode == 0, exported.stderr[-3000:]
    truncate(tmp_path / "st/model.safetensors")  # an export has no manifest: the file itself is named
    line = one_line_error(mmclip(["eval", "--checkpoint", str(tmp_path / "st"),
                                  "--dataset", str(demo_shards / "demo/wds/fashion_mnist")]))
    assert str(tmp_path / "st/model.safetensors") in line


@pytest.mark.slow
def test_rerunning_into_a_finished_run_refuses_unless_restart(finished_run, demo_shards, tmp_path):
    out = copy_run(finished_run, tmp_path / "run")
    line = one_line_error(mmclip(train_cmd(1, tiny_overrides(demo_shards, out, 2))))
    assert "step_00000006" in line and "--resume latest" in line and "--restart" in line
    proc = mmclip(train_cmd(1, tiny_overrides(demo_shards, out, 2)) + ["--restart"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir()) == ["step_00000002"]
    assert [m["step"] for m in metrics(out)] == [1, 2]


@pytest.mark.slow
def test_export_refuses_a_folder_of_other_files_and_replaces_its_own(finished_run, tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    line = one_line_error(mmclip(["export", str(finished_run), "--out", str(out)]))
    assert "other files" in line and "--force" in line
    assert (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()
    for _ in range(2):  # the second replaces the first
        assert mmclip(["export", str(finished_run), "--out", str(out)]).returncode == 0
    assert "open_clip export" in one_line_error(mmclip(["export", str(finished_run), "--format", "safetensors",
                                                         "--out", str(out)]))
    proc = mmclip(["export", str(finished_run), "--format", "safetensors", "--out", str(out), "--force"])
    assert proc.returncode == 0 and (out / "model.safetensors").is_file()
    assert not (out / "open_clip_config.json").exists()


# ------------------------------------------------------------------- locks and signals (rows 2, 7, 11)
@pytest.mark.slow
def test_a_second_run_in_the_same_directory_refuses_and_sigint_stops_the_first_with_a_resume_line(
        demo_shards, tmp_path):
    out = tmp_path / "dup"
    endless = tiny_overrides(demo_shards, out, 100_000, **{"train.checkpoint_every": 100_000})  # runs until stopped
    first = subprocess.Popen(train_cmd(1, endless),
                             cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 600  # start-up may include DeepSpeed compiling its op
        while time.time() < deadline and len(metrics(out) if (out / "metrics.jsonl").is_file() else []) < 2:
            time.sleep(0.5)
        assert (out / "metrics.jsonl").is_file(), "the first run did not start training"
        line = one_line_error(mmclip(train_cmd(1, endless) + ["--resume", "latest"]))
        assert f"PID {first.pid} on host {socket.gethostname()}" in line, line
        first.send_signal(signal.SIGINT)
        _, err = first.communicate(timeout=60)
    finally:
        first.kill()
    assert first.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    step = metrics(out)[-1]["step"]
    stop = [x for x in err.splitlines() if x.startswith("mmclip: stopped by SIGINT")]
    assert len(stop) == 1 and "--resume latest" in stop[0] and "step_" in stop[0], err[-2000:]
    saved = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert saved and int(saved[-1][5:]) >= step


def session_survivors(session: int) -> list[str]:
    """Pids still in a finished run's session; killed descendants are gone a moment after the run's own exit."""
    for _ in range(20):
        leftover = subprocess.run(["pgrep", "-s", str(session)], capture_output=True, text=True).stdout.split()
        if not leftover:
            break
        time.sleep(0.25)
    return leftover


@pytest.mark.slow
def test_sigterm_ends_a_run_waiting_for_its_first_batch(demo_shards, tmp_path):
    out, err = tmp_path / "waiting", tmp_path / "stderr.txt"
    sets = {"data.train": "pipe:sleep 600", "data.workers": 0}  # a shard that never arrives
    with open(err, "w") as stderr:
        proc = subprocess.Popen(train_cmd(1, tiny_overrides(demo_shards, out, 5, **sets)), cwd=ROOT, env=ENV,
                                stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
    try:
        events = out / "events.jsonl"
        deadline = time.time() + 600
        while time.time() < deadline and not (events.is_file() and '"start"' in events.read_text()):
            time.sleep(0.5)
        time.sleep(2)  # now blocked reading the shard
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
        leftover = session_survivors(proc.pid)
    finally:
        with contextlib.suppress(ProcessLookupError):  # nothing left is the expected outcome
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 75, err.read_text()[-3000:]
    assert "Traceback" not in err.read_text()
    assert "mmclip: stopped by SIGTERM at step 0; no step had finished" in err.read_text()
    assert leftover == [], "the shard's command outlived the run"


@pytest.mark.slow
def test_a_hung_loader_worker_ends_the_run_with_one_line_after_data_timeout(demo_shards, tmp_path):
    """A worker that never hands a batch over (here: a shard command that never writes) must not hang the run."""
    sets = {"data.train": "pipe:sleep 600", "data.workers": 1, "data.timeout_s": 3}
    proc = subprocess.Popen(train_cmd(1, tiny_overrides(demo_shards, tmp_path / "hung", 5, **sets)), cwd=ROOT,
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=300)
        leftover = session_survivors(proc.pid)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    line = one_line_error(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    assert "gave no batch in data.timeout_s=3 s" in line and "--resume latest" in line, line
    assert leftover == [], "the shard's command outlived the run"


def test_a_dead_runs_lock_is_taken_over(tmp_path):
    from pipeline.errors import UserError
    from pipeline.train.rundir import RunLock

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom pipeline.train.rundir import RunLock\n"
                               f"RunLock('{tmp_path}').acquire(); print('held', flush=True); time.sleep(600)"],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(UserError, match=f"PID {holder.pid} on host"):
        RunLock(tmp_path).acquire()
    holder.kill()
    holder.wait()
    lock = RunLock(tmp_path)
    lock.acquire()  # the kernel released the dead holder's flock
    assert json.loads((tmp_path / ".mmclip.lock").read_text())["pid"] == os.getpid()
    lock.release()


# ------------------------------------------------------------------------------- a failing rank (row 12)
@pytest.mark.slow
def test_a_failing_rank_stops_the_others_promptly_with_its_error(demo_shards, tmp_path, empty_tar):
    """Two ranks started as srun would (env only): rank 1's data is empty, rank 0 waits in a collective."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in (0, 1):
        sets = {"data.train": str(empty_tar)} if rank == 1 else {}
        env = {**ENV, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen(MMCLIP + ["train", str(ROOT / "configs/demo.yaml"),
                                                *tiny_overrides(demo_shards, tmp_path / "run", 20, **sets)],
                                      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    errors = []
    for proc in procs:
        try:
            errors.append(proc.communicate(timeout=150)[1])
        finally:
            proc.kill()
    assert all(p.returncode not in (0, None) for p in procs)
    failing = one_line_error(subprocess.CompletedProcess([], procs[1].returncode, "", errors[1]))
    assert "shard reads in a row gave no sample" in failing
    stopped = one_line_error(subprocess.CompletedProcess([], procs[0].returncode, "", errors[0]))
    assert stopped.startswith("mmclip: error: rank 0 stops: rank 1 failed: ") and "shard reads" in stopped
