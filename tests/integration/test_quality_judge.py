"""The quality studies' judge (pipeline/bench/judge.py): a real open_clip_train run, put into an open_clip folder,
holds exactly open_clip_train's weights and scores the same under CLIP_benchmark as under `mmclip eval`."""
import json

import open_clip
import pytest
import torch

from helpers.paths import ROOT
from helpers.runs import run
from pipeline.bench.judge import EvalSet, clip_benchmark_scores, open_clip_train_dir
from pipeline.bench.train import open_clip_cmd, open_clip_model_config
from pipeline.config import load_config
from pipeline.eval.models import load_eval_model
from pipeline.eval.run import evaluate


@pytest.mark.slow
def test_an_open_clip_train_run_is_judged_like_an_mmclip_model(demo_shards, tmp_path):
    cfg = load_config(ROOT / "configs/demo.yaml")
    cfg.data.train = str(demo_shards / "demo/train/train-{000000..000005}.tar")
    cfg.model.towers["image"].options.update(width=32, layers=1, head_width=16)
    cfg.model.towers["text"].options.update(width=32, heads=2, layers=1)
    model_json = tmp_path / "tiny_quality.json"
    model_json.write_text(json.dumps(open_clip_model_config(cfg)))
    run(open_clip_cmd(cfg, model_json, tmp_path / "logs", 32, 4, 1, seed=3, warmup=2, save=True))
    [checkpoint] = (tmp_path / "logs").glob("*/checkpoints/epoch_1.pt")
    folder = open_clip_train_dir(checkpoint, cfg, tmp_path / "export")

    trained = torch.load(checkpoint, weights_only=True)["state_dict"]
    loaded = open_clip.create_model_and_transforms(f"local-dir:{folder}")[0].state_dict()
    assert set(loaded) == set(trained)
    assert all(torch.equal(loaded[k], trained[k]) for k in loaded)
    assert json.loads((folder / "open_clip_config.json").read_text())["preprocess_cfg"]["mean"] == [0.5] * 3

    sets = [EvalSet("concepts", "zeroshot_classification", demo_shards / "demo/wds/fashion_mnist"),
            EvalSet("retrieval", "zeroshot_retrieval", demo_shards / "demo/wds/fashion_mnist_retrieval")]
    judged = clip_benchmark_scores(folder, sets, tmp_path)
    model = load_eval_model(f"local-dir:{folder}")
    for s in sets:
        ours = evaluate(model, s.task, str(s.root))
        keys = [k for k in ours if f"{s.name}/{k}" in judged]
        assert len(keys) == (3 if s.task == "zeroshot_classification" else 6)
        for k in keys:
            assert judged[f"{s.name}/{k}"] == pytest.approx(ours[k], abs=1e-4), k
