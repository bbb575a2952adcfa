"""`mmclip export PATH --format open_clip|safetensors|hf --out DIR`."""
from __future__ import annotations

from pipeline.export.open_clip import export_open_clip
from pipeline.models.io import load_model, save_model


def add_export_args(p) -> None:
    p.add_argument("path", help="run directory, checkpoint directory or safetensors export")
    p.add_argument("--format", choices=["open_clip", "safetensors", "hf"], default="open_clip")
    p.add_argument("--out", required=True, help="output folder")


def run_export(args) -> int:
    model, model_cfg = load_model(args.path)
    if args.format == "open_clip":
        out = export_open_clip(model, model_cfg, args.out)
        print(f"open_clip export: {out.resolve()}  (open_clip.create_model_and_transforms('local-dir:{out.resolve()}'))")
    elif args.format == "hf":
        from pipeline.export.hf import export_hf

        export_hf(model, model_cfg, args.out, source=args.path)
    else:
        out = save_model(model.state_dict(), model_cfg, args.out)
        print(f"safetensors export: {out.resolve()}  (pipeline.models.io.load_model('{out}'))")
    return 0
