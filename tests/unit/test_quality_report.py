"""The quality studies' plan and report (pipeline/bench/quality.py): every study-set arm sees the same samples,
the learning rate follows the batch, and the table is mean ± std over seeds."""
import json
import math
import statistics

import pytest
import yaml

from helpers.paths import ROOT
from pipeline.bench import quality
from pipeline.config import load_config


def test_study_set_arms_see_the_same_samples_at_a_batch_scaled_learning_rate():
    cfg = load_config(ROOT / "configs/study.yaml")
    for study in ("small_batch", "small_batch_epochs", "hard_negatives", "tune_global_clip", "tune_hard_negatives"):
        for arm in quality.STUDIES[study]:
            o = arm.overrides
            assert o["data.batch_size"] == arm.batch and o["optim.total_steps"] * arm.batch == quality.SAMPLES
            lr = quality._scaled_lr(cfg, arm)["optim.lr"]
            assert lr == pytest.approx(cfg.optim.lr * math.sqrt(arm.batch / cfg.data.batch_size))
    gradcache = [a for a in quality.STUDIES["small_batch"] if "GradCache" in a.label]
    assert [a.overrides["train.micro_batch"] for a in gradcache] == [32]
    assert {a.trainer for a in quality.STUDIES["parity"]} == {"mmclip", "open_clip_train"}


def test_tuning_studies_look_at_the_val_split_only_and_include_the_setting_they_tune():
    """A tuning arm's in-training eval reads val/ and val_probe/ only (the studies score nothing else), and the
    arm each tunes is one of its settings, with the same overrides."""
    default_tasks = [t.dataset for t in load_config(ROOT / "configs/study.yaml").eval.tasks]
    for study, served, label in (("tune_global_clip", "small_batch", "global_clip, batch 32"),
                                 ("tune_hard_negatives", "hard_negatives", "+ 2 edited-caption negatives, HN-NCE β 0.5"),
                                 ("tune_hard_negatives", "hard_negatives", "+ 2 edited-caption negatives, HN-NCE β 2")):
        for arm in quality.STUDIES[study]:
            tasks = arm.overrides.get("eval.tasks")
            datasets = default_tasks if tasks is None else [t["dataset"] for t in yaml.safe_load(tasks)]
            assert datasets and all(d.startswith(("data/shards/study/val/", "data/shards/study/val_probe"))
                                    for d in datasets), (study, arm.label)
        tuned = next(a for a in quality.STUDIES[served] if a.label == label)
        same = [a for a in quality.STUDIES[study] if all(a.overrides.get(k) == v for k, v in tuned.overrides.items())]
        assert len(same) == 1, study


def test_summary_and_table_are_mean_and_std_over_seeds():
    values = {"a": [0.5, 0.6, 0.7], "b": [0.2, 0.2, 0.2]}
    report = {"study": "toy", "seeds": [0, 1, 2], "machine": "a CPU", "arms": [("a", "study set"), ("b", "demo")],
              "runs": [{"arm": arm, "dataset": data, "seed": seed, "seconds": 60,
                        "scores": {"concepts/acc1": values[arm][seed], "probe/probe_acc": 0.9}, "curve": []}
                       for arm, data in (("a", "study set"), ("b", "demo")) for seed in range(3)]}
    table = quality.summary(report)
    mean, std, runs = table[("a", "study set")]["zero-shot acc1"]
    assert (mean, runs) == (pytest.approx(0.6), [0.5, 0.6, 0.7]) and std == pytest.approx(statistics.stdev(runs))
    assert "image R@1" not in table[("a", "study set")]
    text = quality.markdown(report)
    assert "| study set | a | 0.600 ± 0.100 | 0.900 ± 0.000 |" in text and "| demo | b | 0.200 ± 0.000 |" in text
    assert "a CPU" in text and "minutes per seed (all arms): 2, 2, 2; runs per commit: not recorded 6." in text


def test_verdicts_answer_each_study_s_question_in_numbers():
    def table(rows: dict[str, dict[str, float]]) -> dict:
        return {(arm, "study set"): {c: (v, 0.01, [v]) for c, v in cols.items()} for arm, cols in rows.items()}

    small = table({"InfoNCE, batch 32": {"image R@1": 0.30, "text R@1": 0.28},
                   "InfoNCE, batch 128": {"image R@1": 0.44, "text R@1": 0.28},
                   "global_clip, batch 32": {"image R@1": 0.37, "text R@1": 0.30}})
    lines = quality.verdict("small_batch", small)
    assert lines[0] == ("- image R@1: global_clip, batch 32 recovers 50% of the gap between InfoNCE, batch 32 and "
                        "InfoNCE, batch 128 (+0.140)") and lines[1] == (
        "- text R@1: InfoNCE, batch 128 is not above InfoNCE, batch 32 (+0.000): no gap to recover")
    cut_short = {k: v for k, v in small.items() if k[0] != "global_clip, batch 32"}  # its run not trained yet
    assert quality.verdict("small_batch_epochs", cut_short) == []
    cols = {"zero-shot acc1": 0.02, "image R@1": 0.4, "text R@1": 0.4, "probe": 0.76}
    hard = table({"InfoNCE": cols, "+ negatives": {**cols, "probe": 0.82, "zero-shot acc1": 0.015}})
    assert quality.verdict("hard_negatives", hard) == [
        "- + negatives (vs InfoNCE, points): zero-shot acc1 -0.5, image R@1 +0.0, text R@1 +0.0, probe +6.0"]
    tune = table({"InfoNCE": {"val image R@1": 0.30, "val probe": 0.70},
                  "β 0.5": {"val image R@1": 0.32, "val probe": 0.75}, "β 1": {"val image R@1": 0.29, "val probe": 0.78}})
    assert quality.verdict("tune_hard_negatives", tune) == [
        "- β 0.5 (vs InfoNCE, val points): val image R@1 +2.0, val probe +5.0",
        "- β 1 (vs InfoNCE, val points): val image R@1 -1.0, val probe +8.0",
        "- best val image R@1: β 0.5", "- best val probe: β 1"]


def test_a_study_goes_on_where_its_report_stopped(tmp_path, capsys):
    arms = quality.STUDIES["hard_negatives"][:3]
    report = {"study": "hard_negatives", "samples": quality.SAMPLES, "machine": "a CPU",
              "arms": [(a.label, a.dataset.name) for a in arms], "runs": []}
    report["runs"] = [{"arm": a.label, "dataset": a.dataset.name, "seed": seed, "scores": {}, "curve": [],
                       "seconds": 60} for seed in (0, 1) for a in arms if (seed, a) != (1, arms[2])]
    path = tmp_path / "quality_hard_negatives.json"
    retired = {"arm": "an arm no longer in the study", "dataset": "study set", "seed": 0, "scores": {}, "curve": [],
               "seconds": 60}
    quality.write_report({**report, "runs": [*report["runs"], retired]}, tmp_path)
    kept = quality.kept_runs(path, report)
    assert len(kept) == 5 and "keeping its 5 runs" in capsys.readouterr().out
    todo = quality.pending(arms, [0, 1, 2], kept)  # seed 1's third arm was cut short; seed 2 is new
    assert [(seed, i) for seed, i, _ in todo] == [(1, 2), (2, 0), (2, 1), (2, 2)]
    assert quality.kept_runs(path, {**report, "machine": "another CPU"}) == []  # never mix machines
    assert quality.kept_runs(tmp_path / "none.json", report) == []
    assert json.loads(path.read_text())["seeds"] == [0, 1]
