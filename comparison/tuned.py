"""The tuned comparison: each technique's Pareto fronts from its study, one hypervolume per technique and cost
against a common reference point, and the fixed recipe, the best trial and the knee of the front retrained with the
suite's seeds and tested once on the test split.

    python compare.py tune SUITE --retrain     # the studies, then the retraining, then this report

A trial's point is (deployed validation accuracy, cost) for each cost the trials measured (``tune.COSTS``: ONNX
Runtime latency at batch 256, nonzero parameters). ``best`` is the trial with the highest tuned metric, ``knee`` the
knee of its (metric, size) front (``fronts.knee``; size: nonzero parameters when measured). A retrained run is the
trial's own ``train.py fit`` command with another seed and the test at its end, in
``results/<suite>/tuned/<label>/<recipe|trial<k>>/seed<s>/``. The recipe is the experiment with the tuning budget
and none of the searched values: the fixed recipe, at the same budget as the trials (also the study's first trial,
so a best or knee that is the recipe is retrained once, as ``recipe``).

Writes ``results/<suite>/tuned.md`` (hypervolumes and the retrained table), ``fronts.png`` (every technique's fronts
and recipe points) and TensorBoard's hparams table of every trial (``tuning/hparams/``).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from optuna.trial import FrozenTrial, TrialState  # noqa: E402

from comparison.fronts import hypervolume, knee, pareto_front  # noqa: E402
from comparison.suite import Experiment, fit_command, override_args  # noqa: E402
from comparison.tune import COSTS, SEED, Tuner, describe, measure, replace_file  # noqa: E402

ACCURACY = "deployed/val_acc"  # the fronts' accuracy: the same measure for every technique


def complete_trials(tuner: Tuner, experiment: Experiment) -> list[FrozenTrial]:
    """The study's complete trials that measured their deployed model (``measures`` user attribute)."""
    trials = tuner.study(experiment).get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return [t for t in trials if (t.user_attrs.get("measures") or {}).get(ACCURACY) is not None]


def costs_of(tuner: Tuner) -> list[str]:
    """The costs the fronts are drawn against: the study's own, else every cost the trials measure."""
    return tuner.tuning.against or ["latency", "nonzero"]


def choose(trials: list[FrozenTrial], metric: str, size: str) -> dict[str, FrozenTrial]:
    """``best``: the highest ``metric`` (ties: the smaller ``size``); ``knee``: the knee of the (metric, size) front,
    left out when it is the best trial."""
    if not trials:
        return {}
    scored = [t for t in trials if t.user_attrs["measures"].get(metric) is not None]
    best = max(scored, key=lambda t: (t.user_attrs["measures"][metric], -(t.user_attrs["measures"].get(size) or 0)))
    points = [(t.user_attrs["measures"][metric], t.user_attrs["measures"].get(size) or 0.0) for t in scored]
    bend = scored[knee(points, pareto_front(points))]
    return {"best": best} if bend.number == best.number else {"best": best, "knee": bend}


class Retrainer:
    """Run (or continue) the retraining of every experiment's recipe, best and knee trials with the suite's seeds."""

    def __init__(self, tuner: Tuner) -> None:
        self.tuner = tuner
        self.out = tuner.out / "tuned"

    def configurations(self, experiment: Experiment, trials: list[FrozenTrial] | None = None) -> dict[str, tuple[str, dict[str, Any]]]:
        """``{run name: (what it is, overrides)}``: ``recipe`` and ``trial<k>`` for the best and the knee of
        ``trials`` (default: the study's complete trials)."""
        trials = complete_trials(self.tuner, experiment) if trials is None else trials
        chosen = choose(trials, self.tuner.tuning.metric, self.size)
        configs = {"recipe": ("recipe", {})}
        for role, trial in chosen.items():
            # the study's first trial is the recipe itself when every searched value could be read from it
            name = "recipe" if trial.user_attrs.get("recipe") == "whole" else f"trial{trial.number}"
            previous = configs.get(name, (None,))[0]
            configs[name] = (f"{previous} + {role}" if previous else role, configs.get(name, (None, dict(trial.params)))[1])
        return configs

    @property
    def size(self) -> str:
        return "nonzero" if "nonzero" in costs_of(self.tuner) else costs_of(self.tuner)[0]

    def run_dir(self, experiment: Experiment, name: str, seed: int) -> Path:
        return self.out / experiment.label / name / f"seed{seed}"

    def command(self, experiment: Experiment, name: str, values: dict[str, Any], seed: int) -> list[str]:
        """The trial's command (experiment, tuning budget, its values) with ``seed``, tested on the test split."""
        tuning = self.tuner.tuning
        return (fit_command(self.tuner.suite, experiment) + override_args(tuning.overrides) + override_args(values) +
                [f"--seed_everything={seed}", "--trainer.enable_progress_bar=false",
                 f"--trainer.logger.init_args.save_dir={self.out / experiment.label}",
                 f"--trainer.logger.init_args.name={name}", f"--trainer.logger.init_args.version=seed{seed}",
                 "--trainer.callbacks+=callbacks.DeployedValidation"])

    def summary(self, experiment: Experiment, name: str, seed: int) -> dict | None:
        path = self.run_dir(experiment, name, seed) / "summary.json"
        summary = json.loads(path.read_text()) if path.is_file() else {}
        return summary if summary.get("stage") == "test" and "test_acc" in summary.get("deployed", {}) else None

    def run(self, only: list[str] | None = None) -> list[str]:
        """Run the missing retrained runs (a killed one starts again); returns the names of failed ones."""
        todo = [(e, name, values, seed) for e, _ in self.tuner.suite.runs(only, seeds=[SEED])
                for name, (_, values) in self.configurations(e).items() for seed in self.tuner.suite.seeds
                if self.summary(e, name, seed) is None]
        print(f"retraining: {len(todo)} run(s) to do -> {self.out}", flush=True)
        failed = []
        for index, (experiment, name, values, seed) in enumerate(todo, 1):
            run_dir = self.run_dir(experiment, name, seed)
            if run_dir.exists():
                shutil.rmtree(run_dir)
            log = self.out / "logs" / f"{experiment.label.replace('/', '-')}-{name}-seed{seed}.log"
            print(f"[{index}/{len(todo)}] {experiment.label} {name} seed {seed}", flush=True)
            seconds, code = self.tuner.runner.execute(self.command(experiment, name, values, seed), log)
            summary = self.summary(experiment, name, seed) if code == 0 else None
            if summary is None:
                failed.append(f"{experiment.label} {name} seed {seed}")
                print(f"      FAILED (exit {code}) after {seconds:.0f} s; its log: {log}", flush=True)
            else:
                print(f"      done in {seconds:.0f} s: deployed test acc {100 * summary['deployed']['test_acc']:.2f} %", flush=True)
        return failed


def _mean_std(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    if not values:
        return "-"
    mean = statistics.mean(values) * scale
    std = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _params(values: dict[str, Any]) -> str:
    return describe(values) or "(the recipe)"


def report(tuner: Tuner) -> str | None:
    """``tuned.md``, ``fronts.png`` and the hparams table from the studies and the retrained runs (None: no trial
    measured its deployed model yet)."""
    retrainer, costs, suite = Retrainer(tuner), costs_of(tuner), tuner.suite
    trials = {e.label: complete_trials(tuner, e) for e in suite.experiments}
    every = [t for ts in trials.values() for t in ts]
    if not every:
        return None
    reference = {"accuracy": tuner.tuning.reference.get("accuracy", min(t.user_attrs["measures"][ACCURACY] for t in every))}
    for cost in costs:  # undeclared: just worse than every trial, so that each trial counts
        reference[cost] = tuner.tuning.reference.get(cost, 1.05 * max(t.user_attrs["measures"][cost] or 0.0 for t in every))
    figure, axes = plt.subplots(1, len(costs), figsize=(6.5 * len(costs), 5), squeeze=False)
    hv_lines = ["| experiment | complete trials | " + " | ".join(f"front points / hypervolume ({COSTS[c][0]})" for c in costs) + " |",
                "|---|--:|" + "--:|" * len(costs)]
    rows = ["| experiment | run | what | seeds | deployed test acc (%) | deployed val acc (%) | nonzero params | ORT b256 (ms) | values |",
            "|---|---|---|--:|--:|--:|--:|--:|---|"]
    for color, experiment in zip(plt.cm.tab10.colors, suite.experiments):
        ts = trials[experiment.label]
        cells = []
        for ax, cost in zip(axes[0], costs):
            points = [(t.user_attrs["measures"][ACCURACY], t.user_attrs["measures"][cost]) for t in ts
                      if t.user_attrs["measures"].get(cost) is not None]
            front = [points[i] for i in pareto_front(points)]
            cells.append(f"{len(front)} / {hypervolume(points, (reference['accuracy'], reference[cost])):.3f}" if points else "-")
            if points:
                ax.scatter([p[1] for p in points], [100 * p[0] for p in points], color=color, alpha=0.25, s=14)
                # the front as the best accuracy reached at each cost, drawn on to the reference cost
                steps = front + [(front[-1][0], reference[cost])] if front[-1][1] < reference[cost] else front
                ax.step([p[1] for p in steps], [100 * p[0] for p in steps], where="post", color=color, label=experiment.label)
        hv_lines.append(f"| {experiment.label} | {len(ts)} | " + " | ".join(cells) + " |")
        for name, (what, values) in retrainer.configurations(experiment, ts).items():
            summaries = [s for s in (retrainer.summary(experiment, name, seed) for seed in suite.seeds) if s is not None]
            if not summaries:
                continue
            m = {key: [v for v in (measure(s, key) for s in summaries) if v is not None] for key in (ACCURACY, *COSTS, "deployed/test_acc")}
            if name == "recipe":
                for ax, cost in zip(axes[0], costs):
                    if m[cost] and m[ACCURACY]:
                        ax.scatter([statistics.mean(m[cost])], [100 * statistics.mean(m[ACCURACY])], marker="*", s=160,
                                   color=color, edgecolor="black", zorder=5)
            rows.append(f"| {experiment.label} | {name} | {what} | {len(summaries)} | {_mean_std(m['deployed/test_acc'], 100)} | "
                        f"{_mean_std(m[ACCURACY], 100)} | {statistics.mean(m['nonzero']):,.0f} | "
                        f"{_mean_std(m['latency'], 1.0, 3)} | {_params(values)} |")
    for ax, cost in zip(axes[0], costs):
        ax.axhline(100 * reference["accuracy"], color="grey", lw=0.8, ls=":")
        ax.axvline(reference[cost], color="grey", lw=0.8, ls=":")
        ax.set_xlabel(f"deployed model: {COSTS[cost][0]}")
        ax.set_ylabel("deployed model: validation accuracy (%)")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        top = max(t.user_attrs["measures"][ACCURACY] for t in every)
        ax.set_ylim(100 * reference["accuracy"] - 4, 100 * top + 1)  # trials below the reference are left out
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    figure.suptitle(f"{suite.name}: Pareto fronts of {tuner.tuning.trials} trials per technique "
                    f"(dots: trials, steps: fronts, stars: the fixed recipe at the same budget, dotted: reference)", fontsize=9)
    figure.tight_layout()
    replace_file(tuner.out / "fronts.png", lambda path: figure.savefig(path, dpi=110, format="png"))
    plt.close(figure)
    log_hparams(tuner, trials)
    seconds = sum(t.user_attrs.get("seconds", 0.0) for t in every)
    text = (f"Suite `{suite.name}`: {tuner.tuning.trials} trials per experiment ({len(every)} complete, "
            f"{seconds / 60:.0f} min of trials), budget {tuner.tuning.overrides}, objectives {tuner.tuning.objectives}. "
            f"Hypervolume: the fraction of the box between the reference point {reference} and the ideal "
            f"(accuracy 1, cost 0) that a technique's trials dominate.\n\n" + "\n".join(hv_lines) +
            f"\n\nRetrained with seeds {suite.seeds} at the same budget, tested once: the test accuracy of the deployed "
            "model of the tested checkpoint; its validation accuracy, nonzero parameters and ONNX Runtime latency are "
            "measured at the end of each fit (`callbacks.DeployedValidation`).\n\n"
            + "\n".join(rows) + "\n\n![fronts](fronts.png)\n")
    replace_file(tuner.out / "tuned.md", lambda path: path.write_text(text))
    return text


def log_hparams(tuner: Tuner, trials: dict[str, list[FrozenTrial]]) -> None:
    """TensorBoard's HPARAMS tab: one row per complete trial (its searched values and measures), per experiment."""
    from torch.utils.tensorboard import SummaryWriter

    # Several tune processes may finish together and report at once: each writes its own folder, then swaps it in;
    # a process that finds the place taken again leaves the other's table (both come from the same database).
    root = tuner.out / "tuning" / "hparams"
    mine = root.with_name(f".hparams-{os.getpid()}")
    shutil.rmtree(mine, ignore_errors=True)
    for label, ts in trials.items():
        for t in ts:
            with SummaryWriter(mine / label / f"trial{t.number}") as writer:
                hparams = {k.rsplit(".", 1)[-1]: v for k, v in t.params.items()}
                metrics = {f"hparam/{k.replace('/', '_')}": v for k, v in t.user_attrs["measures"].items() if v is not None}
                writer.add_hparams(hparams, metrics, run_name=".")
    shutil.rmtree(root, ignore_errors=True)
    try:
        mine.rename(root)
    except OSError:  # another process swapped its table in between
        shutil.rmtree(mine, ignore_errors=True)
