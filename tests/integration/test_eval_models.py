"""`mmclip eval` reads every model kind a user has, and scores each export exactly like the run it came from,
and a transformers SiglipModel folder exactly like transformers does."""
import io
import json
import math
import tarfile

import pytest
import torch
from PIL import Image

from helpers.hf import IMAGE, TEXT, TEXTS, bert, perturbed, save_pngs, unit
from helpers.paths import ROOT
from pipeline.cli import main
from pipeline.errors import UserError
from pipeline.eval.datasets import iter_batches, open_eval_set
from pipeline.eval.models import load_eval_model
from pipeline.eval.zeroshot import class_embeddings
from pipeline.modalities.preprocess import preprocessors
from pipeline.models.config import ModelConfig
from pipeline.models.io import save_model

DEMO_CAPTIONS = ROOT / "data" / "fashion_mnist" / "train.jsonl"

# open_clip's default (OpenAI) mean/std, which an open_clip architecture with bare weights also uses
IMAGE_DEFAULT_NORM = {**IMAGE, "options": {k: v for k, v in IMAGE["options"].items() if k not in ("mean", "std")}}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """One run and every form it can be handed to eval in."""
    root = tmp_path_factory.mktemp("models")
    cfg = ModelConfig(embed_dim=16, towers={"image": IMAGE_DEFAULT_NORM, "text": TEXT})
    save_model(perturbed(cfg).state_dict(), cfg, root / "run")
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
    text = {"kind": "hf_text", "name": str(bert(tmp_path)),
            "options": {"context_length": 12, "hf_pooler_type": "cls_pooler", "hf_proj_type": "linear"}}
    cfg = ModelConfig(embed_dim=16, towers={"image": IMAGE_DEFAULT_NORM, "text": text})
    save_model(perturbed(cfg).state_dict(), cfg, tmp_path / "run")
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


def _siglip_tokenizer(root):
    """SigLIP's tokenizer class on a sentencepiece vocabulary learnt from the demo captions (no SigLIP vocabulary can
    be downloaded here); ids laid out like SigLIP's: `</s>` (1) ends and pads every prompt."""
    import sentencepiece as spm
    from transformers import SiglipTokenizer

    captions = [json.loads(line)["text"] for line in DEMO_CAPTIONS.read_text().splitlines()]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(captions), model_prefix=str(root / "spiece"), vocab_size=64,
                                   pad_id=0, eos_id=1, unk_id=2, bos_id=-1, num_threads=1, minloglevel=2)
    return SiglipTokenizer(vocab_file=str(root / "spiece.model"))  # SigLIP's 64 ids per text


@pytest.fixture(scope="module")
def siglip(tmp_path_factory):
    """A tiny random SiglipModel folder as transformers saves one: weights, config, SiglipProcessor (tokenizer and
    image processor). Weights get noise and SigLIP's initial scale and bias, so a dropped bias or a swap shows."""
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel, SiglipProcessor

    root = tmp_path_factory.mktemp("siglip")
    tokenizer = _siglip_tokenizer(root)
    tower = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    text = {**tower, "vocab_size": len(tokenizer), "max_position_embeddings": tokenizer.model_max_length,
            "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id, "bos_token_id": None}
    torch.manual_seed(0)
    model = SiglipModel(SiglipConfig(text_config=text, vision_config={**tower, "image_size": 32, "patch_size": 8}))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        model.logit_scale.fill_(math.log(10.0))
        model.logit_bias.fill_(-10.0)
    model.save_pretrained(root / "model")
    SiglipProcessor(SiglipImageProcessor(size={"height": 32, "width": 32}), tokenizer).save_pretrained(root / "model")
    return root / "model"


def _shard_images(dataset):
    """The eval set's images and labels in shard order, read with tarfile alone."""
    images, labels = [], []
    for i in range(int((dataset / "test" / "nshards.txt").read_text())):
        with tarfile.open(dataset / "test" / f"{i}.tar") as tar:
            for member in tar.getmembers():
                data = tar.extractfile(member).read()
                if member.name.endswith(".png"):
                    images.append(Image.open(io.BytesIO(data)))
                elif member.name.endswith(".cls"):
                    labels.append(int(data))
    return images, torch.tensor(labels)


@torch.no_grad()
def _transformers_zeroshot(folder, images, prompts):
    """Zero-shot SigLIP with transformers alone, as its docs score: the processor's pixels, prompts padded to
    max_length and no attention mask (the text tower pools the last position and was trained without one).
    -> unit image embeddings, class embeddings (templates averaged like CLIP_benchmark), scale.exp() * cos + bias,
    and the model's own pair logits for the first template of each class on the first 20 images."""
    from transformers import AutoProcessor, SiglipModel

    model, processor = SiglipModel.from_pretrained(folder).eval(), AutoProcessor.from_pretrained(folder, backend="pil")
    pixels = processor(images=images, return_tensors="pt").pixel_values
    ids = [processor(text=p, padding="max_length", return_tensors="pt").input_ids for p in prompts]
    image = unit(model.get_image_features(pixel_values=pixels).pooler_output)
    text = torch.stack([unit(unit(model.get_text_features(input_ids=i).pooler_output).mean(0)) for i in ids])
    pairs = model(input_ids=torch.stack([i[0] for i in ids]), pixel_values=pixels[:20]).logits_per_image
    return image, text, model.logit_scale.exp() * image @ text.T + model.logit_bias, pairs


def test_siglip_folder_preprocesses_like_its_processor(siglip, tmp_path):
    """Eval's image transform and tokenizer for the folder are its processor's, also on non-square images and
    texts that need truncating, accents or emoji."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(siglip, backend="pil")
    ours = preprocessors(load_eval_model(str(siglip)).inputs(), None, train=False)
    images = [Image.open(p) for p in save_pngs(tmp_path, [None, None, (37, 45), (45, 37), (28, 100)])]
    squashed = processor(images=images, return_tensors="pt").pixel_values  # resized to 32x32, never cropped
    assert (torch.stack([ours["image"](i) for i in images]) - squashed).abs().max() <= 1e-6
    ids = processor(text=TEXTS, padding="max_length", truncation=True, return_tensors="pt").input_ids
    assert torch.equal(ours["text"](TEXTS), ids)  # lower-cased, punctuation dropped, `</s>`-padded to 64
    assert ids[-1, -1] == 1 and (ids[:2, -1] == 1).all()  # truncated with its end token; padded with `</s>`


@pytest.mark.slow
def test_siglip_folder_scores_like_transformers(demo_shards, siglip, tmp_path):
    """`mmclip eval` on a SiglipModel folder: the embeddings, pair logits and class ranking of transformers alone,
    hence its acc1/acc5 (the bias shifts every class of an image alike, so rankings are the cosines')."""
    dataset = demo_shards / "demo" / "wds" / "fashion_mnist"
    eval_set = open_eval_set(str(dataset))
    prompts = [[t.replace("{c}", c) for t in eval_set.templates] for c in eval_set.classnames]
    images, labels = _shard_images(dataset)
    image, text, logits, pairs = _transformers_zeroshot(siglip, images, prompts)
    ours = load_eval_model(str(siglip))
    pre = preprocessors(ours.inputs(), None, train=False)
    batch = next(iter_batches(eval_set, ["image"], pre, len(images)))
    with torch.no_grad():
        ours_image = ours.encode("image", batch["image"])
        classifier = class_embeddings(lambda t: ours.encode("text", t), pre["text"], eval_set.classnames,
                                      eval_set.templates, "cpu")
        out = ours({"image": batch["image"][:20], "text": pre["text"]([p[0] for p in prompts])})
    assert torch.equal(batch["label"], labels)
    assert (ours_image - image).abs().max() <= 1e-4 and (classifier - text).abs().max() <= 1e-4
    assert (out["logit_scale"] * out["image"] @ out["text"].T + out["logit_bias"] - pairs).abs().max() <= 1e-4
    top5 = logits.topk(5).indices
    assert torch.equal((ours_image @ classifier.T).topk(5).indices, top5) and len(top5[:, 0].unique()) > 2
    metrics = _eval(str(siglip), "zeroshot_classification", dataset, tmp_path / "siglip.json")
    assert metrics["samples"] == len(labels)
    assert metrics["acc1"] == pytest.approx((top5[:, 0] == labels).float().mean().item(), abs=1e-6)
    assert metrics["acc5"] == pytest.approx((top5 == labels[:, None]).any(1).float().mean().item(), abs=1e-6)


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
