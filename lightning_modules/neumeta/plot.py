"""NeuMeta's accuracy-vs-width figure (``accuracy_vs_width.png`` and TensorBoard ``test/accuracy_vs_width``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_accuracy_vs_width(table: list[dict[str, Any]], pretrained: float, full_width: int,
                           train_widths: tuple[int, int], path: Path):
    """Accuracy against width for NeuMeta and the baselines, the training range shaded; saved to ``path``."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    widths = [r["width"] for r in table]
    axis.axvspan(train_widths[0], train_widths[1], color="0.92", label="training widths")
    for method, label, style in (("neumeta", "NeuMeta (EMA, K-merged)", "o-"), ("l1_prune", "L1 pruning, no fine-tune", "s--"),
                                 ("resample", "smoothed weights resampled", "^:")):
        points = [(r["width"], 100 * r[method]) for r in table if r[method] is not None]
        if points:
            axis.plot(*zip(*points), style, markersize=3, label=label)
    axis.plot([full_width], [100 * pretrained], "k*", markersize=10, label=f"pretrained (h = {full_width})")
    axis.set_xlabel("hidden width h")
    axis.set_ylabel("test accuracy (%)")
    axis.set_xlim(min(widths) - 1, max(widths) + 1)
    axis.grid(alpha=0.3)
    axis.legend(loc="lower right", fontsize=8)
    axis.set_title("NeuMeta: accuracy vs width")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return figure
