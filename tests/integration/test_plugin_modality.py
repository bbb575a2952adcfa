"""A fourth modality added in one file (tests/helpers/plugin_vector.py) and loaded through `plugins:` trains with clip
and symile on 2 ranks, evaluates with retrieval against text, and exports to safetensors; no package edit."""
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers.paths import ROOT
from helpers.runs import metrics, run, tiny_overrides, train_cmd

pytestmark = pytest.mark.slow  # starts training processes

PLUGIN = str(ROOT / "tests" / "helpers" / "plugin_vector.py")
MMCLIP = [sys.executable, "-m", "pipeline"]
DIM = 16


def add_vectors(source: Path, out: Path, limit: int) -> int:
    """Copy `limit` samples of a demo shard, adding KEY.npy: the class's direction plus noise."""
    directions = np.random.default_rng(0).normal(size=(10, DIM))
    rng = np.random.default_rng(hash(out.name) % 2**32)
    keys = []
    with tarfile.open(source) as src, tarfile.open(out, "w") as dst:
        for member in src:
            key, ext = member.name.split(".", 1)
            if key not in keys:
                if len(keys) == limit:
                    break
                keys.append(key)
            payload = src.extractfile(member).read()
            dst.addfile(member, io.BytesIO(payload))
            if ext == "cls":
                buf = io.BytesIO()
                np.save(buf, (directions[int(payload)] + 0.3 * rng.normal(size=DIM)).astype(np.float32))
                info = tarfile.TarInfo(f"{key}.npy")
                info.size = len(buf.getvalue())
                dst.addfile(info, io.BytesIO(buf.getvalue()))
    return len(keys)


@pytest.fixture(scope="module")
def vector_shards(demo_shards, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vector")
    (root / "train").mkdir()
    (root / "eval").mkdir()
    sizes = {f"train-{i}.tar": add_vectors(demo_shards / f"demo/train/train-00000{i}.tar", root / f"train/train-{i}.tar",
                                           200) for i in range(2)}
    (root / "train/sizes.json").write_text(json.dumps(sizes))
    add_vectors(demo_shards / "demo/train/train-000005.tar", root / "eval/eval-0.tar", 100)
    (root / "eval/dataset_type.txt").write_text("retrieval")
    return root


def plugin_overrides(demo_shards, shards: Path, out: Path, steps: int, towers: dict, loss: str) -> list[str]:
    sets = {"plugins": f"[{PLUGIN}]", "data.train": str(shards / "train/train-{0..1}.tar"),
            "data.vector": "{noise: 0.05}", "model.towers": json.dumps(towers), "loss": f"{{kind: {loss}}}",
            "train.micro_batch": 8, "train.checkpoint_every": steps}
    return tiny_overrides(demo_shards, out, steps, **sets)


VECTOR = {"kind": "mlp_vector", "options": {"dim": DIM, "hidden": 32}}
TEXT = {"kind": "open_clip_text", "options": {"context_length": 16, "width": 32, "heads": 2, "layers": 1}}
IMAGE = {"kind": "open_clip_vision", "options": {"image_size": 28, "patch_size": 7, "width": 32, "layers": 1,
                                                 "head_width": 16}}


@pytest.mark.parametrize("loss, towers", [("clip", {"vector": VECTOR, "text": TEXT}),
                                          ("symile", {"vector": VECTOR, "text": TEXT, "image": IMAGE})])
def test_a_plugin_modality_trains_on_two_ranks(demo_shards, vector_shards, tmp_path, loss, towers):
    out = tmp_path / loss
    run(train_cmd(2, plugin_overrides(demo_shards, vector_shards, out, 12, towers, loss)))
    losses = [m["loss"] for m in metrics(out) if "loss" in m]
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    if loss == "symile":
        return
    evaluated = run([*MMCLIP, "eval", "--checkpoint", str(out), "--task", "zeroshot_retrieval", "--modality",
                     "vector", "--dataset", str(vector_shards / "eval/eval-0.tar"), "--output", str(tmp_path / "e.json")])
    result = json.loads((tmp_path / "e.json").read_text())["metrics"]
    assert result["samples"] == 100 and 0 <= result["text_retrieval_recall@5"] <= 1, evaluated.stdout
    run([*MMCLIP, "export", str(out), "--format", "safetensors", "--out", str(tmp_path / "export")])
    refused = subprocess.run([*MMCLIP, "export", str(out), "--out", str(tmp_path / "oc")], cwd=ROOT,
                             capture_output=True, text=True)
    assert refused.returncode == 2 and "mmclip: error:" in refused.stderr and "Traceback" not in refused.stderr

    from pipeline.models.io import load_model

    a, _ = load_model(out)
    b, _ = load_model(tmp_path / "export")
    x = torch.randn(5, DIM)
    assert torch.equal(a.encode("vector", x), b.encode("vector", x))
