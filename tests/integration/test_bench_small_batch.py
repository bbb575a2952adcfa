"""The small-batch loss bench runs end to end at a toy size and writes its table and JSON."""
import json

import pytest

from pipeline.bench.small_batch import IMPLS, run_small_batch_bench

pytestmark = pytest.mark.slow  # a benchmark, even at a toy size


def test_small_batch_bench_writes_every_row(tmp_path):
    run_small_batch_bench(batch=64, dim=8, out_dir=str(tmp_path), repeats=1, top_k=4, mixed=2, mix_with_anchor=1)
    rows = json.loads((tmp_path / "loss_small_batch.json").read_text())["rows"]
    assert set(rows) == set(IMPLS) and all(r["seconds"] > 0 for r in rows.values())
    # extra negatives only add to clip's denominators and siglip's negative pairs
    assert rows["mined_clip"]["loss"] > rows["clip"]["loss"]
    assert rows["mined_siglip"]["loss"] > rows["siglip"]["loss"]
    assert rows["top_k_sweep"]["loss"] > 0  # the sum of every anchor's top-k cosine similarities
    table = (tmp_path / "loss_small_batch.md").read_text()
    assert all(f"| {label} |" in table for label in IMPLS.values())
