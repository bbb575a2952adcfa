"""`mmclip export PATH --format open_clip|hf|safetensors --out DIR`.

An export is written into a sibling temp folder and swapped in whole, so DIR is never half old, half
new. DIR must be empty, an earlier export of the same format (it is replaced), or `--force` given.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from pipeline.errors import UserError
from pipeline.export.open_clip import export_open_clip
from pipeline.models.io import load_model, save_model

MARKER = "mmclip_export.json"


def add_export_args(p) -> None:
    p.add_argument("path", help="run directory (its newest checkpoint that verifies), checkpoint directory or "
                                "safetensors export")
    p.add_argument("--format", choices=["open_clip", "hf", "safetensors"], default="open_clip",
                   help="hf: transformers CLIPModel / VisionTextDualEncoderModel + processor + model card")
    p.add_argument("--out", required=True, help="output folder: new, empty, or an earlier export of the same format")
    p.add_argument("--force", action="store_true", help="replace --out even if it holds other files")


def _previous_format(out: Path) -> str | None:
    try:
        return json.loads((out / MARKER).read_text())["format"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


@contextmanager
def staged_export(out: Path, fmt: str, force: bool):
    """Yield a temp folder beside `out`; on success it replaces `out` (the old one is removed only then)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        previous = _previous_format(out)
        if previous != fmt:
            what = f"a {previous} export" if previous else "other files"
            raise UserError(f"--out {out} holds {what}; choose an empty folder, or pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield stage
        (stage / MARKER).write_text(json.dumps({"format": fmt}))
        aside = out.parent / f".{out.name}.old"
        shutil.rmtree(aside, ignore_errors=True)
        if out.exists():
            out.rename(aside)
        stage.rename(out)
        shutil.rmtree(aside, ignore_errors=True)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def run_export(args) -> int:
    model, model_cfg = load_model(args.path)
    out = Path(args.out).resolve()
    with staged_export(out, args.format, args.force) as stage:
        if args.format == "open_clip":
            export_open_clip(model, model_cfg, stage, final_dir=out)
        elif args.format == "hf":
            from pipeline.export.hf import export_hf

            export_hf(model, model_cfg, stage, source=args.path, final_dir=out)
        else:
            save_model(model.state_dict(), model_cfg, stage)
    if args.format == "open_clip":
        print(f"open_clip export: {out}  (open_clip.create_model_and_transforms('local-dir:{out}'))")
    elif args.format == "safetensors":
        print(f"safetensors export: {out}  (pipeline.models.io.load_model('{out}'))")
    return 0
