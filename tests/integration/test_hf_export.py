"""Exports load with their own library alone (a subprocess that never imports pipeline) and give the pipeline's
embeddings on real images and texts: `--format hf` (transformers) and `--format open_clip`. Options transformers
cannot express are refused; a transformers CLIPModel folder imports back into open_clip towers."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from helpers.hf import IMAGE, TEXT, TEXTS, bert, perturbed, save_pngs, unit
from pipeline.cli import main
from pipeline.errors import UserError
from pipeline.eval.datasets import iter_batches, open_eval_set
from pipeline.export.hf import export_hf
from pipeline.modalities.image import ImageTransform
from pipeline.modalities.text import TextTokenizer
from pipeline.models import build_model
from pipeline.models.config import ModelConfig
from pipeline.models.io import save_model

# configs/demo.yaml's towers, narrower: same image size, patch, context length and normalisation
# Run in a fresh interpreter: only transformers (+ safetensors / PIL) may be imported.
HF_SIDE = r"""
import json, sys
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
import transformers
export, inputs, out, cls = sys.argv[1:5]
x = load_file(inputs)
model = getattr(transformers, cls).from_pretrained(export).eval()
processor = transformers.AutoProcessor.from_pretrained(export, trust_remote_code=True)
texts = json.loads(open(inputs + ".texts.json").read())
images = [Image.open(p) for p in json.loads(open(inputs + ".images.json").read())]
ids = processor(text=texts, padding="max_length", truncation=True, return_tensors="pt")
with torch.no_grad():
    result = {"image": model.get_image_features(pixel_values=x["pixels"]).pooler_output,
              "text": model.get_text_features(input_ids=x["tokens"],
                                              attention_mask=x["mask"]).pooler_output,
              "input_ids": ids.input_ids, "attention_mask": ids.attention_mask,
              "pixel_values": processor(images=images, return_tensors="pt").pixel_values,
              "logit_scale": model.logit_scale.detach().reshape(1)}
save_file({k: v.contiguous() for k, v in result.items()}, out)
"""


def _run_alone(script: str, cwd, *args) -> None:
    """Run `script` in a fresh interpreter, offline, away from the worktree; it must not import pipeline."""
    check = '\nassert not any(m.split(".")[0] == "pipeline" for m in sys.modules), "imported pipeline"\n'
    proc = subprocess.run([sys.executable, "-c", script + check, *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HF_HOME": str(cwd / "hf_home")})
    assert proc.returncode == 0, proc.stderr[-3000:]


def _real_inputs(demo_shards, model, n=32):
    """Pixels of demo images through the pipeline's eval transform, and PIL images as files for the processor."""
    from pipeline.modalities.preprocess import preprocessors

    pre = preprocessors(model.inputs(), None, train=False)
    root = demo_shards / "demo" / "wds" / "fashion_mnist"
    batch = next(iter_batches(open_eval_set(str(root)), ["image"], pre, n))
    return batch["image"], pre["text"](TEXTS)


def _hf_side(tmp_path, export, pixels, tokens, pad_id, cls="CLIPModel", images=(), texts=TEXTS):
    inputs, out = tmp_path / "inputs.safetensors", tmp_path / "hf_out.safetensors"
    save_file({"pixels": pixels.contiguous(), "tokens": tokens.contiguous(),
               "mask": (tokens != pad_id).long().contiguous()}, str(inputs))
    (tmp_path / "inputs.safetensors.texts.json").write_text(json.dumps(texts))
    (tmp_path / "inputs.safetensors.images.json").write_text(json.dumps([str(p) for p in images]))
    _run_alone(HF_SIDE, tmp_path, export, inputs, out, cls)
    return load_file(str(out))


@pytest.mark.slow
def test_clip_export_loads_with_transformers_alone_and_gives_the_same_embeddings(demo_shards, tmp_path, capsys):
    cfg = ModelConfig(embed_dim=16, towers={"image": IMAGE, "text": TEXT})
    model = perturbed(cfg)
    save_model(model.state_dict(), cfg, tmp_path / "run")
    for _ in range(2):  # an earlier hf export in --out is replaced
        assert main(["export", str(tmp_path / "run"), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
        assert f"transformers CLIPModel: {tmp_path / 'hf'}" in capsys.readouterr().out
    assert main(["export", str(tmp_path / "run"), "--format", "open_clip", "--out", str(tmp_path / "hf")]) == 2
    assert "holds a hf export" in capsys.readouterr().err
    pixels, tokens = _real_inputs(demo_shards, model)
    # 31x28 resizes to 31 wide: a crop offset of 1.5, which torchvision rounds to 2 and stock transformers floors
    shapes = [None, None, (37, 45), (45, 37), (64, 64), (300, 201), (29, 30), (28, 100), (31, 28)]
    pngs = save_pngs(tmp_path, shapes)
    hf = _hf_side(tmp_path, tmp_path / "hf", pixels, tokens, pad_id=0, images=pngs)
    with torch.no_grad():
        assert (unit(hf["image"]) - model.encode_image(pixels)).abs().max() <= 1e-4
        assert (unit(hf["text"]) - model.encode_text(tokens)).abs().max() <= 1e-4
    assert torch.equal(hf["input_ids"], tokens)  # non-ASCII, emoji, whitespace, over-long (truncated)
    assert tokens[-1, -1] == 49407 and (tokens[:2, -1] == 0).all()  # truncated with its end token; padded with 0
    ours = torch.stack([ImageTransform(28, (0.5,) * 3, (0.5,) * 3, False)(Image.open(p)) for p in pngs])
    assert (hf["pixel_values"] - ours).abs().max() <= 1e-6
    assert hf["logit_scale"].item() == pytest.approx(model.logit_scale.item(), abs=1e-7)


# Served through transformers alone: the export's processor, transformers' zero-shot pipeline, and the stock
# CLIPImageProcessor (what a user gets by loading the processor class by name, without the export's code).
ZERO_SHOT_SIDE = r"""
import json, sys
import transformers
from PIL import Image
from safetensors.torch import save_file
export, out, paths, labels = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
images = [Image.open(p).convert("RGB") for p in paths]
classify = transformers.pipeline("zero-shot-image-classification", model=export, trust_remote_code=True)
ranked = classify(images, candidate_labels=labels, hypothesis_template="a photo of a {}.")
processor = transformers.AutoProcessor.from_pretrained(export, trust_remote_code=True)
stock = transformers.CLIPImageProcessor.from_pretrained(export)
save_file({"exported": processor(images=images, return_tensors="pt").pixel_values,
           "stock": stock(images=images, return_tensors="pt").pixel_values}, out)
open(out + ".json", "w").write(json.dumps([r[0]["label"] for r in ranked]))
"""
LABELS = ["circle", "square", "stripes", "sunset", "night sky", "forest", "t-shirt", "ankle boot"]


def _clip_art(path, width: int, height: int, seed: int) -> None:
    """A gradient with outlined ellipses and rectangles: edges a one-pixel crop shift shows, as in clip art."""
    from PIL import ImageDraw

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:height, :width]
    image = Image.fromarray(np.stack([x * 255 // width, y * 255 // height, (x + y) * 255 // (width + height)],
                                     -1).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        w, h = rng.integers(20, 200, 2)
        draw.ellipse([x0, y0, x0 + w, y0 + h], fill=tuple(rng.integers(0, 255, 3).tolist()), outline=(0, 0, 0), width=3)
        draw.rectangle([x0 - 50, y0 - 30, x0, y0], fill=tuple(rng.integers(0, 255, 3).tolist()))
    image.save(path, quality=90)


@pytest.mark.slow
@pytest.mark.parametrize("size, patch", [(28, 7), (224, 32)])
def test_exported_processor_gives_eval_pixels_and_top1_on_large_png_and_jpeg(tmp_path, size, patch):
    """Pixel differences are measured in [0, 1] units (normalised difference x std): the bound is then one 8-bit
    level on average whatever the model's std. 620x400 and 414x708 resize to a side that exceeds the crop by
    3 (mod 4) at 28 and 224 px, where a stock processor crops one pixel over; 640x420 and 480x800 do not."""
    from pipeline.eval.zeroshot import class_embeddings
    from pipeline.modalities.preprocess import preprocessors

    image = {**IMAGE, "options": {**IMAGE["options"], "image_size": size, "patch_size": patch}}
    cfg = ModelConfig(embed_dim=16, towers={"image": image, "text": TEXT})
    model = perturbed(cfg)
    save_model(model.state_dict(), cfg, tmp_path / "run")
    assert main(["export", str(tmp_path / "run"), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    paths = []
    for i, shape in enumerate([(640, 420), (480, 800), (620, 400), (414, 708)]):
        for suffix in ("png", "jpg"):
            paths.append(tmp_path / f"art{i}.{suffix}")
            _clip_art(paths[-1], *shape, seed=i)
    out = tmp_path / "served.safetensors"
    _run_alone(ZERO_SHOT_SIDE, tmp_path, tmp_path / "hf", out, json.dumps(list(map(str, paths))), json.dumps(LABELS))
    served, served_top1 = load_file(str(out)), json.loads((tmp_path / "served.safetensors.json").read_text())

    pre = preprocessors(model.inputs(), None, train=False)  # what `mmclip eval` feeds the model
    ours = torch.stack([pre["image"](Image.open(p)) for p in paths])
    std = torch.tensor(IMAGE["options"]["std"]).view(3, 1, 1)
    gap = {name: ((pixels - ours).abs() * std).mean((1, 2, 3)) for name, pixels in served.items()}
    assert gap["exported"].max() <= 1 / 255
    assert (gap["stock"][4:] > 1 / 255).all() and gap["stock"][:4].max() <= 1 / 255  # the shapes do what they say
    with torch.no_grad():
        classifier = class_embeddings(model.encode_text, pre["text"], LABELS, ["a photo of a {c}."], "cpu")
        top1 = (model.encode_image(ours) @ classifier.T).argmax(1)
    assert served_top1 == [LABELS[i] for i in top1]


OPEN_CLIP_SIDE = r"""
import json, sys
import open_clip, torch
from safetensors.torch import load_file, save_file
export, inputs, out = sys.argv[1:4]
model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{export}")
x = load_file(inputs)
with torch.no_grad():
    save_file({"image": model.eval().encode_image(x["pixels"]).contiguous(), "text": model.encode_text(x["tokens"]),
               "input_ids": open_clip.get_tokenizer(f"local-dir:{export}")(json.load(open(inputs + ".json")))},
              out)
"""


@pytest.mark.slow
def test_open_clip_export_loads_with_open_clip_alone(demo_shards, tmp_path):
    cfg = ModelConfig(embed_dim=16, towers={"image": IMAGE, "text": TEXT})
    model = perturbed(cfg)
    save_model(model.state_dict(), cfg, tmp_path / "run")
    assert main(["export", str(tmp_path / "run"), "--format", "open_clip", "--out", str(tmp_path / "oc")]) == 0
    pixels, tokens = _real_inputs(demo_shards, model, n=8)
    save_file({"pixels": pixels.contiguous(), "tokens": tokens.contiguous()}, str(tmp_path / "x.safetensors"))
    (tmp_path / "x.safetensors.json").write_text(json.dumps(TEXTS))
    _run_alone(OPEN_CLIP_SIDE, tmp_path, tmp_path / "oc", tmp_path / "x.safetensors", tmp_path / "y.safetensors")
    theirs = load_file(str(tmp_path / "y.safetensors"))
    with torch.no_grad():
        assert (unit(theirs["image"]) - model.encode_image(pixels)).abs().max() <= 1e-5
        assert (unit(theirs["text"]) - model.encode_text(tokens)).abs().max() <= 1e-5
    assert torch.equal(theirs["input_ids"], tokens)


def test_exported_processor_crops_where_torchvision_does():
    """torchvision rounds the crop offset half-to-even, stock transformers floors it: they differ when the resized
    side exceeds the crop by 3 (mod 4) pixels. The exported processor crops as torchvision does."""
    from transformers import CLIPImageProcessorPil

    from pipeline.export.mmclip_image_processor import MmclipImageProcessor

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (29, 30, 3), dtype=np.uint8))  # -> 224x231
    ours = ImageTransform(224, (0.5,) * 3, (0.5,) * 3, False)(image)
    options = dict(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, image_mean=[0.5] * 3,
                   image_std=[0.5] * 3)
    stock = CLIPImageProcessorPil(**options)(images=image, return_tensors="pt").pixel_values[0]
    assert (stock - ours).abs().max() > 0.1
    assert (stock[..., 1:] - ours[..., :-1]).abs().max() <= 1e-6  # the same pixels, one column apart
    exported = MmclipImageProcessor(**options)(images=image, return_tensors="pt").pixel_values[0]
    assert (exported - ours).abs().max() == 0


def test_tokenizer_differs_only_where_open_clip_cleans_more(tmp_path):
    from transformers import CLIPTokenizer

    from pipeline.export.hf import write_clip_tokenizer

    write_clip_tokenizer(tmp_path, 24)
    theirs = CLIPTokenizer.from_pretrained(str(tmp_path))
    ours = TextTokenizer(24)
    for text in TEXTS:
        ids = theirs(text, padding="max_length", truncation=True, return_tensors="pt").input_ids[0]
        assert torch.equal(ids, ours(text)), text
    for text in ["fish &amp; chips", "mojibake: cafÃ©"]:  # HTML entities and broken encodings: stated in the card
        ids = theirs(text, padding="max_length", truncation=True, return_tensors="pt").input_ids[0]
        assert not torch.equal(ids, ours(text)), text


def test_siglip_run_exports_as_clip_with_its_logit_bias(tmp_path):
    cfg = ModelConfig(embed_dim=16, towers={"image": IMAGE, "text": TEXT}, init_logit_bias=-10.0)
    run = tmp_path / "run"
    save_model(perturbed(cfg).state_dict(), cfg, run)
    (run / "config.yaml").write_text("loss: {kind: siglip}\n")
    records = [{"step": 5, "fashion_mnist/acc1": 0.25}, {"step": 9, "loss": 1.0, "skipped/corrupt": 2},
               {"step": 10, "fashion_mnist/acc1": 0.5}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run / "eval").mkdir()
    (run / "eval" / "retrieval.json").write_text(json.dumps({
        "task": "zeroshot_retrieval", "dataset": "/data/fashion_mnist_retrieval",
        "metrics": {"image_retrieval_recall@1": 0.125, "skipped": {"corrupt": 1}}}))
    said = []
    from pipeline.models.io import load_model

    model, model_cfg = load_model(run)
    out = export_hf(model, model_cfg, tmp_path / "hf", source=run, announce=said.append)
    bias = model.logit_bias.item()
    assert any("logit_bias" in s and "sigmoid" in s for s in said)
    from transformers import CLIPConfig

    assert CLIPConfig.from_pretrained(str(out)).logit_bias == pytest.approx(bias)
    card = (out / "README.md").read_text()
    assert f"logit_bias: {bias:.6f}" in card and "loss: siglip" in card
    assert "fashion_mnist (step 10)" in card and "| acc1 | 0.5000 |" in card  # the latest eval only
    assert "0.2500" not in card and "corrupt" not in card
    assert "zeroshot_retrieval on fashion_mnist_retrieval" in card and "| image_retrieval_recall@1 | 0.1250 |" in card
    assert "ftfy" in card and "html" in card.lower()
    assert "AutoProcessor.from_pretrained(PATH, trust_remote_code=True)" in card and "torchvision's offset" in card


def test_logit_scale_is_the_one_the_pipeline_scores_with(tmp_path):
    """Training clamps the scale at ln 100 in forward; the export writes what forward uses."""
    from transformers import CLIPModel

    cfg = ModelConfig(embed_dim=16, towers={"image": IMAGE, "text": TEXT}, init_logit_scale=5.0)
    model = build_model(cfg).eval()
    out = export_hf(model, cfg, tmp_path / "hf", announce=lambda _: None)
    batch = {"image": torch.randn(2, 3, 28, 28), "text": TextTokenizer(24)(TEXTS[:2])}
    with torch.no_grad():
        assert CLIPModel.from_pretrained(str(out)).logit_scale.exp().item() == pytest.approx(
            model(batch)["logit_scale"].item(), rel=1e-6)


@pytest.mark.parametrize("modality, options, named", [
    ("image", {"attentional_pool": True}, "attentional_pool"),
    ("image", {"no_ln_pre": True}, "no_ln_pre"),
    ("image", {"ls_init_value": 0.1}, "ls_init_value"),
    ("image", {"pool_type": "avg"}, "pool_type"),
    ("image", {"act_kwargs": {"approximate": "tanh"}}, "act_kwargs"),
    ("image", {"qk_norm": True}, "qk_norm"),
    ("text", {"pool_type": "last"}, "pool_type"),
    ("text", {"proj_bias": True}, "proj_bias"),
    ("text", {"no_causal_mask": True}, "no_causal_mask"),
    ("text", {"vocab_size": 1000}, "vocab_size"),
])
def test_options_transformers_cannot_express_are_refused_by_name(tmp_path, modality, options, named):
    towers = {"image": json.loads(json.dumps(IMAGE)), "text": json.loads(json.dumps(TEXT))}
    towers[modality]["options"].update(options)
    cfg = ModelConfig(embed_dim=16, towers=towers)
    with pytest.raises(UserError, match=rf"model\.towers\.{modality}\.options\.{named}="):
        export_hf(build_model(cfg), cfg, tmp_path / "hf", announce=lambda _: None)
    assert not (tmp_path / "hf").exists()  # refused before writing anything


def test_timm_image_tower_is_refused(tmp_path):
    cfg = ModelConfig(embed_dim=16, towers={"image": {"kind": "timm", "name": "resnet10t",
                                                      "options": {"image_size": 32}}, "text": TEXT})
    with pytest.raises(UserError, match=r"model\.towers\.image\.kind='timm'"):
        export_hf(build_model(cfg), cfg, tmp_path / "hf", announce=lambda _: None)


@pytest.mark.slow
def test_hf_text_tower_exports_as_dual_encoder_only_with_pooler_and_linear_projection(demo_shards, tmp_path):
    hf = bert(tmp_path)
    text = {"kind": "hf_text", "name": str(hf), "options": {"context_length": 12}}
    cfg = ModelConfig(embed_dim=16, towers={"image": IMAGE, "text": text})
    with pytest.raises(UserError, match=r"hf_pooler_type='mean_pooler'"):
        export_hf(build_model(cfg), cfg, tmp_path / "refused", announce=lambda _: None)
    text["options"].update(hf_pooler_type="cls_pooler", hf_proj_type="mlp")
    cfg = ModelConfig(embed_dim=16, towers={"image": IMAGE, "text": text})
    with pytest.raises(UserError, match=r"hf_proj_type='mlp'"):
        export_hf(build_model(cfg), cfg, tmp_path / "refused", announce=lambda _: None)
    text["options"]["hf_proj_type"] = "linear"
    cfg = ModelConfig(embed_dim=16, towers={"image": IMAGE, "text": text})
    model = perturbed(cfg)
    out = export_hf(model, cfg, tmp_path / "hf", announce=lambda _: None)
    pixels, tokens = _real_inputs(demo_shards, model, n=8)
    texts = ["a photo of a bag", "an ankle boot", "dress"]
    tokens = TextTokenizer(12, str(hf))(texts)
    hf_out = _hf_side(tmp_path, out, pixels, tokens, pad_id=0, cls="VisionTextDualEncoderModel", texts=texts)
    with torch.no_grad():
        assert (unit(hf_out["image"]) - model.encode_image(pixels)).abs().max() <= 1e-4
        assert (unit(hf_out["text"]) - model.encode_text(tokens)).abs().max() <= 1e-4
    assert torch.equal(hf_out["input_ids"], tokens)
    imported = build_model(ModelConfig(embed_dim=16, towers={"image": {**IMAGE, "pretrained": str(out)},
                                                             "text": {**text, "pretrained": str(out)}})).eval()
    with torch.no_grad():  # the vision half back into open_clip, the BERT half found under its prefix
        assert (imported.encode_image(pixels) - model.encode_image(pixels)).abs().max() <= 1e-6
        torch.testing.assert_close(imported.towers["text"].encoder.transformer.state_dict(),
                                   model.towers["text"].encoder.transformer.state_dict())


AUDIO_SIDE = r"""
import importlib, json, sys
import torch
from safetensors.torch import load_file, save_file
folder, inputs, out = sys.argv[1:4]
frontend = json.load(open(folder + "/frontend.json"))
module, cls = frontend["load"].removesuffix(".from_pretrained(this folder)").rsplit(".", 1)
backbone = getattr(importlib.import_module(module), cls).from_pretrained(folder).eval()
proj = load_file(folder + "/projection.safetensors")["weight"]
mel = load_file(inputs)["mel"]  # [B, n_mels, frames], computed as frontend.json says
x = mel.transpose(1, 2) if frontend["layout"].startswith("[B, frames") else mel
with torch.no_grad():
    result = backbone(x)
    pooled = result.pooler_output if getattr(result, "pooler_output", None) is not None \
        else result.last_hidden_state.mean(1)
    save_file({"audio": (pooled @ proj.T).contiguous()}, out)
"""


@pytest.mark.parametrize("options, frames", [
    ({"model_type": "audio-spectrogram-transformer", "hidden_size": 32, "num_hidden_layers": 1,
      "num_attention_heads": 2, "intermediate_size": 64, "num_mel_bins": 16, "max_length": 64, "n_mels": 16}, 64),
    ({"model_type": "whisper", "d_model": 32, "encoder_layers": 1, "encoder_attention_heads": 2,
      "encoder_ffn_dim": 64, "max_source_positions": 32, "n_mels": 16}, 64),
], ids=["ast", "whisper"])
@pytest.mark.slow
def test_audio_towers_go_beside_the_model_and_are_announced(tmp_path, options, frames):
    cfg = ModelConfig(embed_dim=16, towers={"image": IMAGE, "text": TEXT, "audio": {"kind": "hf_audio",
                                                                                  "options": options}})
    model = perturbed(cfg)
    said = []
    out = export_hf(model, cfg, tmp_path / "hf", announce=said.append)
    assert any(options["model_type"] in s and str(out / "audio") in s for s in said)
    wave = torch.randn(2, 16000)  # 1 s: 101 frames, cut to the model's `frames`
    with torch.no_grad():
        mel = model.towers["audio"].encoder.frontend(wave)[..., :frames]
        ours = model.encode("audio", wave, normalize=False)
    save_file({"mel": mel.contiguous()}, str(tmp_path / "mel.safetensors"))
    _run_alone(AUDIO_SIDE, tmp_path, out / "audio", tmp_path / "mel.safetensors", tmp_path / "a.safetensors")
    assert (load_file(str(tmp_path / "a.safetensors"))["audio"] - ours).abs().max() <= 1e-4


def test_timm_audio_tower_goes_beside_in_the_open_clip_export_layout(tmp_path):
    timm_audio = {"kind": "timm_audio", "name": "resnet10t", "options": {"n_mels": 16}}
    cfg = ModelConfig(embed_dim=16, towers={"image": IMAGE, "text": TEXT, "audio": timm_audio})
    said = []
    out = export_hf(build_model(cfg), cfg, tmp_path / "hf2", announce=said.append)
    assert any("timm_audio" in s for s in said) and (out / "extra_towers" / "audio" / "tower.safetensors").is_file()


def test_clip_export_imports_back_into_open_clip_towers(tmp_path, capsys):
    cfg = ModelConfig(embed_dim=16, towers={"image": IMAGE, "text": TEXT})
    model = perturbed(cfg)
    out = export_hf(model, cfg, tmp_path / "hf", announce=lambda _: None)
    again = ModelConfig(embed_dim=16, towers={"image": {**IMAGE, "pretrained": str(out)},
                                              "text": {**TEXT, "pretrained": str(out)}})
    fresh = build_model(again).eval()
    assert "prefix 'visual.'" in capsys.readouterr().out
    images, tokens = torch.randn(4, 3, 28, 28), TextTokenizer(24)(TEXTS)
    with torch.no_grad():
        assert (fresh.encode_image(images) - model.encode_image(images)).abs().max() <= 1e-6
        assert (fresh.encode_text(tokens) - model.encode_text(tokens)).abs().max() <= 1e-6
