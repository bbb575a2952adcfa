"""`mmclip data SET`: builders of ready-made shard sets (`study`: pipeline/data/study.py)."""
from __future__ import annotations

import argparse

from pipeline.data.study import __doc__ as STUDY_DOC
from pipeline.data.study import add_study_args, run_study


def add_data_args(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_set", required=True, metavar="SET")
    study = sub.add_parser("study", help="the study set: thousands of distinct captions, hard-negative probe",
                           description=STUDY_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_study_args(study)
    study.set_defaults(data_run=run_study)


def run_data(args: argparse.Namespace) -> int:
    return args.data_run(args)
