"""README.md of a transformers export: what the model is, how to load it, what differs, how it scored."""
from __future__ import annotations

import json
from pathlib import Path

import yaml

CLIP_TOKENIZER = (
    "The tokenizer is open_clip's BPE vocabulary (vocab.json + merges.txt, padding id 0, truncation to the context "
    "length with the end token kept). transformers normalises text with NFC, whitespace folding and lower-casing; "
    "open_clip additionally runs `ftfy.fix_text` and HTML unescaping (`&amp;` -> `&`) and treats the literal "
    "strings `<start_of_text>` / `<end_of_text>` as its special tokens. Token ids are equal on every text those "
    "steps leave unchanged; for other text, clean it with ftfy + `html.unescape` first to get the training ids.")
IMAGE_PROCESSOR = (
    "`mmclip_image_processor.py` (custom code, hence `trust_remote_code=True`) is transformers' PIL-backend "
    "`CLIPImageProcessorPil` with one change: it centre-crops at torchvision's offset (round half to even, where "
    "transformers floors), as the eval transform the model was scored with does, so its pixels are the eval "
    "pixels at any input size. It runs on PIL whatever `backend=` says. A stock CLIP processor crops one pixel "
    "over whenever the resized side exceeds the crop by 3 (mod 4) pixels; without `trust_remote_code=True` "
    "transformers refuses to load this processor rather than substitute one. "
    "`pipeline(\"zero-shot-image-classification\", model=PATH, trust_remote_code=True)` uses it too.")
TEXT_MODEL_TOKENIZER = ("The text model's own transformers tokenizer, as in training (where runs of whitespace were "
                        "folded to one space first). Pad to the context length; the attention mask must mask padding.")


def run_dir_of(source: str | Path | None) -> Path | None:
    """The run directory above a run / checkpoint path (the one holding the run's config.yaml), if any."""
    if source is None:
        return None
    p = Path(source).resolve()
    return next((d for d in [p, *p.parents][:4] if (d / "config.yaml").is_file()), None)


def eval_results(run_dir: Path | None) -> dict[str, dict]:
    """Latest in-training eval values (metrics.jsonl `name/metric`) and `mmclip eval --output` JSONs in the run dir."""
    if run_dir is None:
        return {}
    results: dict[str, dict] = {}
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            record = json.loads(line)
            if "loss" in record:  # a training record; eval records hold only `name/metric` values
                continue
            for key, value in record.items():
                if "/" in key:
                    name, metric = key.split("/", 1)
                    results.setdefault(name, {"step": record["step"]})
                    if results[name]["step"] != record["step"]:  # a later eval of the same set replaces it
                        results[name] = {"step": record["step"]}
                    results[name][metric] = value
        results = {f"{name} (step {values.pop('step')})": values for name, values in results.items()}
    for path in sorted(run_dir.glob("**/*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and {"task", "dataset", "metrics"} <= set(record):
            results[f"{record['task']} on {Path(record['dataset']).name} ({path.relative_to(run_dir)})"] = record["metrics"]
    return results


def write_model_card(out: Path, title: str, model, model_cfg, target: str, logit_scale: float, source=None) -> Path:
    run_dir = run_dir_of(source)
    loss = None
    if run_dir is not None:
        loss = (yaml.safe_load((run_dir / "config.yaml").read_text()) or {}).get("loss", {}).get("kind")
    lines = [f"# {title}", "", f"Exported by mmclip from `{source}` as a transformers `{target}`.", "",
             "```python", f"from transformers import {target}, AutoProcessor",
             f"model = {target}.from_pretrained(PATH)",
             "processor = AutoProcessor.from_pretrained(PATH, trust_remote_code=True)  # see Image processor",
             "inputs = processor(text=texts, images=images, padding=\"max_length\", truncation=True, return_tensors=\"pt\")",
             "```", "", "## Config", "", f"- embed_dim: {model_cfg.embed_dim}",
             f"- logit_scale (log): {logit_scale:.6f}"]
    if loss:
        lines.append(f"- loss: {loss}")
    if model.logit_bias is not None:
        lines.append(f"- logit_bias: {model.logit_bias.item():.6f} (sigmoid loss; in config.json as `logit_bias`; "
                     f"pair probability = sigmoid(logit_scale.exp() * cosine + logit_bias))")
    for modality, tower in model_cfg.towers.items():
        lines.append(f"- {modality}: {tower.kind}{' ' + tower.name if tower.name else ''} {tower.options}")
    tokenizer = CLIP_TOKENIZER if target == "CLIPModel" else TEXT_MODEL_TOKENIZER
    lines += ["", "## Image processor", "", IMAGE_PROCESSOR, "", "## Tokenizer", "", tokenizer, "", "## Evaluation", ""]
    results = eval_results(run_dir)
    if not results:
        lines.append("No eval results were found in the run directory.")
    for label, values in results.items():
        lines += [f"### {label}", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in values.items()
                  if isinstance(v, (int, float))]
        lines.append("")
    path = out / "README.md"
    path.write_text("\n".join(lines) + "\n")
    return path
