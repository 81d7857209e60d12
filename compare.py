"""Compare runs: collect every ``summary.json`` under a directory and tabulate mean +- std per experiment.

    python compare.py table runs/                 # markdown table on stdout
    python compare.py table runs/ --csv out.csv   # and one row per run as CSV

An experiment is the directory above a run's version directory (``runs/<dataset>/<config>/version_N``), so
seeds of one config (``version: seed0``, ``seed1``, ...) form one row.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from pathlib import Path


def collect(root: Path) -> list[dict]:
    """One flat record per run: experiment name, seed, metrics and accounting."""
    records = []
    for path in sorted(root.rglob("summary.json")):
        summary = json.loads(path.read_text())
        record = {
            "experiment": path.parent.parent.relative_to(root).as_posix(),
            "run": path.parent.name,
            "technique": summary["technique"],
            "dataset": summary["dataset"],
            "seed": summary["seed"],
            **{k: v for k, v in summary["metrics"].items()},
            **{f"params/{k}": v for k, v in summary["params"].items()},
            "flops_per_sample": summary["flops_per_sample"],
            "model_bytes": summary["model_bytes"],
            "epochs": summary["epochs"],
            "seconds_per_epoch": summary["seconds_per_epoch"],
        }
        records.append(record)
    return records


def _mean_std(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    values = [v * scale for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def markdown_table(records: list[dict]) -> str:
    """Per experiment: test accuracy, parameters, FLOPs, bytes and time, mean ± std over its runs."""
    groups: dict[str, list[dict]] = {}
    for record in records:
        groups.setdefault(record["experiment"], []).append(record)
    lines = [
        "| experiment | data | runs | test acc (%) | params total | trainable | nonzero | FLOPs/sample | bytes | s/epoch |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, runs in groups.items():
        first = runs[0]
        lines.append(
            f"| {name} | {first['dataset']} | {len(runs)} | {_mean_std([r.get('test/acc') for r in runs], 100)} "
            f"| {first['params/total']:,} | {first['params/trainable']:,} | {first['params/nonzero']:,} "
            f"| {first['flops_per_sample']:,} | {first['model_bytes']:,} | {_mean_std([r['seconds_per_epoch'] for r in runs], 1, 1)} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    table = sub.add_parser("table", help="tabulate the summary.json files under a directory")
    table.add_argument("root", type=Path)
    table.add_argument("--csv", type=Path, help="also write one row per run to this CSV file")
    args = parser.parse_args()
    records = collect(args.root)
    if not records:
        raise SystemExit(f"no summary.json under {args.root}")
    print(markdown_table(records))
    if args.csv:
        fields = sorted({k for r in records for k in r}, key=lambda k: (k not in records[0], k))
        with open(args.csv, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            writer.writerows(records)


if __name__ == "__main__":
    main()
