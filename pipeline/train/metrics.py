"""Run-directory records: metrics.jsonl, events.jsonl, TensorBoard, and a loss-curve PNG."""
from __future__ import annotations

import json
import time
from pathlib import Path


class RunLog:
    """Rank 0 writes metrics; every rank may write events (start), so concurrent appends stay line-sized."""

    def __init__(self, output_dir: str, rank: int, world_size: int):
        self.dir = Path(output_dir)
        self.rank, self.world_size = rank, world_size
        self._tb = None
        if rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.dir / "tensorboard"))

    def event(self, event: str, step: int, **extra) -> None:
        record = {"event": event, "step": step, "rank": self.rank, "world_size": self.world_size,
                  "time": time.time(), **extra}
        with open(self.dir / "events.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def metrics(self, step: int, values: dict) -> None:
        if self.rank != 0:
            return
        assert self._tb is not None  # rank 0 made it
        with open(self.dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        for k, v in values.items():
            if isinstance(v, (int, float)):
                self._tb.add_scalar(k, v, step)
        self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(output_dir: str) -> list[dict]:
    path = Path(output_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def plot_loss(output_dir: str) -> Path | None:
    """loss.png from metrics.jsonl (a resumed run's records continue the same curve)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read_metrics(output_dir) if "loss" in r]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(output_dir) / "loss.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
