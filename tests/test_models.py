"""Every tower kind builds from config with random init and encodes its modality to [B, embed_dim]."""
import pytest
import torch

from pipeline.config import ModelConfig, TowerConfig
from pipeline.errors import UserError
from pipeline.models import build_model, build_tower
from pipeline.models.io import load_model, save_model

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
    from transformers import BertConfig, BertModel, BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "dog", "cat"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab))
    BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt")).save_pretrained(tmp_path)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(tmp_path)
    tower = _encode("text", {"kind": "hf_text", "name": str(tmp_path), "options": {"context_length": 8}},
                    torch.randint(0, len(vocab), (2, 8)))
    assert tower.export_cfg["hf_model_name"] == str(tmp_path) and tower.preprocess.hf_tokenizer == str(tmp_path)


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
    batch = {"image": torch.randn(3, 3, 16, 16), "text": torch.randint(1, 100, (3, 8)),
             "mask": {"image": torch.tensor([True, False, True])}}
    with torch.no_grad():
        out = model(batch)
    missing = torch.nn.functional.normalize(model.missing["image"], dim=0)
    torch.testing.assert_close(out["image"][1], missing)
    assert not torch.allclose(out["image"][0], missing)
    torch.testing.assert_close(out["image"].norm(dim=-1), torch.ones(3))

    save_model(model.state_dict(), cfg, tmp_path)
    loaded, loaded_cfg = load_model(tmp_path)
    assert loaded_cfg == cfg
    with torch.no_grad():
        again = loaded(batch)
    for key in ("image", "text", "logit_scale"):
        torch.testing.assert_close(again[key], out[key])
