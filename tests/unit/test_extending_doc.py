"""docs/extending.md's loss example, run from the doc's own text: a copy of it honours every key all loss sections
share. (helpers/loss_contract.py also puts it through the whole contract suite: value and gradients, bf16,
GradCache, 2 and 3 ranks.)"""
import torch

from helpers.loss_contract import B, build, call, features, modalities_for
from pipeline.losses import build_loss, clip_loss, loss_config
from pipeline.losses.tiles import TileSpec


def test_the_example_is_registered_from_the_doc_text():
    loss = build("tempered_clip")
    assert type(loss).__module__ == "extending_loss_example" and loss.cfg.temper == 2.0


def test_chunk_size_and_distributed_reach_the_tiles(monkeypatch):
    seen = []
    resolve = TileSpec.resolve.__func__

    def recording(cls, device, chunk_size=None, compute_dtype="auto", distributed="auto", group=None):
        seen.append((chunk_size, compute_dtype, distributed))
        return resolve(cls, device, chunk_size, compute_dtype, distributed, group)

    monkeypatch.setattr(TileSpec, "resolve", classmethod(recording))
    loss = build_loss(loss_config("tempered_clip", chunk_size=7, compute_dtype="fp32", distributed="gather"))
    call(loss, features(modalities_for("tempered_clip")))
    assert seen and set(seen) == {(7, "fp32", "gather")}


def test_compute_dtype_fp32_on_bf16_features_is_the_fp32_path():
    f = features(("image", "text"), torch.bfloat16)
    scale = f["logit_scale"].float() / 2.0

    def example(compute_dtype):
        loss = build_loss(loss_config("tempered_clip", temper=2.0, compute_dtype=compute_dtype))
        return loss({**f, "logit_scale": f["logit_scale"].float()}, step=0, index=torch.arange(B))

    fp32 = clip_loss(f["image"], f["text"], scale, compute_dtype="fp32")
    assert torch.equal(example("fp32"), fp32)
    assert not torch.equal(example("auto"), fp32)  # bf16 GEMMs: the key made the difference
