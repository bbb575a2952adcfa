"""The realistic train bench's arithmetic: log parsing, the step split, FLOPs per sample, MFU and the lead column."""
import json

import pytest

from pipeline.bench.train import open_clip_rate_and_split
from pipeline.bench.train_realistic import (
    VARIANTS,
    mfu,
    mmclip_split,
    training_flops_per_sample,
    write_realistic_report,
)
from pipeline.config import load_config

OPEN_CLIP_LINE = ("2026-12-07,02:20:01 | INFO | Train Epoch: 0 [{n}/256 ({p}%)] Data (t): {d} Batch (t): {b}, "
                  "{r}/s, {r}/s/gpu LR: 0.000500 Logit Scale: 14.286 Contrastive_loss: 3.4 (3.4) Loss: 3.4 (3.4)")


def test_open_clip_log_gives_its_rate_and_data_wait_after_the_warm_up_lines():
    log = "\n".join(OPEN_CLIP_LINE.format(n=32 * i, p=i, d=d, b=b, r=r) for i, (d, b, r) in enumerate(
        [(5.0, 9.0, "3.55556"), (0.010, 2.010, "15.9204"), (0.030, 1.990, "16.0804")]))
    rate, split = open_clip_rate_and_split(log, skip=1)
    assert rate == pytest.approx((15.9204 + 16.0804) / 2)
    assert split == pytest.approx({"data": 20.0, "compute": 1980.0})
    with pytest.raises(RuntimeError, match="no throughput lines"):
        open_clip_rate_and_split("Traceback ...", skip=0)


def test_mmclip_split_averages_the_steady_state_phase_times(tmp_path):
    rows = [{"step": s, "loss": 1.0, **{f"time/{p}_ms": float(s * k) for k, p in enumerate(
        ("data", "forward", "loss", "backward", "optimizer", "other"), start=1)}} for s in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows + [{"step": 3, "acc1": 0.5}]))
    split = mmclip_split(tmp_path, skip=1)
    assert split == {"data": 2.5, "forward": 5.0, "loss": 7.5, "backward": 10.0, "optimizer": 12.5, "other": 15.0}


def test_flops_per_sample_count_every_gemm_and_the_cpu_attention_kernel():
    """Linear layers against 6 x weights x tokens would need every layer's shape; the attention kernel (which
    torch's counter has no CPU formula for) is checked exactly: 4 N^2 width per layer forward, 2.5x that backward."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.models import build_model

    cfg = load_config("configs/demo.yaml")
    ours = training_flops_per_sample(cfg, batch=2)
    assert training_flops_per_sample(cfg, batch=3) == pytest.approx(ours)
    model = build_model(cfg.model)
    inputs = {"image": torch.randint(0, 256, (2, 3, 28, 28), dtype=torch.uint8), "text": torch.randint(1, 400, (2, 24))}
    with FlopCounterMode(display=False) as plain:  # torch's own formulas only
        features = model(inputs)
        (features["image"].sum() + features["text"].sum()).backward()
    image_tokens, text_tokens, width, layers = (28 // 7) ** 2 + 1, 24, 96, 2
    attention = 3.5 * 4 * width * layers * (image_tokens ** 2 + text_tokens ** 2)
    assert ours - plain.get_total_flops() / 2 == pytest.approx(attention)


def report(tmp_path, rows):
    r = {"config": "c.yaml", "batch": 32, "steps": 8, "skip": 2, "workers": 1, "cpus": 2, "machine": "CPU X",
         "repeats": 2, "gemm_gflops": {"fp32": 200.0, "bf16": 400.0}, "train_gflops_per_sample": 10.0,
         "optimizer": {"tensors": 10, "parameters": 2e6, "clip_deepspeed_ms": 9.0, "clip_foreach_ms": 3.0,
                       "adamw_for_loop_ms": 20.0, "adamw_foreach_ms": 8.0, "adamw_fused_ms": 5.0}, "rows": rows}
    for row in rows:
        row["mfu"] = mfu(r, row["precision"], row["samples_per_s"])
    write_realistic_report(r, tmp_path)
    return (tmp_path / "train_realistic.md").read_text()


def test_report_divides_by_the_faster_open_clip_trainer_and_shows_mfu(tmp_path):
    split = {p: 10.0 for p in ("data", "forward", "loss", "backward", "optimizer", "other")}
    rows = []
    for name, speed in (("mmclip", 15.0), ("mmclip_step", 16.0), ("open_clip_train", 12.0),
                        ("open_clip_train_compile", 10.0)):
        v = VARIANTS[name]
        rows.append({"variant": name, "label": v.label, "trainer": v.trainer, "precision": "fp32",
                     "samples_per_s": speed, "runs": [speed, speed], "peak_rss_mib": 1000, "rss_runs": [1000, 1000],
                     "split_ms": split if v.trainer == "mmclip" else {"data": 5.0, "compute": 2000.0}})
    md = report(tmp_path, rows)
    assert "| fp32 | mmclip, compile step | 16.0 [16.0, 16.0] | 1.33x | 1000 | 10 / 10 / 10 / 10 / 10 / 10 | 80% |" in md
    assert "| fp32 | open_clip_train --torchcompile | 10.0 [10.0, 10.0] | 0.83x | 1000 | 5 data, 2000 rest | 50% |" in md
    assert "DeepSpeed's per-parameter loop (its ZeRO-0 path) 9.0 ms" in md and "fused (mmclip) 5.0 ms" in md
    assert (tmp_path / "train_realistic.png").is_file()
    assert json.loads((tmp_path / "train_realistic.json").read_text())["rows"][1]["mfu"] == pytest.approx(0.8)
