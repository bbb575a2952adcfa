"""Zero-shot metrics, the open_clip export (same embeddings), and the judge: CLIP_benchmark on the export
gives the same numbers as `mmclip eval` on our model."""
import json
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score

from helpers.tiny_bert import tiny_bert
from pipeline.cli import main
from pipeline.eval.zeroshot import classification_metrics, retrieval_metrics
from pipeline.export.open_clip import export_open_clip
from pipeline.models import build_model
from pipeline.models.config import ModelConfig
from pipeline.models.io import load_model, save_model

TINY = {
    "image": {"kind": "open_clip_vision", "options": {"image_size": 28, "patch_size": 7, "width": 32, "layers": 1,
                                                      "head_width": 16, "mean": [0.5] * 3, "std": [0.5] * 3}},
    "text": {"kind": "open_clip_text", "options": {"context_length": 16, "width": 32, "heads": 2, "layers": 1}},
}


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    torch.manual_seed(0)
    cfg = ModelConfig(embed_dim=16, towers=TINY)
    folder = tmp_path_factory.mktemp("model")
    save_model(build_model(cfg).state_dict(), cfg, folder)
    return folder


def test_classification_metrics_match_sklearn():
    g = torch.Generator().manual_seed(0)
    feats, classifier = torch.randn(200, 8, generator=g), torch.randn(10, 8, generator=g)
    labels = torch.randint(0, 10, (200,), generator=g)
    m = classification_metrics(feats, classifier, labels)
    pred = (feats @ classifier.T).argmax(1)
    assert m["acc1"] == pytest.approx((pred == labels).float().mean().item())
    assert m["mean_per_class_recall"] == pytest.approx(balanced_accuracy_score(labels, pred))
    top5 = (feats @ classifier.T).topk(5, 1).indices
    assert m["acc5"] == pytest.approx((top5 == labels[:, None]).any(1).float().mean().item())


def test_retrieval_hit_if_any_caption_is_in_top_k():
    items = torch.eye(3)
    texts = torch.tensor([[1.0, 0, 0], [0, 0, 0.5], [0, 1.0, 0], [0, 0, 1.0]])  # item 1's 1st caption is off
    owner = torch.tensor([0, 1, 1, 2])
    m = retrieval_metrics(items, texts, owner, ks=(1,))
    assert m["image_retrieval_recall@1"] == pytest.approx(3 / 4)
    assert m["text_retrieval_recall@1"] == pytest.approx(1.0)  # each item has one caption ranked first


def test_multilinear_scoring_solves_xor_that_pairwise_cannot():
    sign = lambda b: 1.0 - 2.0 * b
    rows = [(i, a) for i in (0, 1) for a in (0, 1)]
    image = torch.tensor([[1.0, sign(i)] for i, _ in rows])
    audio = torch.tensor([[1.0, sign(a)] for _, a in rows])
    labels = torch.tensor([i ^ a for i, a in rows])
    classifier = torch.tensor([[0.0, 1.0], [0.0, -1.0]])
    assert classification_metrics(image * audio, classifier, labels)["acc1"] == 1.0
    assert classification_metrics(image + audio, classifier, labels)["acc1"] <= 0.5


def test_open_clip_export_gives_the_same_embeddings(saved_model, tmp_path):
    model, cfg = load_model(saved_model)
    out = export_open_clip(model, cfg, tmp_path / "export")
    oc, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    oc.eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    texts = ["a photo of a bag.", "an ankle boot"]
    tokens = tokenizer(texts)
    assert torch.equal(tokens, open_clip.tokenizer.SimpleTokenizer(context_length=16)(texts))
    images = torch.randn(5, 3, 28, 28)
    with torch.no_grad():
        assert (oc.encode_image(images, normalize=True) - model.encode_image(images)).abs().max() <= 1e-5
        assert (oc.encode_text(tokens, normalize=True) - model.encode_text(tokens)).abs().max() <= 1e-5
    assert preprocess.transforms[0].size == 28


def test_audio_tower_is_written_beside_and_announced(tmp_path):
    cfg = ModelConfig(embed_dim=16, towers={**TINY, "audio": {"kind": "timm_audio", "name": "resnet10t",
                                                              "options": {"n_mels": 16}}})
    said = []
    out = export_open_clip(build_model(cfg), cfg, tmp_path / "export", announce=said.append)
    assert "audio" in said[0] and (out / "extra_towers" / "audio" / "tower.safetensors").is_file()
    open_clip.create_model_and_transforms(f"local-dir:{out}")


def test_safetensors_export_round_trips(saved_model, tmp_path, capsys):
    assert main(["export", str(saved_model), "--format", "safetensors", "--out", str(tmp_path / "st")]) == 0
    a, _ = load_model(saved_model)
    b, _ = load_model(tmp_path / "st")
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


@pytest.mark.parametrize("task,name", [("zeroshot_classification", "fashion_mnist"),
                                       ("zeroshot_retrieval", "fashion_mnist_retrieval")])
@pytest.mark.slow
def test_clip_benchmark_judge_agrees_with_mmclip_eval(demo_shards, saved_model, tmp_path, task, name):
    root = demo_shards / "demo" / "wds" / name
    export = tmp_path / "export"
    assert main(["export", str(saved_model), "--out", str(export)]) == 0
    ours_file, theirs_file = tmp_path / "ours.json", tmp_path / "theirs.json"
    assert main(["eval", "--checkpoint", str(saved_model), "--task", task, "--dataset", str(root),
                 "--output", str(ours_file)]) == 0
    judge = Path(sys.executable).parent / "clip_benchmark"
    proc = subprocess.run([str(judge), "eval", "--model", f"local-dir:{export}", "--dataset", f"wds/{name}",
                           "--dataset_root", str(root), "--task", task, "--no_amp", "--num_workers", "0",
                           "--batch_size", "64", "--recall_k", "1", "5", "10", "--output", str(theirs_file)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ours = json.loads(ours_file.read_text())["metrics"]
    theirs = json.loads(theirs_file.read_text())["metrics"]
    keys = [k for k in theirs if k in ours]
    assert len(keys) == (3 if task == "zeroshot_classification" else 6)
    for k in keys:
        assert ours[k] == pytest.approx(theirs[k], abs=1e-4), k


def test_image_to_audio_retrieval_on_project_shards(demo_shards, tmp_path):
    cfg = ModelConfig(embed_dim=16, towers={**TINY, "audio": {"kind": "timm_audio", "name": "resnet10t",
                                                              "options": {"n_mels": 16}}})
    torch.manual_seed(0)
    save_model(build_model(cfg).state_dict(), cfg, tmp_path / "m")
    out = tmp_path / "r.json"
    shards = str(demo_shards / "demo" / "val" / "val-000000.tar")
    assert main(["eval", "--checkpoint", str(tmp_path / "m"), "--task", "zeroshot_retrieval", "--dataset", shards,
                 "--modality", "image", "--target", "audio", "--output", str(out)]) == 0
    metrics = json.loads(out.read_text())["metrics"]
    assert metrics["samples"] == 500
    assert 0 <= metrics["image_retrieval_recall@1"] <= metrics["image_retrieval_recall@10"] <= 1
    assert metrics["text_retrieval_recall@10"] > 0  # 10 of 500 candidates: a random model still hits sometimes


def test_hf_text_tower_exports_with_its_config_and_tokenizer(tmp_path):
    from pipeline.modalities.text import TextTokenizer

    hf = tiny_bert(tmp_path / "bert", ["a", "photo", "of", "bag", "dress"])
    cfg = ModelConfig(embed_dim=16, towers={"image": TINY["image"], "text": {"kind": "hf_text", "name": str(hf),
                                                                             "options": {"context_length": 8}}})
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    said = []
    out = export_open_clip(model, cfg, tmp_path / "export", announce=said.append)
    assert "transformers text tower" in said[0] and (out / "config.json").is_file()
    oc, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out}")
    oc.eval()
    tokens = open_clip.get_tokenizer(f"local-dir:{out}")(["a photo of a bag", "dress"])
    assert torch.equal(tokens, TextTokenizer(8, str(hf))(["a photo of a bag", "dress"]))
    with torch.no_grad():
        assert (oc.encode_text(tokens, normalize=True) - model.encode_text(tokens)).abs().max() <= 1e-5
