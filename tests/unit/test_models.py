"""Every tower kind builds from config with random init and encodes its modality to [B, embed_dim]."""
import pytest
import torch

from helpers.tiny_bert import tiny_bert
from pipeline.errors import UserError
from pipeline.models import build_model, build_tower
from pipeline.models.config import ModelConfig, TowerConfig
from pipeline.models.io import load_model, save_model
from pipeline.train.trainer import model_inputs

D = 16
TEXT = {"kind": "open_clip_text", "options": {"context_length": 8, "vocab_size": 100, "width": 32, "heads": 2,
                                              "layers": 1}}
AUDIO_WAVE = torch.randn(2, 8000)  # 0.5 s at 16 kHz


def _encode(modality, tower_cfg, x):
    tower = build_tower(modality, TowerConfig(**tower_cfg), D).eval()
    with torch.no_grad():
        out = tower(x)
    assert out.shape == (x.shape[0], D) and torch.isfinite(out).all()
    return tower


def test_open_clip_vision():
    tower = _encode("image", {"kind": "open_clip_vision",
                              "options": {"image_size": 16, "patch_size": 8, "width": 32, "layers": 1,
                                          "head_width": 16}}, torch.randn(2, 3, 16, 16))
    assert tower.preprocess.image_size == 16 and tower.export_cfg["patch_size"] == 8


def test_timm_image():
    tower = _encode("image", {"kind": "timm", "name": "resnet10t", "options": {"image_size": 32}},
                    torch.randn(2, 3, 32, 32))
    assert tower.export_cfg["timm_model_name"] == "resnet10t"


def test_open_clip_text():
    _encode("text", TEXT, torch.randint(1, 100, (2, 8)))


def test_hf_text_from_local_path(tmp_path):
    folder = _hf_text_folder(tmp_path)
    tower = _encode("text", {"kind": "hf_text", "name": folder, "options": {"context_length": 8}},
                    torch.randint(0, 10, (2, 8)))
    assert tower.export_cfg["hf_model_name"] == folder and tower.preprocess.hf_tokenizer == folder


def test_timm_audio():
    _encode("audio", {"kind": "timm_audio", "name": "resnet10t", "options": {"sample_rate": 16000, "n_mels": 32}},
            AUDIO_WAVE)


@pytest.mark.parametrize("options", [
    {"model_type": "audio-spectrogram-transformer", "hidden_size": 32, "num_hidden_layers": 1,
     "num_attention_heads": 2, "intermediate_size": 64, "num_mel_bins": 32, "max_length": 64, "n_mels": 32},
    {"model_type": "whisper", "d_model": 32, "encoder_layers": 1, "encoder_attention_heads": 2,
     "encoder_ffn_dim": 64, "max_source_positions": 32, "n_mels": 32},
], ids=["ast", "whisper"])
def test_hf_audio(options):
    _encode("audio", {"kind": "hf_audio", "options": {"sample_rate": 16000, **options}}, AUDIO_WAVE)


def test_tower_of_the_wrong_modality_is_refused():
    with pytest.raises(UserError, match="is a text tower, not image"):
        build_tower("image", TowerConfig(**TEXT), D)


def test_unknown_tower_option_is_named():
    with pytest.raises(UserError, match=r"unknown option\(s\) \['depth'\]"):
        build_tower("text", TowerConfig(kind="open_clip_text", options={"depth": 3}), D)


def test_presence_mask_uses_missing_embedding_and_save_load_round_trip(tmp_path):
    cfg = ModelConfig(embed_dim=D, towers={
        "image": {"kind": "open_clip_vision", "options": {"image_size": 16, "patch_size": 8, "width": 32,
                                                          "layers": 1, "head_width": 16}},
        "text": TEXT})
    model = build_model(cfg).eval()
    batch = {"image": torch.randn(3, 3, 16, 16), "text": torch.randint(1, 100, (3, 8)), "key": ["a", "b", "c"],
             "mask": {"image": torch.tensor([True, False, True]), "text": torch.ones(3, dtype=torch.bool)}}
    inputs = model_inputs(batch, model.modalities)  # what the trainer hands the model: no all-true mask
    assert set(inputs) == {"image", "text", "mask"} and set(inputs["mask"]) == {"image"}
    with torch.no_grad():
        out = model(inputs)
    missing = torch.nn.functional.normalize(model.missing["image"], dim=0)
    torch.testing.assert_close(out["image"][1], missing)
    assert not torch.allclose(out["image"][0], missing)
    torch.testing.assert_close(out["image"].norm(dim=-1), torch.ones(3))

    save_model(model.state_dict(), cfg, tmp_path)
    loaded, loaded_cfg = load_model(tmp_path)
    assert loaded_cfg == cfg
    with torch.no_grad():
        again = loaded(batch)  # the all-true text mask too: it changes nothing
    for key in ("image", "text", "logit_scale"):
        torch.testing.assert_close(again[key], out[key])


# ------------------------------------------------------------------ the contract of every tower kind
def _hf_text_folder(root):
    return str(tiny_bert(root, ["a", "photo", "of", "dog", "cat"]))


IMAGE = {"kind": "open_clip_vision", "options": {"image_size": 16, "patch_size": 8, "width": 32, "layers": 1,
                                                 "head_width": 16}}
# kind -> a tiny config of it (a function of a scratch folder, for kinds that read a local model)
TINY_TOWERS = {
    "open_clip_vision": lambda tmp: IMAGE,
    "timm": lambda tmp: {"kind": "timm", "name": "resnet10t", "options": {"image_size": 32}},
    "open_clip_text": lambda tmp: TEXT,
    "hf_text": lambda tmp: {"kind": "hf_text", "name": _hf_text_folder(tmp), "options": {"context_length": 8}},
    "timm_audio": lambda tmp: {"kind": "timm_audio", "name": "resnet10t",
                               "options": {"sample_rate": 16000, "n_mels": 32}},
    "hf_audio": lambda tmp: {"kind": "hf_audio", "options": {
        "sample_rate": 16000, "model_type": "audio-spectrogram-transformer", "hidden_size": 32,
        "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64, "num_mel_bins": 32,
        "max_length": 64, "n_mels": 32}},
}


def test_every_built_in_tower_kind_has_a_tiny_config():
    from pipeline.registry import TOWERS

    # plugins loaded by other tests in this process (tests/helpers/plugin_vector.py) register kinds of their own
    built_in = {n for n in TOWERS.names() if TOWERS.get(n, "").obj.__module__.startswith("pipeline.")}
    assert built_in <= set(TINY_TOWERS), "add the new tower kind's tiny config to TINY_TOWERS"


def _with(tower: dict, **options) -> dict:
    return {**tower, "options": {**tower["options"], **options}}


ODD_LAYERS = {"ls_init_value": 0.1, "act_kwargs": {"approximate": "tanh"}, "norm_kwargs": {"eps": 1e-3}}


@pytest.mark.parametrize("modality, make", [
    ("image", TINY_TOWERS["open_clip_vision"]),
    ("image", lambda tmp: _with(IMAGE, pool_type="avg", no_ln_pre=True, qk_norm=True, patch_dropout=0.5, **ODD_LAYERS)),
    ("image", lambda tmp: _with(IMAGE, attentional_pool=True, final_ln_after_pool=True)),
    ("image", lambda tmp: _with(IMAGE, block_type="custom", scale_attn=True, scale_fc=True)),
    ("image", lambda tmp: _with(IMAGE, layers=[1, 1, 1, 1], width=16, head_width=8, image_size=32)),  # ModifiedResNet
    ("image", TINY_TOWERS["timm"]),
    ("text", TINY_TOWERS["open_clip_text"]),
    ("text", lambda tmp: _with(TEXT, pool_type="last", proj_bias=True, embed_cls=True, **ODD_LAYERS)),
    ("text", lambda tmp: _with(TEXT, no_causal_mask=True, block_type="custom", scale_heads=True)),
    ("text", TINY_TOWERS["hf_text"]),
], ids=["vit", "vit-options", "vit-attn-pool", "vit-custom-block", "resnet", "timm", "text", "text-options",
        "text-custom-block", "hf-text"])
def test_towers_are_the_modules_open_clip_builds_from_the_same_config(modality, make, tmp_path):
    """Towers are built from open_clip's public classes (its builder is private): they must be the modules
    open_clip's public CustomTextCLIP builds from the same config, so the open_clip export stays a key rename."""
    import open_clip

    tower = build_tower(modality, TowerConfig(**make(tmp_path)), D).eval()
    cfg = {"image": IMAGE["options"], "text": TEXT["options"], modality: tower.export_cfg}
    theirs = open_clip.CustomTextCLIP(D, cfg["image"], cfg["text"]).eval()
    module = theirs.visual if modality == "image" else theirs.text
    assert repr(module) == repr(tower.encoder)
    module.load_state_dict(tower.encoder.state_dict())
    size = tower.preprocess.image_size if modality == "image" else None
    x = torch.randn(2, 3, size, size) if modality == "image" else torch.randint(1, 5, (2, 8))
    with torch.no_grad():
        assert torch.equal(module(x), tower(x))


@pytest.mark.parametrize("kind", sorted(TINY_TOWERS))
def test_tower_contract_shape_missing_embedding_round_trip_and_export(kind, tmp_path):
    from pipeline.export.open_clip import export_open_clip
    from pipeline.modalities.preprocess import preprocessors
    from pipeline.registry import TOWERS

    modality = TOWERS.get(kind, "").info["modality"]
    partner = ("text", TEXT) if modality != "text" else ("image", IMAGE)
    cfg = ModelConfig(embed_dim=D, towers={modality: TINY_TOWERS[kind](tmp_path), partner[0]: partner[1]})
    model = build_model(cfg).eval()
    batch = {}
    for m, pre in preprocessors(model.inputs(), None, train=False).items():
        batch[m] = torch.randint(1, 10, (3, *pre.shape)) if pre.dtype == torch.long else torch.randn(3, *pre.shape)
    batch["mask"] = {modality: torch.tensor([True, False, True])}
    with torch.no_grad():
        out = model(batch)
    assert out[modality].shape == (3, D) and torch.isfinite(out[modality]).all()
    torch.testing.assert_close(out[modality][1], torch.nn.functional.normalize(model.missing[modality], dim=0))

    save_model(model.state_dict(), cfg, tmp_path / "saved")
    loaded, _ = load_model(tmp_path / "saved")
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch)[modality], out[modality])
    if modality in ("image", "text"):  # open_clip expresses these kinds: the export must succeed
        assert (export_open_clip(model, cfg, tmp_path / "export") / "open_clip_model.safetensors").is_file()
    else:
        with pytest.raises(UserError, match="open_clip export needs"):
            export_open_clip(model, cfg, tmp_path / "export")


# ----------------------------------------------------------------------------- pretrained weights
def _save(tensors: dict, path):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return str(path)


def _tower(modality, tower_cfg, pretrained=None):
    return build_tower(modality, TowerConfig(**tower_cfg, pretrained=pretrained), D).eval()


def test_pretrained_from_an_open_clip_model_file_loads_both_towers(tmp_path, capsys):
    from pipeline.export.open_clip import open_clip_state_dict

    image = {"kind": "open_clip_vision", "options": {"image_size": 16, "patch_size": 8, "width": 32, "layers": 1,
                                                     "head_width": 16}}
    source = build_model(ModelConfig(embed_dim=D, towers={"image": image, "text": TEXT})).eval()
    path = _save(open_clip_state_dict(source), tmp_path / "open_clip_model.safetensors")
    x, t = torch.randn(2, 3, 16, 16), torch.randint(1, 100, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(_tower("image", image, path)(x), source.towers["image"](x))
        torch.testing.assert_close(_tower("text", TEXT, path)(t), source.towers["text"](t))
    assert "(prefix 'visual.')" in capsys.readouterr().out


def test_pretrained_from_an_mmclip_checkpoint_finds_the_tower_prefix(tmp_path):
    source = build_model(ModelConfig(embed_dim=D, towers={"image": {"kind": "timm", "name": "resnet10t",
                                                                    "options": {"image_size": 32}}, "text": TEXT}))
    path = _save(source.state_dict(), tmp_path / "model.safetensors")
    tower = _tower("text", TEXT, path)
    torch.testing.assert_close(tower.state_dict(), source.towers["text"].state_dict())


def test_pretrained_timm_checkpoint_loads_into_the_trunk_and_leaves_the_head(tmp_path, capsys):
    import timm

    timm_model = timm.create_model("resnet10t", num_classes=7)
    path = _save(timm_model.state_dict(), tmp_path / "resnet10t.safetensors")
    tower = _tower("image", {"kind": "timm", "name": "resnet10t", "options": {"image_size": 32}}, path)
    trunk = tower.encoder.trunk.state_dict()
    assert trunk.keys() < timm_model.state_dict().keys()
    for k, v in trunk.items():
        torch.testing.assert_close(v, timm_model.state_dict()[k])
    assert "its timm backbone" in capsys.readouterr().out


def test_pretrained_rgb_timm_stem_loads_into_the_spectrogram_cnn(tmp_path):
    import timm

    rgb = timm.create_model("resnet10t", num_classes=0)
    path = _save(rgb.state_dict(), tmp_path / "rgb.safetensors")
    tower = _tower("audio", {"kind": "timm_audio", "name": "resnet10t", "options": {"n_mels": 32}}, path)
    own = tower.encoder.backbone.state_dict()
    stem = next(k for k, v in own.items() if v.ndim == 4 and v.shape[1] == 1)
    assert rgb.state_dict()[stem].shape[1] == 3
    torch.testing.assert_close(own[stem], rgb.state_dict()[stem].sum(1, keepdim=True))
    for k, v in own.items():
        if k != stem:
            torch.testing.assert_close(v, rgb.state_dict()[k])


def test_pretrained_transformers_folder_with_a_task_prefix(tmp_path):
    from safetensors.torch import load_file

    mlm = load_file(tiny_bert(tmp_path, ["a", "photo", "of", "dog", "cat"], "BertForMaskedLM") / "model.safetensors")
    tower = _tower("text", {"kind": "hf_text", "name": str(tmp_path), "options": {"context_length": 8}},
                   str(tmp_path))
    for k, v in tower.encoder.transformer.state_dict().items():
        torch.testing.assert_close(v, mlm["bert." + k])


@pytest.mark.parametrize("content, message", [
    (None, "not found"),
    (b"not safetensors", "not a readable safetensors file"),
    ({"weight": torch.zeros(3)}, "does not hold this open_clip_text tower's weights"),
])
def test_pretrained_errors_name_the_key_and_file(tmp_path, content, message):
    path = tmp_path / "w.safetensors"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        _save(content, path)
    with pytest.raises(UserError, match=rf"model\.towers\.text\.pretrained: .*{message}"):
        _tower("text", TEXT, str(path))


def test_saved_model_does_not_need_the_pretrained_file_again(tmp_path):
    source = build_model(ModelConfig(embed_dim=D, towers={
        "image": {"kind": "timm", "name": "resnet10t", "options": {"image_size": 32}}, "text": TEXT}))
    init = _save(source.towers["text"].state_dict(), tmp_path / "text.safetensors")
    cfg = ModelConfig(embed_dim=D, towers={"image": {"kind": "timm", "name": "resnet10t",
                                                     "options": {"image_size": 32}},
                                           "text": {**TEXT, "pretrained": init}})
    save_model(build_model(cfg).state_dict(), cfg, tmp_path / "saved")
    (tmp_path / "text.safetensors").unlink()
    loaded, _ = load_model(tmp_path / "saved")
    torch.testing.assert_close(loaded.towers["text"].state_dict(), source.towers["text"].state_dict())
