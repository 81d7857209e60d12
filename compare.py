"""Compare techniques on the same data: run a suite, then tabulate and plot accuracy against size and cost.

    python compare.py run configs/suites/quick.yaml                      # run what is missing, then report
    python compare.py run configs/suites/fashion_mnist.yaml --only lora --seeds 1    # one technique, one seed
    python compare.py run configs/suites/quick.yaml --dry-run            # print the train.py commands
    python compare.py report configs/suites/quick.yaml [--readme README.md]   # re-write the report only
    python compare.py table runs/ [--csv out.csv]                        # tabulate any directory of runs
    python compare.py tune tune_wine [--trials 12] [--only baseline]      # equal-budget Optuna studies, then their best
    python compare.py tune tune_fashion_mnist --retrain   # ... then recipe, best and knee x seeds: fronts, tuned.md

Every run is ``python train.py fit --config ...`` (the same LightningCLI, in a child process), so a suite run is
reproducible by hand from the command at the top of its log. ``results/<suite>/`` receives ``results.csv`` (one
row per run), ``results.md`` (mean ± std per experiment), ``tradeoff.png`` and TensorBoard events
(``tensorboard/``). Latency is measured inside each run on the deployed model (``models/latency.py``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from comparison.report import (
    collect,
    log_to_tensorboard,
    markdown_table,
    read_csv,
    splice_readme,
    tradeoff_figure,
    write_csv,
)
from comparison.suite import ROOT, Runner, Suite, load_suite


def report(suite: Suite, results: Path, readme: Path | None = None) -> str:
    """Write ``results.csv``, ``results.md``, ``tradeoff.png`` and TensorBoard events for the finished runs."""
    out = results / suite.name
    labels = [e.label for e in suite.experiments]
    records = [r for r in collect(out / "runs", finished_only=True) if r["experiment"] in labels]
    # results.csv is the record: runs measured elsewhere (another checkout, whose run directories are not here)
    # stay in it until they are run again here
    here = {(r["experiment"], r["run"]) for r in records}
    kept = [r for r in read_csv(out / "results.csv") if r["experiment"] in labels and (r["experiment"], r["run"]) not in here]
    if kept:
        print(f"{len(kept)} run(s) kept from {out / 'results.csv'} (no run directory here)")
    records = kept + records
    if not records:
        raise SystemExit(f"no finished run of suite {suite.name} under {out / 'runs'}; run: python compare.py run {suite.name}")
    datasets = sorted({r["dataset"] for r in records})
    threads = sorted({r["latency_threads"] for r in records if r["latency_threads"] is not None})
    seeds = sorted({r["seed"] for r in records})
    table = markdown_table(records, labels)
    notes = (
        f"Suite `{suite.name}` on {', '.join(datasets)}: {len(records)} runs, seeds {seeds}, "
        f"{sum(r['train_seconds'] or 0 for r in records) / 60:.1f} min of training. "
        f"Latency: median forward time of the deployed model in PyTorch and, as `exported.onnx`, in ONNX Runtime "
        f"(CPU), {threads or '?'} thread(s). "
        f"Parameter counts as in `models/accounting.py`; exact values in `results.csv`."
    )
    write_csv(records, out / "results.csv")
    title = f"{suite.name}: {', '.join(datasets)} ({len(seeds)} seed{'s' if len(seeds) > 1 else ''})"
    figure = tradeoff_figure(records, title, labels)
    figure.savefig(out / "tradeoff.png", dpi=110)
    (out / "results.md").write_text(f"{notes}\n\n{table}\n\n![trade-off](tradeoff.png)\n")
    log_to_tensorboard(out / "tensorboard", f"{notes}\n\n{table}", figure)
    print(f"\n{table}\n\n{notes}\nwrote {out}/results.csv, results.md, tradeoff.png, tensorboard/")
    if readme is not None:
        image = (out / "tradeoff.png").resolve().relative_to(readme.resolve().parent)
        if not splice_readme(readme, suite.name, f"{notes}\n\n{table}\n\n![{suite.name} trade-off]({image.as_posix()})\n"):
            raise SystemExit(f"{readme} has no <!-- suite:{suite.name}:begin --> ... <!-- suite:{suite.name}:end --> block.")
        print(f"updated the {suite.name} block of {readme}")
    return table


def _suite_path(name: str) -> Path:
    """A suite by path or by name (``quick`` -> ``configs/suites/quick.yaml``)."""
    path = Path(name)
    return path if path.suffix in (".yaml", ".yml") else ROOT / "configs" / "suites" / f"{name}.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a suite's missing runs, then write its report")
    run.add_argument("suite", help="a suite file or the name of one in configs/suites/")
    run.add_argument("--only", nargs="+", metavar="LABEL", help="run only these experiments")
    run.add_argument("--seeds", nargs="+", type=int, help="run only these seeds")
    run.add_argument("--dry-run", action="store_true", help="print the commands of the missing runs and stop")
    run.add_argument("--verbose", action="store_true", help="show each run's output and progress bar")
    rep = sub.add_parser("report", help="write the table and plots of a suite's finished runs")
    rep.add_argument("suite")
    rep.add_argument("--readme", type=Path, help="also replace the suite's block in this markdown file")
    for p in (run, rep):
        p.add_argument("--results", type=Path, default=ROOT / "results", help="where results/<suite>/ lives")
    tune = sub.add_parser("tune", help="run (or continue) one Optuna study per experiment, the same trials for each")
    tune.add_argument("suite")
    tune.add_argument("--trials", type=int, help="trials per experiment (default: the suite's tuning.trials)")
    tune.add_argument("--timeout", type=float, help="seconds per experiment after which no new trial starts")
    tune.add_argument("--only", nargs="+", metavar="LABEL", help="tune only these experiments")
    tune.add_argument("--storage", help="an Optuna RDB URL shared by several machines (default: results/<suite>/tuning.db)")
    tune.add_argument("--grace", type=int, default=120, help="seconds without a heartbeat after which a running trial is dead")
    tune.add_argument("--retrain", action="store_true",
                      help="then retrain each experiment's recipe, best and knee trial with the suite's seeds and test them")
    tune.add_argument("--results", type=Path, default=ROOT / "results", help="where results/<suite>/ lives")
    tune.add_argument("--readme", type=Path, help="also replace the suite's block in this markdown file with tuned.md")
    table = sub.add_parser("table", help="tabulate the summary.json files under a directory")
    table.add_argument("root", type=Path)
    table.add_argument("--csv", type=Path, help="also write one row per run to this CSV file")
    args = parser.parse_args(argv)

    if args.command == "table":
        records = collect(args.root)
        if not records:
            raise SystemExit(f"no summary.json under {args.root}")
        print(markdown_table(records))
        if args.csv:
            write_csv(records, args.csv)
        return 0
    suite = load_suite(_suite_path(args.suite))
    if args.command == "tune":
        from comparison import tuned  # optuna is imported only to tune
        from comparison.tune import tuner_of

        tuner = tuner_of(suite, args.results, args.storage, args.grace, args.trials)
        tuner.run(args.only, args.timeout)
        print(tuner.report())
        failed = tuned.Retrainer(tuner).run(args.only) if args.retrain else []
        text = tuned.report(tuner)
        if text is not None:
            print(f"\n{text}\nwrote {tuner.out}/tuned.md, fronts.png, tuning/hparams/")
        if args.readme is not None and text is not None:
            image = (tuner.out / "fronts.png").resolve().relative_to(args.readme.resolve().parent)
            if not splice_readme(args.readme, suite.name, text.replace("](fronts.png)", f"]({image.as_posix()})")):
                raise SystemExit(f"{args.readme} has no <!-- suite:{suite.name}:begin --> ... <!-- suite:{suite.name}:end --> block.")
            print(f"updated the {suite.name} block of {args.readme}")
        if failed:
            print(f"failed runs: {', '.join(failed)} (their logs are in {tuner.out / 'tuned' / 'logs'})", file=sys.stderr)
            return 1
        return 0
    if args.command == "report":
        report(suite, args.results, args.readme)
        return 0
    failed = Runner(suite, args.results, verbose=args.verbose).run(args.only, args.seeds, dry_run=args.dry_run)
    if not args.dry_run:
        report(suite, args.results)
    if failed:
        print(f"failed runs: {', '.join(failed)} (their logs are in {args.results / suite.name / 'logs'})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
