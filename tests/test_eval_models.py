"""`mmclip eval` reads every model kind a user has, and scores each export exactly like the run it came from."""
import json

import pytest
import torch
from test_hf_export import IMAGE, TEXT, _bert, _perturbed

from pipeline.cli import main
from pipeline.config import ModelConfig
from pipeline.errors import UserError
from pipeline.eval.models import load_eval_model
from pipeline.models.io import save_model

# open_clip's default (OpenAI) mean/std, which an open_clip architecture with bare weights also uses
IMAGE_DEFAULT_NORM = {**IMAGE, "options": {k: v for k, v in IMAGE["options"].items() if k not in ("mean", "std")}}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """One run and every form it can be handed to eval in."""
    root = tmp_path_factory.mktemp("models")
    cfg = ModelConfig(embed_dim=16, towers={"image": IMAGE_DEFAULT_NORM, "text": TEXT})
    save_model(_perturbed(cfg).state_dict(), cfg, root / "run")
    for fmt in ("hf", "open_clip", "safetensors"):
        assert main(["export", str(root / "run"), "--format", fmt, "--out", str(root / fmt)]) == 0
    arch = root / "tiny-vit-mmclip.json"  # an open_clip model-config JSON, as in open_clip's model_configs/
    arch.write_text(json.dumps(json.loads((root / "open_clip" / "open_clip_config.json").read_text())["model_cfg"]))
    return {"run": str(root / "run"), "hf": str(root / "hf"), "open_clip": str(root / "open_clip"),
            "local-dir": f"local-dir:{root / 'open_clip'}", "safetensors": str(root / "safetensors"),
            "open_clip_arch": f"open_clip:{arch}@{root / 'open_clip' / 'open_clip_model.safetensors'}"}


def _eval(spec, task, dataset, out):
    assert main(["eval", "--checkpoint", spec, "--task", task, "--dataset", str(dataset), "--output", str(out)]) == 0
    return json.loads(out.read_text())["metrics"]


@pytest.mark.parametrize("kind, task", [
    ("hf", "zeroshot_classification"), ("hf", "zeroshot_retrieval"), ("open_clip", "zeroshot_classification"),
    ("local-dir", "zeroshot_retrieval"), ("safetensors", "zeroshot_classification"),
    ("open_clip_arch", "zeroshot_classification")])
@pytest.mark.slow
def test_every_model_kind_scores_like_the_run(demo_shards, exports, tmp_path, kind, task):
    name = "fashion_mnist" if task == "zeroshot_classification" else "fashion_mnist_retrieval"
    dataset = demo_shards / "demo" / "wds" / name
    ours = _eval(exports["run"], task, dataset, tmp_path / "run.json")
    theirs = _eval(exports[kind], task, dataset, tmp_path / "export.json")
    assert ours.keys() == theirs.keys() and ours["samples"] == theirs["samples"] > 0
    for k, v in ours.items():
        assert theirs[k] == pytest.approx(v, abs=1e-4), k


@pytest.mark.slow
def test_dual_encoder_export_scores_like_the_run(demo_shards, tmp_path):
    text = {"kind": "hf_text", "name": str(_bert(tmp_path)),
            "options": {"context_length": 12, "hf_pooler_type": "cls_pooler", "hf_proj_type": "linear"}}
    cfg = ModelConfig(embed_dim=16, towers={"image": IMAGE_DEFAULT_NORM, "text": text})
    save_model(_perturbed(cfg).state_dict(), cfg, tmp_path / "run")
    assert main(["export", str(tmp_path / "run"), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    dataset = demo_shards / "demo" / "wds" / "fashion_mnist"
    ours = _eval(str(tmp_path / "run"), "zeroshot_classification", dataset, tmp_path / "run.json")
    theirs = _eval(str(tmp_path / "hf"), "zeroshot_classification", dataset, tmp_path / "export.json")
    for k, v in ours.items():
        assert theirs[k] == pytest.approx(v, abs=1e-4), k


def test_adapters_encode_like_the_run(exports):
    run = load_eval_model(exports["run"])
    images, tokens = torch.randn(3, 3, 28, 28), torch.randint(1, 49406, (3, 24))
    tokens[:, 10] = 49407  # an end token, where CLIP pools
    for kind in ("hf", "open_clip", "open_clip_arch"):
        other = load_eval_model(exports[kind])
        assert other.towers["text"].preprocess.context_length == 24
        with torch.no_grad():
            assert (other.encode("image", images) - run.encode("image", images)).abs().max() <= 1e-4, kind
            assert (other.encode("text", tokens) - run.encode("text", tokens)).abs().max() <= 1e-4, kind


@pytest.mark.parametrize("spec, message", [
    ("open_clip:ViT-B-32@/nowhere/w.pt", "only safetensors weights"),
    ("open_clip:ViT-B-32", "expected open_clip:ARCH@"),
    ("open_clip:no-such-arch@/nowhere/w.safetensors", "not an open_clip architecture"),
    ("open_clip:ViT-B-32@/nowhere/w.safetensors", "not found"),
    ("local-dir:/nowhere", "no open_clip_config.json"),
])
def test_bad_model_specs_are_one_line_errors(spec, message):
    with pytest.raises(UserError, match=message):
        load_eval_model(spec)
