"""Run metrics: every Trainer log line appended to ``OUTPUT/metrics.jsonl``, and a loss-curve PNG."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
# Second panel of the plot: the first of these a run logs (reward for RL, accuracy for reward models).
SECONDARY = ("reward", "eval_accuracy", "accuracy", "rewards/accuracies", "mean_token_accuracy")


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


class MetricsCallback(TrainerCallback):
    """Append each ``on_log`` record (with step and epoch) to ``metrics.jsonl``; plot at the end."""

    def __init__(self, output_dir: str | Path):
        self.output_dir = Path(output_dir)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, "epoch": _jsonable(state.epoch)}
        record.update({k: _jsonable(v) for k, v in logs.items()})
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with (self.output_dir / METRICS_FILE).open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            plot_metrics(self.output_dir)


def read_metrics(output_dir: str | Path) -> list[dict[str, Any]]:
    """All records of ``metrics.jsonl`` (empty when missing)."""
    path = Path(output_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def series(records: list[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    """(step, value) for ``key``, one value per step (the latest wins, e.g. after a resume)."""
    points: dict[int, float] = {}
    for r in records:
        value = r.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            points[int(r["step"])] = float(value)
    return sorted(points.items())


def plot_metrics(output_dir: str | Path) -> Path | None:
    """Draw loss (and eval loss, and reward/accuracy when logged) against step into ``loss.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(output_dir)
    loss, eval_loss = series(records, "loss"), series(records, "eval_loss")
    second = next(((k, series(records, k)) for k in SECONDARY if series(records, k)), None)
    if not loss and not eval_loss:
        return None
    panels = 2 if second else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), squeeze=False)
    ax = axes[0][0]
    if loss:
        ax.plot(*zip(*loss, strict=True), marker=".", label="train loss")
    if eval_loss:
        ax.plot(*zip(*eval_loss, strict=True), marker="o", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(Path(output_dir).name)
    ax.grid(alpha=0.3)
    ax.legend()
    if second:
        key, points = second
        axes[0][1].plot(*zip(*points, strict=True), marker=".", color="tab:green")
        axes[0][1].set_xlabel("step")
        axes[0][1].set_ylabel(key)
        axes[0][1].grid(alpha=0.3)
    fig.tight_layout()
    out = Path(output_dir) / PLOT_FILE
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
