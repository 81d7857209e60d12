"""The seed's MorphoNet claim, judged from the ``morphonet_claim`` suite's ``results.csv``.

Claim (published): MorphoNet beats a same-budget dense MLP with fewer parameters (Moons 96.2 vs 97.5 % at 0.47x,
Blobs-5C 83.0 vs 80.5 % at 0.64x). Per dataset, the candidates are the MorphoNet experiments whose deployed
nonzero parameters average at most ``--max-ratio`` times the dense MLP's; the one chosen has the highest mean
validation accuracy (the last epoch's, the model that is tested), so test accuracy plays no part in the choice.
The claim holds on a dataset when the chosen configuration's mean test accuracy is at least the dense MLP's.

    python compare.py run morphonet_claim && python benchmarks/morphonet_claim.py --readme README.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from comparison.report import mean_std, read_csv, splice_readme  # noqa: E402

DENSE = "dense"  # the dense experiment of each dataset is ``<dataset>/dense``


def by_experiment(rows: list[dict]) -> dict[str, dict[str, list[dict]]]:
    """``{dataset: {configuration: [rows]}}`` from labels ``<dataset>/<configuration>``."""
    grouped: dict[str, dict[str, list[dict]]] = {}
    for row in rows:
        dataset, _, name = row["experiment"].partition("/")
        grouped.setdefault(dataset, {}).setdefault(name, []).append(row)
    return grouped


def mean(rows: list[dict], key: str) -> float:
    return statistics.mean(float(r[key]) for r in rows)


def choose(configs: dict[str, list[dict]], max_ratio: float) -> tuple[str | None, dict[str, float]]:
    """The candidate with the best mean val/acc among those within the parameter budget, and every ratio."""
    dense = mean(configs[DENSE], "params/nonzero")
    ratios = {name: mean(rows, "params/nonzero") / dense for name, rows in configs.items() if name != DENSE}
    within = [name for name, ratio in ratios.items() if ratio <= max_ratio]
    chosen = max(within, key=lambda name: mean(configs[name], "val/acc"), default=None)
    return chosen, ratios


def paired_wins(chosen: list[dict], dense: list[dict]) -> str:
    """Seeds on which the chosen configuration's test accuracy is >= the dense MLP's, of the seeds both ran."""
    dense_by_seed = {r["seed"]: float(r["test/acc"]) for r in dense}
    pairs = [(float(r["test/acc"]), dense_by_seed[r["seed"]]) for r in chosen if r["seed"] in dense_by_seed]
    return f"{sum(a >= b for a, b in pairs)}/{len(pairs)}"


def verdict_table(rows: list[dict], max_ratio: float) -> str:
    lines = [f"Chosen per dataset on mean val/acc among configurations at <= {max_ratio}x the dense MLP's nonzero "
             "parameters (`benchmarks/morphonet_claim.py`).", "",
             "| dataset | configuration | seeds | val acc (%) | test acc (%) | nonzero | x dense | chosen | test >= dense (seeds) |",
             "|---|---|--:|--:|--:|--:|--:|---|--:|"]
    verdicts = []
    for dataset, configs in by_experiment(rows).items():
        if DENSE not in configs:
            raise SystemExit(f"{dataset}: no {dataset}/{DENSE} runs in results.csv to compare against")
        chosen, ratios = choose(configs, max_ratio)
        for name, runs in configs.items():
            ratio = ratios.get(name, 1.0)
            mark = "yes" if name == chosen else ("" if name == DENSE or ratio <= max_ratio else "over budget")
            wins = paired_wins(runs, configs[DENSE]) if name != DENSE else ""
            lines.append(f"| {dataset} | {name} | {len(runs)} | {mean_std([float(r['val/acc']) for r in runs], 100)} "
                         f"| {mean_std([float(r['test/acc']) for r in runs], 100)} "
                         f"| {mean(runs, 'params/nonzero'):.0f} | {ratio:.2f} | {mark} | {wins} |")
        if chosen is None:
            verdicts.append(f"- {dataset}: no configuration within {max_ratio}x: the claim is not met.")
            continue
        gap = 100 * (mean(configs[chosen], "test/acc") - mean(configs[DENSE], "test/acc"))
        holds = "holds" if gap >= 0 else "does not hold"
        verdicts.append(f"- {dataset}: {chosen} at {ratios[chosen]:.2f}x, {gap:+.2f} points against the dense MLP: "
                        f"the claim {holds}.")
    return "\n".join(lines + [""] + verdicts) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=Path("results/morphonet_claim/results.csv"))
    parser.add_argument("--max-ratio", type=float, default=0.5, help="parameter budget, x the dense MLP's nonzero")
    parser.add_argument("--readme", type=Path, help="also write the table between <!-- suite:morphonet_claim:verdict:"
                                                    "begin/end --> there")
    args = parser.parse_args(argv)
    if not args.results.is_file():
        raise SystemExit(f"no {args.results}; run: python compare.py run morphonet_claim")
    table = verdict_table(read_csv(args.results), args.max_ratio)
    print(table)
    if args.readme and not splice_readme(args.readme, "morphonet_claim:verdict", table):
        raise SystemExit(f"{args.readme} has no <!-- suite:morphonet_claim:verdict:begin --> marker")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
