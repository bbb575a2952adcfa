"""The small-batch losses end to end: global_clip (u tables keyed by global sample index) and mined hard
negatives train on 1 and 2 ranks with GradCache, and a resumed run continues exactly."""
import pytest

from helpers.runs import metrics, run, tiny_overrides, train_cmd

pytestmark = pytest.mark.slow  # starts training processes

GLOBAL = "{kind: global_clip, gamma: 0.5, chunk_size: 8}"
MINED = "{kind: clip, chunk_size: 8, mined_negatives: {top_k: 4, mixed: 3, mix_with_anchor: 1, start_step: 1}}"


def losses(out):
    return {m["step"]: m["loss"] for m in metrics(out) if "loss" in m}


@pytest.mark.parametrize("loss", [GLOBAL, MINED], ids=["global_clip", "mined"])
def test_two_ranks_with_gradcache_resume_exactly(demo_shards, tmp_path, loss):
    sets = {"loss": loss, "train.micro_batch": 8, "optim.schedule": "constant", "train.checkpoint_every": 3}
    full, part = tmp_path / "full", tmp_path / "part"
    run(train_cmd(2, tiny_overrides(demo_shards, full, 6, **sets)))
    run(train_cmd(2, tiny_overrides(demo_shards, part, 3, **sets)))
    run(train_cmd(2, tiny_overrides(demo_shards, part, 6, **sets), resume=True))
    a, b = losses(full), losses(part)
    for step in (4, 5, 6):  # the resumed run restored the loss's per-rank state (u tables) and its RNG
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-7), (step, a, b)


@pytest.mark.parametrize("loss", [
    "{kind: global_clip, temperature: individual, temperature_lr: 0.01, gamma_schedule: cosine, "
    "gamma_decay_steps: 12, chunk_size: 8}",
    "{kind: siglip, chunk_size: 8, mined_negatives: {top_k: 4, mixed: 2}}",
], ids=["global_clip-individual", "siglip-mined"])
def test_one_rank_trains(demo_shards, tmp_path, loss):
    sets = {"loss": loss, "train.micro_batch": 8, **({"model.init_logit_bias": -10} if "siglip" in loss else {})}
    run(train_cmd(1, tiny_overrides(demo_shards, tmp_path / "run", 12, **sets)))
    values = list(losses(tmp_path / "run").values())
    assert len(values) == 12 and sum(values[-3:]) / 3 < sum(values[:3]) / 3, values
    if "individual" in loss:  # the saved model carries log(1 / mean τ) of the samples seen, for eval and export
        import math

        import torch
        from safetensors.torch import load_file

        folder = tmp_path / "run" / "checkpoints" / "step_00000012"
        state = torch.load(folder / "rank0_state.pt", weights_only=True)["loss"]["gcl"]
        tau, seen = state["tau"]["values"], ~torch.isnan(state["log_u"]["values"]).any(1)
        mean_tau = tau[seen].mean().item()
        assert mean_tau != pytest.approx(0.07)  # the temperatures moved
        scale = load_file(str(folder / "model.safetensors"))["logit_scale"].item()
        assert scale == pytest.approx(-math.log(mean_tau), rel=1e-5)


def test_global_clip_refuses_shards_without_counts(demo_shards, tmp_path):
    import shutil
    import subprocess
    import sys

    from helpers.paths import ROOT

    shards = tmp_path / "shards"
    shards.mkdir()
    shutil.copy(demo_shards / "demo/train/train-000000.tar", shards / "a.tar")  # no sizes.json, no _stats.json
    proc = subprocess.run([sys.executable, "-m", "pipeline", "train", str(ROOT / "configs/demo.yaml"),
                           *tiny_overrides(demo_shards, tmp_path / "run", 2, **{"loss": GLOBAL,
                                                                                 "data.train": str(shards / "a.tar")})],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "mmclip: error:" in proc.stderr and "sizes.json" in proc.stderr and "a.tar" in proc.stderr
