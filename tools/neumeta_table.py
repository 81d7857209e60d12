"""Print the accuracy-vs-width table (mean ± std over runs) of NeuMeta runs from their summary.json files.

    python tools/neumeta_table.py runs/nm/digits_head_s*/version_0 [--label faithful runs/nm/digits_faithful_s*/version_0]
        [--plot results/neumeta/digits_head.png] [--out results/neumeta/digits_head.md] [--readme README.md --block NAME]

Columns: the generated network (EMA INR, K-merged), structured L1 pruning without fine-tuning and the smoothed
weights resampled without training, each as mean ± std in %, and NeuMeta's lead over resampling within each run
(paired: the same pretrained network), mean ± std in points; then the pretrained width-N network and the network
with every generated tensor zeroed, and the widths where NeuMeta's mean is below resampling's. ``--plot`` draws the
means (``plot_accuracy_vs_width``), ``--out`` writes the table (and a link to the plot), ``--readme`` puts the same
into the README between ``<!-- suite:BLOCK:begin -->`` and ``<!-- suite:BLOCK:end -->``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from comparison.report import mean_std, splice_readme  # noqa: E402
from lightning_modules.neumeta.plot import plot_accuracy_vs_width  # noqa: E402


def table(runs: list[Path], extra: dict[str, list[Path]]) -> str:
    summaries = [json.loads((run / "summary.json").read_text()) for run in runs]
    others = {label: [json.loads((r / "summary.json").read_text()) for r in paths] for label, paths in extra.items()}
    lo, hi = summaries[0]["neumeta"]["train_widths"]
    full = summaries[0]["neumeta"]["full_width"]
    header = ["h", f"NeuMeta ({len(summaries)} runs)", *[f"{k} ({len(v)} runs)" for k, v in others.items()],
              "L1 pruning, no FT", "resampled, no training", "NeuMeta − resampled, same run (points)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    widths = [row["width"] for row in summaries[0]["neumeta"]["accuracy_vs_width"]]
    for i, width in enumerate(widths):
        column = lambda group, key: [s["neumeta"]["accuracy_vs_width"][i][key] for s in group  # noqa: E731
                                     if s["neumeta"]["accuracy_vs_width"][i][key] is not None]
        mark = "" if lo <= width <= hi else " (unseen, above N)" if width > full else " (unseen)"
        cells = [f"{width}{mark}", mean_std(column(summaries, "neumeta"), 100),
                 *[mean_std(column(group, "neumeta"), 100) for group in others.values()],
                 mean_std(column(summaries, "l1_prune"), 100), mean_std(column(summaries, "resample"), 100),
                 signed_mean_std(paired_differences(summaries, i))]
        lines.append("| " + " | ".join(cells) + " |")
    pretrained = [s["metrics"]["test/pretrained/acc"] for s in summaries]
    lines.append(f"| pretrained (h = {full}) | {mean_std(pretrained, 100)} |" + " |" * (len(header) - 2))
    zeroed = [s["metrics"]["test/zeroed/acc"] for s in summaries]  # the generated tensors all 0
    lines.append(f"| generated part zeroed | {mean_std(zeroed, 100)} |" + " |" * (len(header) - 2))
    means = mean_table(summaries)
    below = [f"{r['width']} ({100 * (r['neumeta'] - r['resample']):+.2f})" for r in means
             if r["resample"] is not None and r["neumeta"] < r["resample"]]
    lines.append(f"\nWidths where NeuMeta's mean is below resampling's: {', '.join(below) if below else 'none'}.")
    return "\n".join(lines)


def paired_differences(summaries: list[dict], i: int) -> list[float]:
    """NeuMeta's minus resampling's accuracy at row ``i``, in points, per run (the same pretrained net in both)."""
    rows = [s["neumeta"]["accuracy_vs_width"][i] for s in summaries]
    return [100 * (r["neumeta"] - r["resample"]) for r in rows if r["resample"] is not None]


def signed_mean_std(values: list[float]) -> str:
    """``+1.23 ± 0.45`` (sample std; none for one value), ``-`` for no values."""
    if not values:
        return "-"
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:+.2f}"
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return f"{mean:+.2f} ± {std:.2f}"


def mean_table(summaries: list[dict]) -> list[dict]:
    """The accuracy-vs-width rows with every method's mean over the runs (None where a method was not run)."""
    rows = []
    for i, row in enumerate(summaries[0]["neumeta"]["accuracy_vs_width"]):
        mean = {"width": row["width"]}
        for key in ("neumeta", "l1_prune", "resample"):
            values = [s["neumeta"]["accuracy_vs_width"][i][key] for s in summaries]
            mean[key] = None if any(v is None for v in values) else sum(values) / len(values)
        rows.append(mean)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (holding summary.json)")
    parser.add_argument("--label", nargs="+", action="append", default=[], metavar=("LABEL", "RUN"),
                        help="an extra NeuMeta column: its label, then its run directories")
    parser.add_argument("--plot", type=Path, help="write the mean accuracy-vs-width figure here")
    parser.add_argument("--out", type=Path, help="write the table (and the plot's link) to this markdown file")
    parser.add_argument("--readme", type=Path, help="also put the table into this markdown file's block --block")
    parser.add_argument("--block", help="the README block's name: <!-- suite:NAME:begin --> ... <!-- suite:NAME:end -->")
    args = parser.parse_args()
    if args.readme is not None and not args.block:
        parser.error("--readme needs --block NAME")
    text = table(args.runs, {label: [Path(p) for p in paths] for label, *paths in args.label})
    print(text)
    if args.out is not None:
        image = f"\n\n![accuracy vs width]({args.plot.resolve().relative_to(args.out.resolve().parent).as_posix()})" if args.plot else ""
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + image + "\n")
    if args.readme is not None:
        image = f"\n\n![accuracy vs width]({args.plot.resolve().relative_to(args.readme.resolve().parent).as_posix()})" if args.plot else ""
        if not splice_readme(args.readme, args.block, text + image):
            raise SystemExit(f"{args.readme} has no <!-- suite:{args.block}:begin --> ... <!-- suite:{args.block}:end --> block.")
    if args.plot:
        summaries = [json.loads((run / "summary.json").read_text()) for run in args.runs]
        info = summaries[0]["neumeta"]
        pretrained = sum(s["metrics"]["test/pretrained/acc"] for s in summaries) / len(summaries)
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        plot_accuracy_vs_width(mean_table(summaries), pretrained, info["full_width"], tuple(info["train_widths"]), args.plot)


if __name__ == "__main__":
    main()
