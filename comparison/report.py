"""Collect ``summary.json`` files into records, then write the CSV, the markdown table and the trade-off plots.

Accuracy is the mean ± sample std over a row's seeds; parameters, FLOPs and bytes come from the first run (they do
not depend on the seed, except MorphoNet's learned sparsity, where ``nonzero`` is averaged too).
"""

from __future__ import annotations

import csv
import json
import re
import statistics
from pathlib import Path
from typing import Any

METRIC_AXES = [  # (record key, axis label) of the trade-off panels
    ("params/trainable", "trainable parameters"),
    ("params/nonzero", "nonzero parameters (deployed)"),
    ("flops_per_sample", "FLOPs per sample (deployed)"),
    ("ort_ms/b256", "ONNX Runtime latency at batch 256 (ms)"),
]


def collect(root: Path, finished_only: bool = False) -> list[dict[str, Any]]:
    """One flat record per run under ``root``; the experiment is the directory above the run's directory."""
    records = []
    for path in sorted(root.rglob("summary.json")):
        summary = json.loads(path.read_text())
        if finished_only and not (summary.get("stage") == "test" and "test/acc" in summary["metrics"]):
            continue
        latency = summary.get("latency") or {}
        onnx = (summary.get("deploy") or {}).get("onnx") or {}
        ort = (onnx.get("latency") or {}).get("ms") or {}
        records.append({
            "experiment": path.parent.parent.relative_to(root).as_posix(),
            "run": path.parent.name,
            "technique": summary["technique"],
            "dataset": summary["dataset"],
            "seed": summary["seed"],
            **summary["metrics"],
            **{f"params/{k}": v for k, v in summary["params"].items()},
            "flops_per_sample": summary["flops_per_sample"],
            "model_bytes": summary["model_bytes"],
            "epochs": summary["epochs"],
            "train_seconds": summary.get("train_seconds"),
            "seconds_per_epoch": summary["seconds_per_epoch"],
            "latency_ms/b1": (latency.get("ms") or {}).get("1"),
            "latency_ms/b256": (latency.get("ms") or {}).get("256"),
            "latency_threads": latency.get("threads"),
            "ort_ms/b1": ort.get("1"),
            "ort_ms/b256": ort.get("256"),
            "onnx_max_abs_diff": onnx.get("max_abs_diff"),
        })
    return records


def _number(text: str) -> int | float | str | None:
    if text == "":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def read_csv(path: Path) -> list[dict[str, Any]]:
    """The records ``write_csv`` wrote (numbers as numbers, empty cells as None); none when there is no file."""
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        return [{k: v if k in ("experiment", "run", "technique", "dataset") else _number(v) for k, v in row.items()}
                for row in csv.DictReader(handle)]


def mean_std(values: list[float | None], scale: float = 1.0, digits: int = 2) -> str:
    values = [v * scale for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _compact(value: float | None, unit: str = "") -> str:
    """1234567 -> '1.23M' (exact values are in the CSV)."""
    if value is None:
        return "-"
    for factor, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g}{suffix}{unit}"
    return f"{value:.3g}{unit}" if isinstance(value, float) else f"{value}{unit}"


def _median(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _ms(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def group(records: list[dict], order: list[str] | None = None) -> dict[str, list[dict]]:
    """Records by experiment, in ``order`` (suite order) first, then alphabetically."""
    groups: dict[str, list[dict]] = {}
    for record in records:
        groups.setdefault(record["experiment"], []).append(record)
    rank = {name: i for i, name in enumerate(order or [])}
    return dict(sorted(groups.items(), key=lambda item: (rank.get(item[0], len(rank)), item[0])))


def markdown_table(records: list[dict], order: list[str] | None = None) -> str:
    """Per experiment: test accuracy, parameters, FLOPs, bytes, training time and latency (median over seeds)."""
    lines = [
        "| experiment | technique | seeds | test acc (%) | params total | trainable | nonzero | FLOPs/sample | bytes "
        "| s/epoch | latency b1 (ms) | latency b256 (ms) | ORT b1 (ms) | ORT b256 (ms) |",
        "|---|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for name, runs in group(records, order).items():
        first = runs[0]
        nonzero = statistics.mean(r["params/nonzero"] for r in runs)
        b1, b256 = _median([r["latency_ms/b1"] for r in runs]), _median([r["latency_ms/b256"] for r in runs])
        ort1, ort256 = _median([r.get("ort_ms/b1") for r in runs]), _median([r.get("ort_ms/b256") for r in runs])
        lines.append(
            f"| {name} | {first['technique']} | {len(runs)} | {mean_std([r.get('test/acc') for r in runs], 100)} "
            f"| {_compact(first['params/total'])} | {_compact(first['params/trainable'])} | {_compact(nonzero)} "
            f"| {_compact(first['flops_per_sample'])} | {_compact(first['model_bytes'], 'B')} "
            f"| {mean_std([r['seconds_per_epoch'] for r in runs], 1, 1)} "
            f"| {_ms(b1, 3)} | {_ms(b256, 2)} | {_ms(ort1, 3)} | {_ms(ort256, 2)} |"
        )
    return "\n".join(lines)


def write_csv(records: list[dict], path: Path) -> None:
    fields = list(dict.fromkeys(k for r in records for k in r))
    first = [f for f in ("experiment", "run", "technique", "dataset", "seed", "test/acc") if f in fields]
    fields = first + sorted(set(fields) - set(first))
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(records)


def tradeoff_figure(records: list[dict], title: str, order: list[str] | None = None):
    """Test accuracy (mean ± std over seeds) against trainable params, nonzero params and FLOPs, log x axes;
    one row of panels per dataset (accuracies of different datasets do not share an axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    groups = group(records, order)
    datasets = list(dict.fromkeys(runs[0]["dataset"] for runs in groups.values()))
    fig, axes = plt.subplots(len(datasets), len(METRIC_AXES), figsize=(5.0 * len(METRIC_AXES) + 3.2, 4.2 * len(datasets)),
                             sharey="row", squeeze=False)
    markers = "osD^vP*Xhp<>"
    for i, (name, runs) in enumerate(groups.items()):
        accs = [100 * r["test/acc"] for r in runs if r.get("test/acc") is not None]
        if not accs:
            continue
        mean, std = statistics.mean(accs), statistics.stdev(accs) if len(accs) > 1 else 0.0
        row = axes[datasets.index(runs[0]["dataset"])]
        for ax, (key, _) in zip(row, METRIC_AXES):
            values = [r.get(key) for r in runs if r.get(key) is not None]
            if not values:
                continue  # e.g. no ONNX Runtime latency in runs written before the deployable existed
            x = statistics.mean(values)
            ax.errorbar(x, mean, yerr=std, marker=markers[i % len(markers)], color=f"C{i % 10}", markersize=7,
                        capsize=3, linestyle="none", label=f"{name} ({len(accs)})")
            ax.annotate(name, (x, mean), textcoords="offset points", xytext=(6, 5), fontsize=7, color=f"C{i % 10}")
    for dataset, row in zip(datasets, axes):
        for ax, (_, label) in zip(row, METRIC_AXES):
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())  # labelled decades only: minor labels overlap
            ax.set_xlabel(label + ", log scale")
            ax.grid(True, which="both", alpha=0.3)
            ax.margins(x=0.15)
        row[0].set_ylabel(f"{dataset}: test accuracy (%)\nmean ± std over seeds")
        row[-1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False, title="experiment (seeds)")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def log_to_tensorboard(log_dir: Path, table: str, figure) -> None:
    """The table (as text) and the trade-off figure, viewable with ``tensorboard --logdir results``."""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(log_dir)) as writer:
        writer.add_text("results", table)
        writer.add_figure("tradeoff", figure, close=False)


def splice_readme(readme: Path, suite: str, block: str) -> bool:
    """Replace the text between ``<!-- suite:NAME:begin -->`` and ``<!-- suite:NAME:end -->``; False if absent."""
    text = readme.read_text()
    pattern = re.compile(rf"(<!-- suite:{re.escape(suite)}:begin -->\n).*?(<!-- suite:{re.escape(suite)}:end -->)", re.S)
    if not pattern.search(text):
        return False
    readme.write_text(pattern.sub(lambda m: m.group(1) + block.rstrip("\n") + "\n" + m.group(2), text))
    return True
