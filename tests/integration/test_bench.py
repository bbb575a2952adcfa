"""The benchmarks run end to end at toy sizes and write their table, JSON and plot (numbers live in docs/bench)."""
import io
import json

import pytest

from pipeline.cli import main

pytestmark = pytest.mark.slow  # benchmarks start processes


@pytest.mark.parametrize("kind", ["clip", "siglip", "symile"])
def test_loss_bench_agrees_with_the_reference_and_writes_its_report(kind, tmp_path):
    assert main(["bench", "loss", "--kind", kind, "--batch", "100", "--dim", "16", "--repeats", "1",
                 "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / f"loss_{kind}.json").read_text())
    for row in report["rows"]:
        ours, ref = row["mmclip"], row["reference"]
        assert ours["seconds"] > 0 and ref["seconds"] > 0
        if kind != "symile":  # Symile("n") draws its own random negatives, so only clip/siglip values must agree
            assert ours["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    assert (tmp_path / f"loss_{kind}.md").read_text().count("\n| 100 | ") == 1 and (tmp_path / f"loss_{kind}.png").is_file()



def test_bf16_loss_bench_reports_both_paths_the_amp_reference_and_their_precision(tmp_path):
    assert main(["bench", "loss", "--kind", "clip", "--batch", "64", "--dim", "16", "--dtype", "bf16", "--repeats",
                 "1", "--out", str(tmp_path)]) == 0
    row, = json.loads((tmp_path / "loss_clip_bf16.json").read_text())["rows"]
    assert len(row["mmclip"]["runs"]) == len(row["mmclip_fp32"]["runs"]) == len(row["reference"]["runs"]) == 1
    for key in ("mmclip", "reference"):  # both low-precision results against float64 of the same bf16 inputs
        assert row[key]["loss_rel_err"] < 1e-2 and row[key]["grad_cosine"] > 0.999
    assert row["mmclip_fp32"]["loss"] == pytest.approx(row["mmclip"]["loss"], rel=1e-2)
    assert "| 64 | mmclip bf16 |" in (tmp_path / "loss_clip_bf16.md").read_text()


def test_ranks_loss_bench_runs_gather_and_ring_over_gloo_processes(tmp_path):
    assert main(["bench", "loss", "--kind", "clip", "--batch", "64", "--dim", "16", "--ranks", "2", "--repeats", "1",
                 "--out", str(tmp_path)]) == 0
    modes = json.loads((tmp_path / "loss_clip_ranks2.json").read_text())["modes"]
    assert modes["ring"]["seconds"] > 0 and modes["ring"]["loss"] == pytest.approx(modes["gather"]["loss"], rel=1e-5)
    assert "| ring |" in (tmp_path / "loss_clip_ranks2.md").read_text()

def test_data_bench_sweeps_workers_and_writes_its_report(demo_shards, tmp_path):
    spec = str(demo_shards / "demo/train/train-{000000..000005}.tar")
    assert main(["bench", "data", "--shards", spec, "--batch-size", "32", "--workers", "0,1", "--batches", "2",
                 "--repeats", "1", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "data.json").read_text())
    cells = {(r["modalities"], r["loader"], r["workers"]) for r in report["rows"]}
    assert cells == {(m, impl, w) for m, impl in [("image+text", "mmclip"), ("image+text", "open_clip"),
                                                   ("audio+text", "mmclip")] for w in (0, 1)}
    assert all(r["samples_per_s"] > 0 for r in report["rows"])
    assert "| audio+text | 1 |" in (tmp_path / "data.md").read_text() and (tmp_path / "data.png").is_file()


@pytest.mark.slow  # ~15 s on an idle 2-core machine: two 60-s FLACs are synthesised and verified
def test_realistic_sets_are_built_once_and_their_bench_reports_both_audio_lengths(tmp_path):
    """Toy-size `bench data --realistic`: a few photo-like JPEGs and 10-s / 60-s 48 kHz stereo FLACs."""
    import soundfile
    import webdataset as wds

    from pipeline.bench.cli import REALISTIC_CONFIG, tower_inputs
    from pipeline.bench.data import run_realistic_data_bench
    from pipeline.bench.realistic_data import build_realistic
    from pipeline.modalities.audio import AudioPreprocess

    summary = build_realistic(tmp_path / "realistic", n_images=6, n_audio=2)
    stamp = (tmp_path / "realistic/summary.json").stat().st_mtime_ns
    assert build_realistic(tmp_path / "realistic", n_images=6, n_audio=2) == summary  # cached
    assert (tmp_path / "realistic/summary.json").stat().st_mtime_ns == stamp
    assert 40 < summary["mean_jpeg_kb"] < 160  # the recipe's 600 images average ~100 KB (docs/bench)
    sample = next(iter(wds.WebDataset(summary["audio60"], shardshuffle=False)))
    info = soundfile.info(io.BytesIO(sample["flac"]))
    assert (info.samplerate, info.channels, round(info.duration)) == (48000, 2, 60)

    towers, data = tower_inputs(REALISTIC_CONFIG)
    towers["audio"] = AudioPreprocess(data.modality("audio").sample_rate)
    report = run_realistic_data_bench(summary, (towers, data), 4, 2, [0], 1, str(tmp_path), repeats=1)
    cells = {(r["modalities"], r["loader"]) for r in report["rows"]}
    assert cells == {("image+text", "mmclip"), ("image+text", "open_clip"), ("audio+text, 10-s files", "mmclip"),
                     ("audio+text, 60-s files", "mmclip")}
    assert all(r["samples_per_s"] > 0 for r in report["rows"])
    md = (tmp_path / "data_realistic.md").read_text()
    assert "| audio+text, 60-s files | 0 |" in md and "0 worker(s) median" in md
