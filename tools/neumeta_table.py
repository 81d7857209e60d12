"""Print the accuracy-vs-width table (mean ± std over runs) of NeuMeta runs from their summary.json files.

    python tools/neumeta_table.py runs/nm/digits_head_s*/version_0 [--label faithful runs/nm/digits_faithful_s*/version_0]

Columns: the generated network (EMA INR, K-merged), structured L1 pruning without fine-tuning and the smoothed
weights resampled without training, each as mean ± std in %; the pretrained width-N network is the last line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from comparison.report import mean_std  # noqa: E402


def table(runs: list[Path], extra: dict[str, list[Path]]) -> str:
    summaries = [json.loads((run / "summary.json").read_text()) for run in runs]
    others = {label: [json.loads((r / "summary.json").read_text()) for r in paths] for label, paths in extra.items()}
    lo, hi = summaries[0]["neumeta"]["train_widths"]
    header = ["h", f"NeuMeta ({len(summaries)} runs)", *[f"{k} ({len(v)} runs)" for k, v in others.items()],
              "L1 pruning, no FT", "resampled, no training"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    widths = [row["width"] for row in summaries[0]["neumeta"]["accuracy_vs_width"]]
    for i, width in enumerate(widths):
        column = lambda group, key: [s["neumeta"]["accuracy_vs_width"][i][key] for s in group  # noqa: E731
                                     if s["neumeta"]["accuracy_vs_width"][i][key] is not None]
        mark = "" if lo <= width <= hi else " (unseen)"
        cells = [f"{width}{mark}", mean_std(column(summaries, "neumeta"), 100),
                 *[mean_std(column(group, "neumeta"), 100) for group in others.values()],
                 mean_std(column(summaries, "l1_prune"), 100), mean_std(column(summaries, "resample"), 100)]
        lines.append("| " + " | ".join(cells) + " |")
    pretrained = [s["metrics"]["test/pretrained/acc"] for s in summaries]
    lines.append(f"| pretrained (h = {hi}) | {mean_std(pretrained, 100)} |" + " |" * (len(header) - 2))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (holding summary.json)")
    parser.add_argument("--label", nargs="+", action="append", default=[], metavar=("LABEL", "RUN"),
                        help="an extra NeuMeta column: its label, then its run directories")
    args = parser.parse_args()
    print(table(args.runs, {label: [Path(p) for p in paths] for label, *paths in args.label}))


if __name__ == "__main__":
    main()
