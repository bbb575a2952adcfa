"""`mmclip eval` and the in-training hook: encode an eval set, compute metrics, print a table."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.errors import UserError
from pipeline.eval.datasets import iter_batches, open_eval_set
from pipeline.eval.probe import probe_accuracy
from pipeline.eval.zeroshot import (
    SIMPLE_TEMPLATES,
    class_embeddings,
    classification_metrics,
    openai_templates,
    retrieval_metrics,
)

TASKS = ("zeroshot_classification", "zeroshot_retrieval", "symile_classification", "compositional_probe")


def add_eval_args(p) -> None:
    p.add_argument("--checkpoint", required=True,
                   help="run directory, checkpoint directory, safetensors / open_clip (local-dir:DIR) / transformers "
                        "export, or open_clip:ARCH@WEIGHTS.safetensors (see README 'Evaluate any model')")
    p.add_argument("--task", choices=TASKS, default="zeroshot_classification")
    p.add_argument("--dataset", required=True, help="CLIP_benchmark wds root (ROOT/test/*.tar) or a shard spec; for "
                   "compositional_probe the study set's probe folder (DIR/probe, `mmclip data study`)")
    p.add_argument("--modality", default="image",
                   help="the query modality, any registered one (for symile: image+audio -> text)")
    p.add_argument("--target", default="text",
                   help="retrieval candidates: text captions (default) or the paired clip of another modality, "
                        "e.g. --modality image --target audio on shards that hold both")
    p.add_argument("--templates", choices=["dataset", "openai", "simple"], default="dataset",
                   help="classification prompts: the dataset's file, OpenAI's 80, or the simple 7")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--output", help="write the metrics as JSON here")


def _templates(choice: str, eval_set) -> list[str]:
    if choice == "openai":
        return openai_templates()
    if choice == "simple" or not eval_set.templates:
        return SIMPLE_TEMPLATES
    return eval_set.templates


@torch.no_grad()
def evaluate(model, task: str, dataset: str, modality: str = "image", batch_size: int = 256,
             templates: str = "dataset", device="cpu", target: str = "text") -> dict:
    from pipeline.modalities.preprocess import preprocessors
    from pipeline.modalities.text import TextTokenizer

    if task == "compositional_probe":
        return probe_accuracy(model, dataset, batch_size)
    eval_set = open_eval_set(dataset, task)
    paired = task == "zeroshot_retrieval" and target != "text"
    if paired and target == modality:
        raise UserError(f"--modality and --target are both {modality}; pick two different modalities")
    queries = sorted(m for m in model.towers if m != "text")  # Symile scores every query modality jointly
    needed = queries if task == "symile_classification" else [modality] + ([target] if paired else [])
    missing = [m for m in needed + ["text"] if m not in model.towers]
    if missing:
        raise UserError(f"{task} on {dataset} needs a {missing[0]} tower; the model has {sorted(model.towers)}")
    preprocess = preprocessors(model.inputs(), None, train=False)
    tokenize = preprocess["text"] if isinstance(preprocess["text"], TextTokenizer) else None
    encode_text = lambda tokens: model.encode("text", tokens)
    feats = {m: [] for m in needed}
    labels, captions = [], []
    for batch in iter_batches(eval_set, needed, preprocess, batch_size):
        for m in needed:
            feats[m].append(model.encode(m, batch[m].to(device)).float().cpu())
        labels.append(batch["label"])
        captions.extend(batch["captions"])
    if not labels:
        raise UserError(f"{dataset}: no readable samples with {needed} (skipped: {eval_set.skipped})")
    feats = {m: torch.cat(v) for m, v in feats.items()}
    labels = torch.cat(labels)
    if paired:  # one clip of each modality per item: item i's only positive is its own partner
        metrics = retrieval_metrics(F.normalize(feats[modality], dim=-1), F.normalize(feats[target], dim=-1),
                                    torch.arange(len(labels)))
    elif task == "zeroshot_retrieval":
        assert tokenize is not None, "the text modality's preprocessor is not a TextTokenizer"
        texts = [c for caps in captions for c in caps]
        owner = torch.tensor([i for i, caps in enumerate(captions) for _ in caps])
        text_feats = torch.cat([model.encode("text", tokenize(texts[i:i + batch_size]).to(device)).float().cpu()
                                for i in range(0, len(texts), batch_size)])
        metrics = retrieval_metrics(F.normalize(feats[modality], dim=-1), F.normalize(text_feats, dim=-1), owner)
    else:
        assert tokenize is not None, "the text modality's preprocessor is not a TextTokenizer"
        assert eval_set.classnames is not None  # open_eval_set requires them for classification
        classifier = class_embeddings(encode_text, tokenize, eval_set.classnames, _templates(templates, eval_set),
                                      device).cpu()
        if task == "zeroshot_classification":
            metrics = classification_metrics(F.normalize(feats[modality], dim=-1), classifier, labels)
        else:  # Symile: multilinear score <image ⊙ audio ⊙ ..., text> next to the pairwise sum
            joint = classification_metrics(torch.stack([feats[m] for m in queries]).prod(0), classifier, labels)
            pairwise = classification_metrics(torch.stack([feats[m] for m in queries]).sum(0), classifier, labels)
            metrics = {**joint, **{f"pairwise_{k}": v for k, v in pairwise.items()}}
    metrics["samples"] = int(len(labels))
    if eval_set.skipped:
        metrics["skipped"] = dict(eval_set.skipped)
    return metrics


def evaluate_tasks(model, tasks, batch_size: int, device) -> dict[str, float]:
    """The trainer's hook: flat `name/metric` values for every configured task."""
    was_training = model.training
    model.eval()
    out = {}
    for t in tasks:
        name = t.name or Path(t.dataset).name
        for k, v in evaluate(model, t.task, t.dataset, t.modality, batch_size, device=device).items():
            if isinstance(v, (int, float)):
                out[f"{name}/{k}"] = v
    model.train(was_training)
    return out


def format_table(metrics: dict) -> str:
    rows = [(k, f"{v:.4f}" if isinstance(v, float) else str(v)) for k, v in metrics.items()]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def run_eval(args) -> int:
    from pipeline.eval.models import load_eval_model

    model = load_eval_model(args.checkpoint)
    metrics = evaluate(model, args.task, args.dataset, args.modality, args.batch_size, args.templates,
                       target=args.target)
    print(f"{args.task} on {args.dataset} ({args.modality} -> {args.target}), model {args.checkpoint}")
    print(format_table(metrics))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps({"task": args.task, "dataset": args.dataset, "metrics": metrics},
                                                indent=2))
    return 0
