"""Elastic resume: a run continues on another number of ranks (real DeepSpeed, real gloo processes).

Epoch mode over 2 -> 3 -> 1 ranks gives every sample of each epoch exactly once (the keys each rank
trained on are counted); ZeRO 0-3 states resumed on another number of ranks give the uninterrupted
run's loss curve; a resume that cannot be converted fails in one line naming why."""
import json
import tarfile
from collections import Counter
from pathlib import Path

import pytest

from helpers.runs import events, metrics, mmclip, one_line_error, run, tiny_overrides, train_cmd
from pipeline.data.sources import Seen, epoch_share

pytestmark = pytest.mark.slow  # starts training processes


def small_shards(demo_shards: Path, folder: Path, shards: int, per_shard: int) -> str:
    """The first `per_shard` samples of demo shards 0.. as `shards` tars with their sizes.json."""
    folder.mkdir(parents=True)
    sizes = {}
    for s in range(shards):
        name = f"part-{s:06d}.tar"
        with tarfile.open(demo_shards / f"demo/train/train-{s:06d}.tar") as src, \
                tarfile.open(folder / name, "w") as dst:
            keys = []
            for member in src:
                key = member.name.split(".")[0]
                if key not in keys:
                    keys.append(key)
                if len(keys) > per_shard:
                    break
                dst.addfile(member, src.extractfile(member))
        sizes[name] = per_shard
    (folder / "sizes.json").write_text(json.dumps(sizes))
    return str(folder / f"part-{{000000..{shards - 1:06d}}}.tar")


def keys_by_step(out: Path) -> dict[int, list[str]]:
    steps: dict[int, list[str]] = {}
    for f in sorted((out / "keys").glob("rank*.jsonl")):
        for line in f.read_text().splitlines():
            record = json.loads(line)
            steps.setdefault(record["step"], []).extend(record["keys"])
    return steps


def test_seen_ranges_count_and_contain_what_a_set_does():
    import random

    for trial in range(500):
        rng = random.Random(trial)
        indices = {rng.randrange(100) for _ in range(rng.randrange(60))}
        more = {rng.randrange(100) for _ in range(rng.randrange(30))}
        seen = Seen.of(indices).union(Seen.of(more))
        start, end = sorted(rng.randrange(110) for _ in range(2))
        assert seen.count(start, end) == len({i for i in indices | more if start <= i < end})
        assert [i for i in range(-2, 105) if i in seen] == sorted(indices | more) and len(seen) == len(indices | more)


def test_epoch_share_splits_the_unseen_samples_evenly_in_whole_batches():
    order, sizes = ["a", "b", "c"], {"a": 10, "b": 7, "c": 9}
    offsets = {"a": 0, "b": 10, "c": 17}
    seen = Seen.of([0, 1, 2, 11, 12, 20])  # 20 unseen left
    shares = [epoch_share(order, sizes, offsets, seen, rank, 3, worker, 2, 2) for rank in range(3) for worker in (0, 1)]
    counts = [sum(len(r) for r in share.values()) for share in shares]
    assert counts == [4, 2, 4, 3, 4, 3]  # ranks get 6, 7, 7; worker 0 takes batches 0 and 2, worker 1 the rest
    assert sum(counts) == 20


def test_epoch_mode_over_2_then_3_then_1_ranks_sees_every_sample_once_per_epoch(demo_shards, tmp_path):
    spec = small_shards(demo_shards, tmp_path / "shards", shards=4, per_shard=30)  # 120 samples: 10 batches of 12
    out = tmp_path / "run"

    def overrides(steps):
        return tiny_overrides(demo_shards, out, steps, **{
            "data.train": spec, "data.resampled": "false", "data.batch_size": 12, "train.log_keys": "true",
            "optim.schedule": "constant", "train.checkpoint_every": 100})

    run(train_cmd(2, overrides(4)))  # stops mid-epoch 0 with a shuffle buffer's worth of samples in flight
    moved = run(train_cmd(3, overrides(13), resume=True)).stdout  # crosses into epoch 1 on 3 ranks
    assert ("resumed step 4 from 2 ranks on 3 ranks: ZeRO-1 weights and optimizer converted through DeepSpeed's "
            "universal checkpoint; global batch 12 kept (6 -> 4 per rank, GradCache chunk 4); epoch 0 continues "
            "without its 48 samples already seen, split over 3 ranks") in moved
    shrunk = run(train_cmd(1, overrides(20), resume=True)).stdout
    assert "resumed step 13 from 3 ranks on 1 ranks" in shrunk and "epoch 1 continues without its 36 samples" in shrunk

    steps = keys_by_step(out)
    assert sorted(steps) == list(range(1, 21)) and all(len(keys) == 12 for keys in steps.values())
    every = {f"train_{s * 500 + i:06d}" for s in range(4) for i in range(30)}
    for epoch in (0, 1):
        counts = Counter(k for step in range(1 + 10 * epoch, 11 + 10 * epoch) for k in steps[step])
        assert set(counts) == every and set(counts.values()) == {1}, (epoch, counts.most_common(3))
    assert [e["from_world_size"] for e in events(out) if e["event"] == "resume" and e["rank"] == 0] == [2, 3]
    assert not (out / "universal").exists()  # the converted copy is dropped once loaded
    layout = json.loads((out / "checkpoints/step_00000020/layout.json").read_text())
    assert layout == {"world_size": 1, "zero_stage": 1, "precision": "fp32", "batch_size": 12, "resampled": False,
                      "seen_known": True}


def curve_overrides(demo_shards: Path, spec: str, out: Path, steps: int, stage: int) -> list[str]:
    return tiny_overrides(demo_shards, out, steps, **{
        "data.train": spec, "data.resampled": "false", "data.batch_size": 24, "deepspeed.zero_stage": stage,
        "optim.schedule": "constant", "optim.warmup_steps": 5, "train.checkpoint_every": 100})


@pytest.fixture(scope="module")
def uninterrupted(demo_shards, tmp_path_factory):
    """One 6-step run on 2 ranks at ZeRO 0: every stage's resumed curve must match it (in fp32 the stages
    differ only in how they partition and reduce, not in what they compute)."""
    root = tmp_path_factory.mktemp("uninterrupted")
    spec = small_shards(demo_shards, root / "shards", shards=2, per_shard=12)
    run(train_cmd(2, curve_overrides(demo_shards, spec, root / "full", 6, 0)))
    return spec, {m["step"]: m for m in metrics(root / "full")}


@pytest.mark.parametrize("stage, before, after", [(0, 2, 1), (1, 2, 3), (2, 2, 1), (3, 2, 3)])
def test_zero_states_resumed_on_other_ranks_give_the_uninterrupted_loss_curve(demo_shards, tmp_path, uninterrupted,
                                                                            stage, before, after):
    """Every step trains on the whole 24-sample epoch, and in epoch mode a sample's crop and caption follow
    from (seed, epoch, sample) alone, so both runs' batches hold the same samples whatever the ranks: only
    the weights, Adam's moments and the schedule (a 5-step warmup) carry the resumed run, and must arrive intact."""
    spec, a = uninterrupted
    part = tmp_path / "part"
    run(train_cmd(before, curve_overrides(demo_shards, spec, part, 3, stage)))
    moved = run(train_cmd(after, curve_overrides(demo_shards, spec, part, 6, stage), resume=True)).stdout
    assert f"resumed step 3 from {before} ranks on {after} ranks" in moved
    b = {m["step"]: m for m in metrics(part)}
    for step in (1, 2, 3):  # the stage itself computes what ZeRO 0 does
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-5), (step, a[step], b[step])
    for step in (4, 5, 6):
        assert b[step]["lr"] == pytest.approx(a[step]["lr"], rel=1e-9), step
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-5), (step, a[step], b[step])
    assert a[6]["loss"] < a[1]["loss"] - 0.05  # it trained: the curve being matched is not flat


def test_a_resume_that_cannot_be_converted_fails_in_one_line(demo_shards, tmp_path):
    out = tmp_path / "run"
    sets = {"data.batch_size": 12, "train.checkpoint_every": 100}
    run(train_cmd(2, tiny_overrides(demo_shards, out, 2, **sets)))
    line = one_line_error(mmclip(train_cmd(1, tiny_overrides(demo_shards, out, 4, **{**sets, "deepspeed.zero_stage": 2}),
                                           resume=True)))
    assert "step_00000002 was written on 2 ranks with deepspeed.zero_stage=1" in line
    assert "--set deepspeed.zero_stage=1" in line


def test_resampled_mode_resumed_on_other_ranks_draws_from_seed_and_step_alone(demo_shards, tmp_path):
    out = tmp_path / "run"
    sets = {"data.batch_size": 12, "train.log_keys": "true", "optim.schedule": "constant", "train.checkpoint_every": 100}
    run(train_cmd(2, tiny_overrides(demo_shards, out, 3, **sets)))
    moved = run(train_cmd(1, tiny_overrides(demo_shards, out, 5, **sets), resume=True)).stdout
    assert "resumed step 3 from 2 ranks on 1 ranks" in moved and "resampled data reseeded from (seed 0, step 3)" in moved
    earlier = out / "checkpoints" / "step_00000003"
    run(train_cmd(1, tiny_overrides(demo_shards, out, 5, **sets)) + ["--resume", str(earlier)])  # the same move again
    steps = keys_by_step(out)
    for step in (4, 5):  # both resumes on 1 rank drew the same samples and trained to the same loss
        assert steps[step][:12] == steps[step][12:], step
        assert len({m["loss"] for m in metrics(out) if m["step"] == step}) == 1
