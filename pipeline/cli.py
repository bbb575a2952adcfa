"""`mmclip` command line: one subcommand per stage of the pipeline.

Heavy imports (torch, deepspeed) happen inside each subcommand so `--help` stays instant.
Every UserError prints as one line, `mmclip: error: ...`, and exits with status 2.
"""
from __future__ import annotations

import argparse
import sys

from pipeline.errors import UserError


def _add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set optim.lr=1e-4 (repeatable)")


def _cmd_shards(sub) -> None:
    p = sub.add_parser("shards", help="write WebDataset shards from a manifest or a class-folder tree",
                       description="Write WebDataset shards (img2dataset-style layout, or CLIP_benchmark's "
                       "local wds/ layout for eval sets) from a CSV/TSV/JSONL/Parquet manifest with columns "
                       "image, text, audio, label, neg_text, key (any subset; paths relative to the manifest) "
                       "or from a folder with one sub-folder per class. Resumable: finished shards are kept.")
    from pipeline.data.writer import add_shards_args

    add_shards_args(p)
    p.set_defaults(run="pipeline.data.writer:run_shards")


def _cmd_train(sub) -> None:
    p = sub.add_parser("train", help="train a model from a YAML run config",
                       description="Train with DeepSpeed from a YAML run config. One process by default; the same "
                       "command under torchrun, the deepspeed launcher or srun runs one rank per process (rank "
                       "from the environment). Writes the resolved config, metrics.jsonl, TensorBoard events, "
                       "checkpoints and a loss plot into output_dir.")
    p.add_argument("config", help="YAML run config, e.g. configs/demo.yaml")
    _add_set(p)
    p.add_argument("--resume", metavar="latest|PATH", default=None,
                   help="continue from the latest checkpoint in output_dir (fresh start if none) or from PATH")
    p.set_defaults(run="pipeline.train.run:run_train")


def _cmd_eval(sub) -> None:
    p = sub.add_parser("eval", help="zero-shot classification / retrieval of a run, checkpoint or export",
                       description="Zero-shot evaluation. --dataset is CLIP_benchmark's local wds/ layout or the "
                       "project's own shards. Prints a table and writes JSON with CLIP_benchmark metric names.")
    from pipeline.eval.run import add_eval_args

    add_eval_args(p)
    p.set_defaults(run="pipeline.eval.run:run_eval")


def _cmd_export(sub) -> None:
    p = sub.add_parser("export", help="export a trained model to open_clip's local-dir format or safetensors",
                       description="Export image+text towers to open_clip's local-dir format (loadable with "
                       "open_clip.create_model_and_transforms('local-dir:DIR')), or the whole multimodal model as "
                       "safetensors + config that mmclip reloads. Towers open_clip cannot express are written "
                       "beside it, and the command says so.")
    from pipeline.export.run import add_export_args

    add_export_args(p)
    p.set_defaults(run="pipeline.export.run:run_export")


def _cmd_submit(sub) -> None:
    p = sub.add_parser("submit", help="render a Slurm job from the config's slurm section and sbatch it",
                       description="Render the sbatch script for a run (train, or eval as a job array), write it "
                       "into the run directory and submit it. --dry-run prints it and submits nothing.")
    from pipeline.launch.slurm import add_submit_args

    add_submit_args(p)
    p.set_defaults(run="pipeline.launch.slurm:run_submit")


def _cmd_bench(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks: loss, data, train (tables + plots under docs/bench)",
                       description="Benchmarks that measure this implementation side by side with open_clip's "
                       "in one run and write markdown/JSON tables and PNG plots.")
    from pipeline.bench import add_bench_args

    add_bench_args(p)
    p.set_defaults(run="pipeline.bench:run_bench")


COMMANDS = (_cmd_shards, _cmd_train, _cmd_eval, _cmd_export, _cmd_submit, _cmd_bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmclip",
        description="Multimodal CLIP-style pretraining: WebDataset shards -> towers -> DeepSpeed with a "
        "chunked contrastive loss -> zero-shot eval -> open_clip export, on Slurm.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        try:
            add(sub)
        except ImportError as exc:  # a stage whose module is not built yet is simply not offered
            if not (exc.name or "").startswith("pipeline"):
                raise
    return parser


def _resolve(target: str):
    module, func = target.split(":")
    return getattr(__import__(module, fromlist=[func]), func)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(_resolve(args.run)(args) or 0)
    except UserError as exc:
        print(f"mmclip: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
