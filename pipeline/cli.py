"""`mmclip` command line: one subcommand per stage of the pipeline.

The table below is the whole CLI: each stage's module provides its arguments and its run
function. Every UserError prints as one line, `mmclip: error: ...`, and exits with status 2.
"""
from __future__ import annotations

import argparse
import signal
import sys

from pipeline.errors import UserError
from pipeline.launch.env import REQUEUE_EXIT_CODE, exit_now

# name, one-line help, description, "module:add_args", "module:run"
COMMANDS = (
    ("shards", "write WebDataset shards from a manifest or a class-folder tree",
     "Write WebDataset shards (img2dataset-style layout, or CLIP_benchmark's local wds/ layout for eval "
     "sets) from a CSV/TSV/JSONL/Parquet manifest with columns image, text, audio, label, neg_text, key "
     "(any subset; paths relative to the manifest) or from a folder with one sub-folder per class. "
     "Resumable: finished shards are kept.",
     "pipeline.data.writer:add_shards_args", "pipeline.data.writer:run_shards"),
    ("data", "build a ready-made shard set offline (study: many distinct captions + a hard-negative probe)",
     "Build a ready-made set of shards and eval sets from sources installed on this machine. "
     "`mmclip data study --out DIR` writes the study set (see `mmclip data study --help`).",
     "pipeline.data.cli:add_data_args", "pipeline.data.cli:run_data"),
    ("train", "train a model from a YAML run config",
     "Train with DeepSpeed from a YAML run config. One process by default; the same command under "
     "torchrun, the deepspeed launcher or srun runs one rank per process (rank from the environment). "
     "Writes the resolved config, metrics.jsonl, TensorBoard events, checkpoints and a loss plot into "
     "output_dir.",
     "pipeline.train.run:add_train_args", "pipeline.train.run:run_train"),
    ("eval", "zero-shot classification / retrieval of a run, checkpoint, export or baseline model",
     "Zero-shot evaluation. --dataset is CLIP_benchmark's local wds/ layout or the project's own shards. "
     "Prints a table and writes JSON with CLIP_benchmark metric names.",
     "pipeline.eval.run:add_eval_args", "pipeline.eval.run:run_eval"),
    ("export", "export a trained model to open_clip's local-dir format, transformers or safetensors",
     "Export image+text towers to open_clip's local-dir format (loadable with "
     "open_clip.create_model_and_transforms('local-dir:DIR')), to transformers (--format hf: CLIPModel or "
     "VisionTextDualEncoderModel + processor + model card; options they cannot express are refused), or the "
     "whole multimodal model as safetensors + config that mmclip reloads. Towers open_clip cannot express are "
     "written beside it, and the command says so.",
     "pipeline.export.run:add_export_args", "pipeline.export.run:run_export"),
    ("submit", "render a Slurm job from the config's slurm section and sbatch it",
     "Render the sbatch script for a run (train, or eval as a job array), write it into the run "
     "directory and submit it. --dry-run prints it and submits nothing.",
     "pipeline.launch.slurm:add_submit_args", "pipeline.launch.slurm:run_submit"),
    ("bench", "benchmarks: loss, data, train (tables + plots under docs/bench)",
     "Benchmarks that measure this implementation side by side with open_clip's in one run and write "
     "markdown/JSON tables and PNG plots.",
     "pipeline.bench.cli:add_bench_args", "pipeline.bench.cli:run_bench"),
)


def _resolve(target: str):
    module, func = target.split(":")
    return getattr(__import__(module, fromlist=[func]), func)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmclip",
        description="Multimodal CLIP-style pretraining: WebDataset shards -> towers -> DeepSpeed with a "
        "chunked contrastive loss -> zero-shot eval -> open_clip export, on Slurm.",
    )
    # The deepspeed launcher puts --local_rank=N before the command; the rank is read from the environment
    # it sets as well (pipeline.launch.env), so the flag is accepted and otherwise unused.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_, description, add_args, run in COMMANDS:
        p = sub.add_parser(name, help=help_, description=description)
        _resolve(add_args)(p)
        p.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(_resolve(args.run)(args) or 0)
    except UserError as exc:
        print(f"mmclip: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # a second stop signal, or Ctrl-C outside training
        signum = getattr(exc, "signum", signal.SIGINT)
        print(f"mmclip: stopped by {signal.Signals(signum).name}; a run continues from its newest complete "
              f"checkpoint with --resume latest", file=sys.stderr)
        return 130 if signum == signal.SIGINT else REQUEUE_EXIT_CODE


def run_and_exit() -> None:
    """The `mmclip` and `python -m pipeline` entry point: main(), then pipeline.launch.env.exit_now (no
    interpreter teardown: ~2 s per process)."""
    exit_now(main())


if __name__ == "__main__":
    run_and_exit()
