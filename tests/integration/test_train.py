"""Training end to end: DeepSpeed over 2 gloo processes (ZeRO 1/2/3, offload, torchrun and the deepspeed launcher),
10% corrupt shards, hard negatives, Symile with audio, bf16, ZeRO 0's gradient clip, exact resume, kill -9
recovery, compiled training (train.compile through inductor)."""
import io
import json
import os
import signal
import subprocess
import time

import pytest
import torch

from helpers.paths import ROOT
from helpers.runs import events, metrics, run, tiny_overrides, train_cmd

pytestmark = pytest.mark.slow  # starts training processes


@pytest.mark.parametrize("stage, launcher, override", [
    (1, "torchrun", None), (2, "deepspeed", None), (3, "torchrun", None),
    (3, "torchrun", "configs/deepspeed/zero3_offload.json"),  # the shipped optimizer-offload settings
], ids=["zero1", "zero2-deepspeed-launcher", "zero3", "zero3-offload"])
def test_two_process_deepspeed_training_loss_falls(demo_shards, tmp_path, stage, launcher, override):
    out = tmp_path / f"zero{stage}"
    sets = {"deepspeed.zero_stage": stage, "train.micro_batch": 8}
    if override:
        sets["deepspeed.config_override"] = str(ROOT / override)
    run(train_cmd(2, tiny_overrides(demo_shards, out, 12, **sets), launcher=launcher))
    losses = [m["loss"] for m in metrics(out) if "loss" in m]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05, losses
    starts = [e for e in events(out) if e["event"] == "start"]
    assert sorted(e["rank"] for e in starts) == [0, 1] and all(e["world_size"] == 2 for e in starts)
    ckpt = out / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step_00000012"
    assert (ckpt / "step_00000012" / "model.safetensors").is_file()
    assert (out / "loss.png").is_file() and (out / "config.yaml").is_file()
    assert any((out / "tensorboard").iterdir())


def test_shards_with_ten_percent_corrupt_samples_train_to_the_end(demo_shards, tmp_path):
    import tarfile

    bad_dir = tmp_path / "corrupt"
    bad_dir.mkdir()
    corrupted = 0
    for shard in sorted((demo_shards / "demo/train").glob("*.tar")):
        with tarfile.open(shard) as src, tarfile.open(bad_dir / shard.name, "w") as dst:
            for member in src.getmembers():
                data = src.extractfile(member).read()
                if member.name.endswith(".png") and int(member.name.split("_")[1].split(".")[0]) % 10 == 0:
                    data, corrupted = b"\x89PNG but truncated", corrupted + 1
                member.size = len(data)
                dst.addfile(member, io.BytesIO(data))
    out = tmp_path / "run"
    spec = str(bad_dir / "train-{000000..000005}.tar")
    proc = run(train_cmd(1, tiny_overrides(demo_shards, out, 10, **{"data.train": spec})))
    finished = events(out)[-1]
    assert finished["event"] == "finished" and finished["step"] == 10
    seen = finished["skipped"]["corrupt_image"]
    assert 0.05 * 10 * 32 < seen < 0.2 * 10 * 32, finished  # about 1 in 10 of the ~320 samples read
    assert f"corrupt_image={seen}" in proc.stdout
    assert metrics(out)[-1]["skipped/corrupt_image"] == seen
    assert corrupted == 300


def test_eval_every_n_steps_lands_in_metrics_and_tensorboard(demo_shards, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "evals"
    task = f"[{{task: zeroshot_classification, dataset: {demo_shards / 'demo/wds/fashion_mnist'}, name: fm}}]"
    run(train_cmd(1, tiny_overrides(demo_shards, out, 6, **{"eval.tasks": task, "eval.every_steps": 3})))
    evals = [(m["step"], m["fm/acc1"]) for m in metrics(out) if "fm/acc1" in m]
    assert [step for step, _ in evals] == [3, 6]  # the final eval is the step-6 one, not run twice
    assert all(0.0 <= acc <= 1.0 for _, acc in evals)
    tb = EventAccumulator(str(out / "tensorboard"))
    tb.Reload()
    assert [e.step for e in tb.Scalars("fm/acc1")] == [3, 6]
    assert [e.step for e in tb.Scalars("loss")] == list(range(1, 7))


def test_hard_negative_captions_train_end_to_end(demo_shards, tmp_path):
    """Also the step's time split (train.phase_times) under GradCache: every phase is measured and the phases
    are parts of the step's wall time, which samples/s gives."""
    out = tmp_path / "negatives"
    run(train_cmd(2, tiny_overrides(demo_shards, out, 8, **{
        "data.hard_negatives": "{k: 2}", "loss.hard_negative_alpha": 0.5, "loss.hard_negative_beta": 0.5,
        "train.micro_batch": 8, "train.phase_times": "true"})))
    rows = [m for m in metrics(out) if "loss" in m]
    losses = [m["loss"] for m in rows]
    assert len(losses) == 8 and sum(losses[-2:]) / 2 < sum(losses[:2]) / 2, losses
    for m in rows:
        split = [m[f"time/{p}_ms"] for p in ("data", "forward", "loss", "backward", "optimizer", "other")]
        assert min(split[1:5]) > 0 and min(split) >= 0, m
        assert sum(split) <= 1000 * 32 / m["samples_per_s"] * 1.01, m
    plain = tmp_path / "plain"  # same seed, data and init: the first loss differs only by the negatives
    run(train_cmd(2, tiny_overrides(demo_shards, plain, 1, **{"train.micro_batch": 8})))
    assert abs(metrics(plain)[0]["loss"] - losses[0]) > 1e-3


def test_symile_image_text_audio_trains_over_two_ranks_and_evaluates_jointly(demo_shards, tmp_path):
    out = tmp_path / "symile"
    sets = {"data.train": str(demo_shards / "symile/train/train-{000000..000005}.tar"),
            "model.towers.audio.options": "{sample_rate: 16000, n_mels: 32}", "data.audio.seconds": 0.5,
            "model.towers.image.options": "{image_size: 28, patch_size: 7, width: 32, layers: 1, head_width: 16}",
            "train.micro_batch": 8,
            "eval.tasks": f"[{{task: symile_classification, name: symile, "
                          f"dataset: {demo_shards / 'symile/wds/fashion_mnist_symile'}}}]"}
    run(train_cmd(2, tiny_overrides(demo_shards, out, 10, **sets), config="configs/demo_symile.yaml"))
    rows = metrics(out)
    losses = [m["loss"] for m in rows if "loss" in m]
    assert len(losses) == 10 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    final = rows[-1]
    assert 0.0 <= final["symile/acc1"] <= 1.0 and final["symile/samples"] > 0, final


def test_bf16_training_consolidates_fp32_weights(demo_shards, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "bf16"
    run(train_cmd(1, tiny_overrides(demo_shards, out, 12, **{"deepspeed.zero_stage": 1,
                                                              "deepspeed.precision": "bf16"})))
    losses = [m["loss"] for m in metrics(out) if "loss" in m]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05, losses
    weights = load_file(out / "checkpoints" / "step_00000012" / "model.safetensors")
    assert {v.dtype for v in weights.values() if v.is_floating_point()} == {torch.float32}


def test_zero0_clips_in_torch_as_deepspeed_would(demo_shards, tmp_path):
    """Without ZeRO, torch's foreach clip (an optimizer step pre-hook, pipeline.train.engine.clip_in_torch) stands
    in for DeepSpeed's: the same weights after a step. A max norm of 1e-4 brings the gradients down to Adam's eps,
    where the clip changes the update: the unclipped run's weights differ."""
    from safetensors.torch import load_file

    deepspeed_clip = tmp_path / "clip.json"
    deepspeed_clip.write_text(json.dumps({"gradient_clipping": 1e-4}))
    arms = {"torch": {"optim.grad_clip": 1e-4}, "none": {"optim.grad_clip": "null"},
            "deepspeed": {"optim.grad_clip": "null", "deepspeed.config_override": str(deepspeed_clip)}}
    weights = {}
    for name, sets in arms.items():
        run(train_cmd(1, tiny_overrides(demo_shards, tmp_path / name, 1, **{"deepspeed.zero_stage": 0, **sets})))
        weights[name] = load_file(tmp_path / name / "checkpoints" / "step_00000001" / "model.safetensors")
    for key, value in weights["torch"].items():
        torch.testing.assert_close(value, weights["deepspeed"][key], rtol=1e-5, atol=1e-8, msg=key)
    moved = {k: (weights["none"][k] - v).abs().max().item() for k, v in weights["torch"].items()}
    assert max(moved.values()) > 1e-3, moved


def test_resume_gives_the_identical_next_loss(demo_shards, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    constant = {"optim.schedule": "constant"}  # so a 3-step run is the first half of the 6-step one
    run(train_cmd(1, tiny_overrides(demo_shards, full, 6, **constant)))
    run(train_cmd(1, tiny_overrides(demo_shards, part, 3, **constant)))  # stops (and checkpoints) at step 3
    run(train_cmd(1, tiny_overrides(demo_shards, part, 6, **constant), resume=True))
    a = {m["step"]: m["loss"] for m in metrics(full)}
    b = {m["step"]: m["loss"] for m in metrics(part)}
    assert [e["event"] for e in events(part)].count("resume") == 1
    for step in (4, 5, 6):
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-7), (step, a, b)
    # resuming from an earlier checkpoint saves step 6 again: the old one is replaced, never lost midway
    earlier = part / "checkpoints" / "step_00000003"
    run(train_cmd(1, tiny_overrides(demo_shards, part, 6, **constant)) + ["--resume", str(earlier)])
    again = [m["loss"] for m in metrics(part) if m["step"] == 6]
    assert len(again) == 2 and again[1] == pytest.approx(a[6], rel=1e-6, abs=1e-7)
    assert sorted(p.name for p in (part / "checkpoints").iterdir() if p.is_dir())[-1] == "step_00000006"
    assert (part / "checkpoints" / "latest").read_text().strip() == "step_00000006"


def test_kill_9_then_resume_finishes(demo_shards, tmp_path):
    out = tmp_path / "killed"
    env = {**os.environ, "MMCLIP_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(train_cmd(1, tiny_overrides(demo_shards, out, 40)), cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (out / "checkpoints" / "latest").is_file():
        time.sleep(0.5)
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    latest = (out / "checkpoints" / "latest").read_text().strip()
    assert latest.startswith("step_")
    run(train_cmd(1, tiny_overrides(demo_shards, out, 40), resume=True))
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000040"
    assert events(out)[-1]["event"] == "finished"
    resumed = [e for e in events(out) if e["event"] == "resume"]
    assert resumed and resumed[0]["checkpoint"] >= latest


def test_resume_latest_takes_the_newest_checkpoint_that_verifies(tmp_path):
    from pipeline.config import load_config
    from pipeline.integrity import hash_files, write_manifest
    from pipeline.train.checkpoint import _prune, find_resume_tag

    cfg = load_config(ROOT / "configs/demo.yaml", [f"output_dir={tmp_path}"])
    root = tmp_path / "checkpoints"
    for name in ("step_00000003", "step_00000006", "step_00000009", "step_00000012.tmp", "step_00000006.old"):
        (root / name).mkdir(parents=True)
        (root / name / "model.safetensors").write_bytes(b"weights" * 100)
        write_manifest(root / name, hash_files(root / name, ["model.safetensors"]))
    (root / "step_00000009" / "model.safetensors").write_bytes(b"weights")  # truncated after its save
    (root / "latest").write_text("step_00000009\n")
    assert find_resume_tag(cfg, "latest") == "step_00000006"  # not the damaged 9, not a save in progress
    (root / "step_00000006" / "manifest.json").unlink()  # a save killed before its manifest was written
    assert find_resume_tag(cfg, "latest") == "step_00000003"
    _prune(root, keep=1)
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["step_00000006", "step_00000006.old",
                                                                   "step_00000009", "step_00000012.tmp"]


def test_epoch_mode_trains_across_epochs_and_resumes_exactly(demo_shards, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    sets = {"optim.schedule": "constant", "data.resampled": "false", "data.num_samples": 96,
            "train.checkpoint_every": 4}  # 3 batches of 32 per epoch
    run(train_cmd(1, tiny_overrides(demo_shards, full, 8, **sets)))
    run(train_cmd(1, tiny_overrides(demo_shards, part, 4, **sets)))
    run(train_cmd(1, tiny_overrides(demo_shards, part, 8, **sets), resume=True))
    a = {m["step"]: m["loss"] for m in metrics(full)}
    b = {m["step"]: m["loss"] for m in metrics(part)}
    for step in range(5, 9):  # step 4 ends mid-epoch 2; the resumed run skips what epoch 2 already gave
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-7), (step, a, b)


COMPILED = {"deepspeed.zero_stage": 0, "train.micro_batch": 16}  # GradCache: a no-grad and a grad graph


@pytest.fixture(scope="module")
def eager_losses(demo_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("eager") / "run"
    run(train_cmd(1, tiny_overrides(demo_shards, out, 3, **COMPILED)))
    return [m["loss"] for m in metrics(out) if "loss" in m]


@pytest.mark.parametrize("mode", ["step"])
def test_compiled_training_gives_the_eager_losses(demo_shards, tmp_path, eager_losses, mode):
    """inductor's kernels sum in other orders than eager's: the losses agree to float32 rounding, not bit for bit.
    `step` (the whole forward in one graph) here; `model` runs the same towers' forwards compiled one by one,
    checked with aot_eager in tests/unit/test_compile.py (each inductor build here costs ~45 s of the suite)."""
    cache = tmp_path / "inductor"  # cold, so what inductor builds for this run lands here
    proc = run(train_cmd(1, tiny_overrides(demo_shards, tmp_path / "run", 3, **COMPILED, **{"train.compile": mode})),
               env={"TORCHINDUCTOR_CACHE_DIR": str(cache)})
    assert "torch.compile is off" not in proc.stderr and any(cache.rglob("*.py")), proc.stderr[-2000:]
    losses = [m["loss"] for m in metrics(tmp_path / "run") if "loss" in m]
    assert losses == pytest.approx(eager_losses, rel=1e-4) and len(losses) == 3, (losses, eager_losses)
