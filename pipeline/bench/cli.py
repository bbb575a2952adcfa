"""`mmclip bench loss|data|train`: dispatch to the benchmark living beside what it measures.

Each benchmark runs this implementation and open_clip's side by side in one run and writes a
markdown table, JSON and (where it helps) a PNG under `--out` (default docs/bench).
"""
from __future__ import annotations

import argparse
import importlib.util
from typing import TYPE_CHECKING

from pipeline.errors import UserError

if TYPE_CHECKING:
    from pipeline.data.config import DataConfig

REALISTIC_CONFIG = "configs/bench_realistic.yaml"


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def add_bench_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="bench", required=True, metavar="WHAT")
    loss = sub.add_parser("loss", help="tiled losses vs open_clip ClipLoss/SigLipLoss and the symile package")
    loss.add_argument("--kind", choices=["clip", "siglip", "symile", "small_batch"], default="clip",
                      help="small_batch: global_clip and mined negatives against the plain tiled losses (first --batch)")
    loss.add_argument("--batch", type=_ints, default=[4096, 16384, 65536], help="comma-separated global batch sizes")
    loss.add_argument("--dim", type=int, default=512)
    loss.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                      help="bf16: the bf16 path beside the fp32 one and the reference under bf16 autocast")
    loss.add_argument("--repeats", type=int, default=3, help="interleaved runs per cell (median reported)")
    loss.add_argument("--threads", type=int, default=0, help="torch threads per run (0: torch's default)")
    loss.add_argument("--ranks", type=int, default=1,
                      help="W > 1: all-gather vs ring over W gloo processes at the (single) --batch as global batch")
    data = sub.add_parser("data", help="decode+transform+batch samples/s vs open_clip's webdataset loader")
    data.add_argument("--shards", default=None, help="shard spec (default: the demo train shards)")
    data.add_argument("--batch-size", type=int, default=None, help="default 256; realistic 64 (audio a quarter)")
    data.add_argument("--workers", type=_ints, default=[0, 1, 2], help="comma-separated worker counts to sweep")
    data.add_argument("--repeats", type=int, default=3, help="runs per cell (median reported)")
    data.add_argument("--batches", type=int, default=None, help="timed batches per run (default 40; realistic 10)")
    data.add_argument("--realistic", action="store_true",
                      help="photo-like 480-800 px JPEGs at 224 px and 10-s crops of 10-s vs 60-s 48 kHz stereo FLACs, "
                           "synthesised from data/ once into data/shards/realistic (pipeline.bench.realistic_data)")
    train = sub.add_parser("train", help="training samples/s and largest batch under a memory cap vs open_clip_train")
    train.add_argument("--config", default="configs/demo.yaml")
    train.add_argument("--batch", type=int, default=None, help="global batch (default 128; realistic 32)")
    train.add_argument("--steps", type=int, default=None, help="steps per run (default 30; realistic 8)")
    train.add_argument("--mem-cap-mib", type=int, default=3072)
    train.add_argument("--max-batch", type=int, default=65536)
    train.add_argument("--realistic", action="store_true",
                       help="configs/bench_realistic.yaml (ViT-Ti/16 shape, 224 px) on the realistic JPEGs, fp32 and "
                            "bf16, samples/s and peak RSS (uses --batch, default 32, and --steps, default 8)")
    train.add_argument("--repeats", type=int, default=None, help="runs per trainer (median reported; default 3, "
                       "realistic 5)")
    train.add_argument("--variants", type=lambda s: s.split(","), default=None,
                       help="realistic: comma-separated subset of mmclip,mmclip_model,mmclip_step,open_clip_train,"
                            "open_clip_train_compile (default all; _model/_step: train.compile, _compile: "
                            "open_clip_train --torchcompile)")
    train.add_argument("--precisions", type=lambda s: s.split(","), default=["fp32", "bf16"],
                       help="realistic: fp32,bf16 or one of them")
    quality = sub.add_parser("quality", help="mmclip vs open_clip_train, and what the loss options buy, scored by "
                             "CLIP_benchmark over seeds (pipeline.bench.quality)")
    quality.add_argument("--study", default="parity", choices=["parity", "small_batch", "small_batch_epochs",
                         "hard_negatives", "tune_global_clip", "tune_hard_negatives"], help="tune_*: choose the settings of "
                         "small_batch / hard_negatives on the val split only")
    quality.add_argument("--seeds", type=_ints, default=[0, 1, 2])
    quality.add_argument("--fresh", action="store_true", help="train every run again instead of keeping the "
                         "runs an earlier report of the same study in --out holds")
    for sp in (loss, data, train, quality):
        sp.add_argument("--out", default="docs/bench", help="where tables and plots go")


def tower_inputs(config: str) -> tuple[dict, DataConfig]:
    """(each tower's input description, the data section) of a run config, for the data bench."""
    from pipeline.config import load_config
    from pipeline.models import build_model

    cfg = load_config(config)
    return build_model(cfg.model).inputs(), cfg.data


def require_extra(module: str, purpose: str) -> None:
    """The packages a bench compares against are an optional extra: one line naming it when absent."""
    if importlib.util.find_spec(module) is None:
        raise UserError(f"{purpose} needs the {module!r} package, which mmclip's bench extra provides: "
                        f"pip install 'mmclip[bench]'")


def run_bench(args) -> int:
    if args.bench == "loss":
        require_extra("symile", "mmclip bench loss (symile.Symile is its Symile reference)")
        if args.kind == "small_batch":
            from pipeline.bench.small_batch import run_small_batch_bench

            run_small_batch_bench(args.batch[0], args.dim, args.out, args.repeats)
        elif args.ranks > 1:
            from pipeline.bench.ranks import run_ranks_bench

            run_ranks_bench(args.kind, args.batch[0], args.dim, args.ranks, args.out, args.dtype, args.repeats)
        else:
            from pipeline.bench.loss import run_loss_bench

            run_loss_bench(args.kind, args.batch, args.dim, args.out, dtype=args.dtype, repeats=args.repeats,
                           threads=args.threads)
    elif args.bench == "data" and args.realistic:
        from pipeline.bench.data import run_realistic_data_bench
        from pipeline.bench.realistic_data import build_realistic
        from pipeline.modalities.audio import AudioPreprocess

        summary = build_realistic(progress=False)
        towers, data = tower_inputs(REALISTIC_CONFIG)
        towers["audio"] = AudioPreprocess(data.modality("audio").sample_rate)
        batch = args.batch_size or 64
        run_realistic_data_bench(summary, (towers, data), batch, max(1, batch // 4), args.workers, args.batches or 10,
                                 args.out, args.repeats)
    elif args.bench == "data":
        from pipeline.bench.data import run_data_bench

        setups = {c: tower_inputs(c) for c in ("configs/demo.yaml", "configs/demo_symile.yaml")}
        run_data_bench(args.shards, args.batch_size or 256, args.workers, args.batches or 40, args.out, setups,
                       args.repeats)
    elif args.bench == "quality":
        from pipeline.bench.quality import run_quality_bench

        require_extra("clip_benchmark", "mmclip bench quality (CLIP_benchmark is its judge)")
        run_quality_bench(args.study, args.seeds, args.out, args.fresh)
    elif args.realistic:
        from pipeline.bench.realistic_data import build_realistic
        from pipeline.bench.train_realistic import VARIANTS, run_realistic_train_bench

        for flag, given, known in (("--variants", args.variants or (), VARIANTS), ("--precisions", args.precisions,
                                                                                  ("fp32", "bf16"))):
            if set(given) - set(known):
                raise UserError(f"{flag}: unknown {sorted(set(given) - set(known))}; choose from {','.join(known)}")
        build_realistic(progress=False)
        run_realistic_train_bench(REALISTIC_CONFIG, batch=args.batch or 32, steps=args.steps or 8, out_dir=args.out,
                                  repeats=args.repeats or 5, variants=tuple(args.variants or VARIANTS),
                                  precisions=tuple(args.precisions))
    else:
        from pipeline.bench.train import run_train_bench

        run_train_bench(args.config, batch=args.batch or 128, steps=args.steps or 30, mem_cap_mib=args.mem_cap_mib,
                        max_batch=args.max_batch, out_dir=args.out, repeats=args.repeats or 3)
    return 0
