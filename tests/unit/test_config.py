"""Configs: every shipped file validates; each kind of bad input is one line naming file, key and value."""

import pytest
import yaml

from helpers.paths import ROOT
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.errors import UserError

SHIPPED = sorted((ROOT / "configs").glob("*.yaml"))


def test_configs_are_shipped():
    names = {p.name for p in SHIPPED}
    assert {"demo.yaml", "demo_symile.yaml", "vit_b16_laion.yaml", "siglip_vit_b16.yaml",
            "symile_image_text_audio.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_config_loads_and_builds(path):
    from pipeline.models import build_model

    cfg = load_config(path)
    assert cfg.output_dir and cfg.optim.total_steps > 0
    if "demo" in path.name:  # GPU-sized configs are validated, demo ones also built
        model = build_model(cfg.model)
        assert set(model.modalities) == set(cfg.model.towers)


def _write(tmp_path, mutate):
    raw = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    mutate(raw)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _error(tmp_path, mutate, overrides=()):
    with pytest.raises(UserError) as info:
        load_config(_write(tmp_path, mutate), list(overrides))
    message = str(info.value)
    assert "\n" not in message
    assert "run.yaml" in message
    return message


def test_unknown_key(tmp_path):
    msg = _error(tmp_path, lambda r: r["optim"].update(learning_rate=1))
    assert "unknown key 'optim.learning_rate'" in msg


def test_bad_literal_names_key_value_and_allowed(tmp_path):
    msg = _error(tmp_path, lambda r: r["loss"].update(kind="triplet"))
    assert "loss.kind" in msg and "'triplet'" in msg and "'clip'" in msg and "'symile'" in msg


def test_bad_number(tmp_path):
    msg = _error(tmp_path, lambda r: r["optim"].update(lr=-1))
    assert "optim.lr" in msg and "-1" in msg and "greater than 0" in msg


def test_wrong_type(tmp_path):
    msg = _error(tmp_path, lambda r: r["data"].update(batch_size="many"))
    assert "data.batch_size" in msg and "'many'" in msg


def test_missing_required(tmp_path):
    msg = _error(tmp_path, lambda r: r["optim"].pop("total_steps"))
    assert "missing required key 'optim.total_steps'" in msg


def test_cross_field_rule(tmp_path):
    msg = _error(tmp_path, lambda r: r["loss"].update(kind="siglip"))
    assert "init_logit_bias" in msg


def test_bf16_without_zero_is_refused(tmp_path):
    msg = _error(tmp_path, lambda r: r["deepspeed"].update(precision="bf16", zero_stage=0))
    assert "deepspeed" in msg and "zero_stage >= 1" in msg


def test_compile_with_zero3_is_refused(tmp_path):
    msg = _error(tmp_path, lambda r: None, ["train.compile=step", "deepspeed.zero_stage=3"])
    assert "train.compile" in msg and "zero_stage <= 2" in msg
    assert load_config(_write(tmp_path, lambda r: None), ["train.compile=model", "deepspeed.zero_stage=2"])


def test_one_tower_is_not_enough(tmp_path):
    msg = _error(tmp_path, lambda r: r["model"]["towers"].pop("text"))
    assert "at least two towers" in msg


def test_set_overrides_any_key(tmp_path):
    path = _write(tmp_path, lambda r: None)
    cfg = load_config(path, ["optim.lr=1e-4", "deepspeed.zero_stage=3", "data.train_weights=null",
                             "model.towers.text.options.layers=1"])
    assert cfg.optim.lr == 1e-4 and cfg.deepspeed.zero_stage == 3
    assert cfg.model.towers["text"].options["layers"] == 1
    msg = _error(tmp_path, lambda r: None, ["deepspeed.zero_stage=5"])
    assert "deepspeed.zero_stage" in msg and "5" in msg


def test_bad_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(UserError, match=r"bad.yaml line \d+: not valid YAML"):
        load_config(bad)
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_cli_prints_one_line_without_traceback(tmp_path, capsys):
    path = _write(tmp_path, lambda r: r["loss"].update(kind="triplet"))
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mmclip: error:") and len(err.splitlines()) == 1 and "Traceback" not in err
