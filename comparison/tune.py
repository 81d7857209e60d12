"""Equal-budget tuning: one Optuna study per experiment of a suite, every trial an ordinary ``train.py fit``.

A suite opts in with a ``tuning`` block and a ``search`` space per experiment::

    tuning:
      trials: 12                               # complete (or pruned) trials per experiment: the same for all
      overrides: {trainer.max_epochs: 3}       # the per-trial budget, the same for all (on top of the suite's)
      metric: deployed/val_acc                 # maximised, from the trial's summary.json; validation only, never test
      against: [latency, nonzero]              # minimised too: a multi-objective study (optional; then no pruning)
      reference: {accuracy: 0.8, latency: 3.0, nonzero: 700000}   # the hypervolumes' common reference (optional)
      pruning: false                           # median pruner on val/acc after each epoch (single objective only)
    experiments:
      - label: lora
        config: configs/fashion_mnist/lora.yaml
        search:
          model.init_args.optimizer.init_args.lr: {log: [1.0e-4, 1.0e-2]}
          model.init_args.rank: {int: [2, 32]}
          model.init_args.dropout: {float: [0.0, 0.3]}
          model.init_args.target: {choice: [all-linear, last]}

The studies live in ``results/<suite>/tuning.db`` (SQLite through Optuna's RDB storage, ``--storage`` for a
database server): a killed ``tune`` continues when started again, a trial whose process died (no heartbeat for
``grace`` seconds) is marked failed and retried once with the same parameters, and several ``tune`` processes can
share the studies: Optuna counts the finished trials in the database (``MaxTrialsCallback``), so none is counted
twice. A new study's first trial is the recipe itself (its searched arguments at the experiment's own values, read
from ``train.py --print_config``), so tuning never ends below the recipe on validation. Trial ``k`` of experiment ``e`` runs in ``results/<suite>/tuning/<e>/trial<k>/`` with its log beside it,
headed by its command: ``python train.py fit ... --test_after_fit=false`` plus the sampled overrides.

Every trial ends with ``callbacks.DeployedValidation``: the deployed model's validation accuracy, its ONNX Runtime
latency and its nonzero parameters are the same measures for every technique (``MEASURES``), kept with the trial
whatever the study optimises, so the report (``comparison/tuned.py``) can draw each technique's Pareto fronts.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
import yaml
from lightning.pytorch import Callback
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState
from optuna_integration import PyTorchLightningPruningCallback

from comparison.suite import ROOT, Experiment, Runner, Suite, fit_command, override_args

# the heartbeat and its retry callback are marked experimental; Optuna's own per-trial INFO lines repeat ours
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
optuna.logging.set_verbosity(optuna.logging.WARNING)

KINDS = ("log", "float", "int", "choice")
TUNING_KEYS = {"trials", "overrides", "metric", "against", "reference", "pruning"}
# what a trial's summary.json says about the deployed model: minimised in a multi-objective study
COSTS = {
    "latency": ("ORT ms at batch 256", lambda s: s["deployed"]["onnx"]["latency"]["ms"]["256"]),
    "nonzero": ("nonzero parameters", lambda s: s.get("deployed", {}).get("nonzero", s["params"]["nonzero"])),
    "flops": ("FLOPs per sample", lambda s: s["flops_per_sample"]),
}
MAX_FAILURES = 3  # failed trials of one experiment in one tune process before it gives up on that experiment
DIVERGED = "the training loss became "  # then nan or inf: train.py's one-line error when a run diverges (lightning_modules/base.py)
SEED = 0  # the sampler's and every trial's seed: the studies differ in their search spaces only


@dataclass
class Tuning:
    trials: int
    overrides: dict[str, Any]
    metric: str = "val/acc_best"
    pruning: bool = True
    against: list[str] = field(default_factory=list)
    reference: dict[str, float] = field(default_factory=dict)

    @property
    def objectives(self) -> list[str]:
        return [self.metric, *self.against]


def measure(summary: dict[str, Any], name: str) -> float | None:
    """One objective's value from a trial's ``summary.json``: a cost of ``COSTS``, ``deployed/val_acc`` (the deployed
    model's validation accuracy) or a logged metric; None when the run did not measure it."""
    try:
        if name in COSTS:
            value = COSTS[name][1](summary)
        elif name.startswith("deployed/"):
            value = summary["deployed"][name.split("/", 1)[1]]
        else:
            value = summary["metrics"][name]
    except (KeyError, TypeError):
        return None
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def parse_tuning(block: Any, where: str) -> Tuning:
    """The suite's ``tuning`` block, checked; a mistake stops with one sentence naming the field."""
    if not isinstance(block, dict) or sorted(set(block) - TUNING_KEYS):
        raise SystemExit(f"{where}: tuning must be a mapping with keys {sorted(TUNING_KEYS)}, got {block!r}.")
    trials = block.get("trials")
    if not isinstance(trials, int) or isinstance(trials, bool) or trials < 1:
        raise SystemExit(f"{where}: tuning.trials must be a positive integer, got {trials!r}.")
    overrides = block.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise SystemExit(f"{where}: tuning.overrides must be a mapping of dotted argument names, got {overrides!r}.")
    metric = block.get("metric", "val/acc_best")
    if not isinstance(metric, str) or not (metric.startswith("val/") or metric == "deployed/val_acc"):
        raise SystemExit(f"{where}: tuning.metric must be a validation metric (val/... or deployed/val_acc), got "
                         f"{metric!r}; tuning on test would leak the test split into the choice.")
    against = block.get("against") or []
    if not isinstance(against, list) or not set(against) <= set(COSTS) or len(set(against)) != len(against):
        raise SystemExit(f"{where}: tuning.against must be a list of distinct costs from {sorted(COSTS)}, got {against!r}.")
    pruning = bool(block.get("pruning", not against))
    if against and pruning:
        raise SystemExit(f"{where}: tuning.pruning cannot be true with tuning.against: Optuna prunes single-objective "
                         "studies only (a multi-objective trial cannot report intermediate values); set pruning: false.")
    reference = block.get("reference") or {}
    names = {"accuracy", *against}
    if not isinstance(reference, dict) or not set(reference) <= names or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in reference.values()):
        raise SystemExit(f"{where}: tuning.reference must map some of {sorted(names)} to numbers, got {reference!r}.")
    return Tuning(trials, overrides, metric, pruning, list(against), {k: float(v) for k, v in reference.items()})


def parse_search(space: Any, where: str) -> dict[str, tuple[str, list]]:
    """``{dotted.key: {kind: args}}`` -> ``{dotted.key: (kind, args)}``; kinds: ``log``/``float``/``int`` take
    ``[low, high]`` (low < high, log: low > 0), ``choice`` a non-empty list."""
    if not isinstance(space, dict) or not space:
        raise SystemExit(f"{where}: search must be a non-empty mapping of dotted argument names to {{kind: range}}.")
    parsed = {}
    for key, spec in space.items():
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in KINDS:
            raise SystemExit(f"{where}: search.{key} must be one of {{log|float|int: [low, high]}} or {{choice: [...]}}, got {spec!r}.")
        kind, args = next(iter(spec.items()))
        if kind == "choice":
            if not isinstance(args, list) or not args:
                raise SystemExit(f"{where}: search.{key}.choice must be a non-empty list, got {args!r}.")
        else:
            numbers = isinstance(args, list) and len(args) == 2 and all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)
            if not numbers or not args[0] < args[1] or (kind == "log" and args[0] <= 0) or (kind == "int" and not all(isinstance(a, int) for a in args)):
                raise SystemExit(f"{where}: search.{key}.{kind} must be [low, high] with low < high"
                                 f"{' and low > 0' if kind == 'log' else ''}{' (integers)' if kind == 'int' else ''}, got {args!r}.")
        parsed[str(key)] = (kind, args)
    return parsed


def describe(params: dict[str, Any]) -> str:
    """``{"model.init_args.lr": 0.00123, "x.r": 8}`` -> ``"lr=0.00123, r=8"`` (a report's "values" cell)."""
    return ", ".join(f"{k.rsplit('.', 1)[-1]}={v:.3g}" if isinstance(v, float) else f"{k.rsplit('.', 1)[-1]}={v}"
                     for k, v in params.items())


def suggest(trial: optuna.Trial, space: dict[str, tuple[str, list]]) -> dict[str, Any]:
    """One value per searched argument, drawn by the study's sampler."""
    values = {}
    for key, (kind, args) in space.items():
        if kind == "choice":
            values[key] = trial.suggest_categorical(key, args)
        elif kind == "int":
            values[key] = trial.suggest_int(key, args[0], args[1])
        else:
            values[key] = trial.suggest_float(key, float(args[0]), float(args[1]), log=kind == "log")
    return values


def lookup(config: dict[str, Any], key: str) -> tuple[bool, Any]:
    """``(found, value)`` of a dotted argument in a printed config, read as jsonargparse reads the key on the command
    line: a list (``trainer.callbacks``) stands for its last element, and a class's arguments may skip ``init_args``."""
    node: Any = config
    for part in key.split("."):
        if isinstance(node, list) and node:
            node = node[-1]
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, dict) and isinstance(node.get("init_args"), dict) and part in node["init_args"]:
            node = node["init_args"][part]
        else:
            return False, None
    return True, node


def recipe_point(config: dict[str, Any], space: dict[str, tuple[str, list]]) -> tuple[dict[str, Any], dict[str, str]]:
    """The searched arguments' values in a resolved config, as the space's values (a choice as written in the suite):
    ``(values, {argument: why it is left to the sampler})`` for a value the space cannot hold."""
    values, left = {}, {}
    for key, (kind, args) in space.items():
        found, value = lookup(config, key)
        if not found:
            left[key] = "not in the experiment's config"
        elif kind == "choice":
            same = [c for c in args if (yaml.safe_load(c) if isinstance(c, str) else c) == value]
            if same:
                values[key] = same[0]
            else:
                left[key] = f"{value!r} is not among the choices"
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or (kind == "int" and not isinstance(value, int)):
            left[key] = f"{value!r} is not a number of kind {kind}"
        elif not args[0] <= value <= args[1]:
            left[key] = f"{value!r} lies outside [{args[0]}, {args[1]}]"
        else:
            values[key] = value
    return values, left


class StudyPruning(PyTorchLightningPruningCallback):
    """optuna-integration's pruning callback inside a trial's own ``train.py`` process: it reopens the trial from
    the study's storage. A pruned trial stops training (``trainer.should_stop``) and writes ``pruned.json`` in the
    run directory instead of raising through Lightning; ``tune`` marks the trial pruned from that file."""

    def __init__(self, storage: str, study: str, trial: int, monitor: str = "val/acc") -> None:
        study_ = optuna.load_study(study_name=study, storage=storage)
        trial_id = next(t._trial_id for t in study_.get_trials(deepcopy=False) if t.number == trial)
        super().__init__(optuna.trial.Trial(study_, trial_id), monitor)

    def on_validation_end(self, trainer, pl_module) -> None:
        try:
            super().on_validation_end(trainer, pl_module)
        except optuna.TrialPruned:
            trainer.should_stop = True
            if trainer.is_global_zero and trainer.log_dir:
                Path(trainer.log_dir, "pruned.json").write_text(json.dumps({"epoch": pl_module.current_epoch}) + "\n")


class Tuner:
    """Run (or continue) the studies of a suite's experiments; ``grace``: seconds without a heartbeat after which a
    RUNNING trial counts as dead (failed, then retried)."""

    def __init__(self, suite: Suite, tuning: Tuning, spaces: dict[str, dict], results: Path, storage: str | None = None,
                 grace: int = 120) -> None:
        self.suite, self.tuning, self.spaces = suite, tuning, spaces
        self.out = results / suite.name
        self.url = storage or f"sqlite:///{self.out / 'tuning.db'}"
        self.grace = grace
        self.runner = Runner(suite, results)

    def storage(self, attempts: int = 5) -> RDBStorage:
        """The studies' storage. SQLite: writers wait up to 60 s for the file's lock (the default is 5 s), and two
        processes creating a new database's tables at once get an OperationalError, after which one retries."""
        self.out.mkdir(parents=True, exist_ok=True)
        engine = {"connect_args": {"timeout": 60}} if self.url.startswith("sqlite") else None
        for attempt in range(attempts):
            try:
                return RDBStorage(self.url, engine_kwargs=engine, heartbeat_interval=max(1, self.grace // 4),
                                  grace_period=self.grace,
                                  heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1))
            except sqlalchemy.exc.OperationalError:
                if attempt == attempts - 1:
                    raise
                time.sleep(1 + attempt)

    def study(self, experiment: Experiment, storage: RDBStorage | None = None) -> optuna.Study:
        pruner = optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1) if self.tuning.pruning else optuna.pruners.NopPruner()
        directions = ["maximize"] + ["minimize"] * len(self.tuning.against)
        return optuna.create_study(storage=storage or self.storage(), study_name=f"{self.suite.name}/{experiment.label}",
                                   directions=directions, sampler=optuna.samplers.TPESampler(seed=SEED), pruner=pruner,
                                   load_if_exists=True)

    def trial_dir(self, experiment: Experiment, number: int) -> Path:
        return self.out / "tuning" / experiment.label / f"trial{number}"

    def command(self, experiment: Experiment, number: int, values: dict[str, Any]) -> list[str]:
        """The ``train.py fit`` command of one trial: the experiment, the tuning budget, the sampled values."""
        cmd = fit_command(self.suite, experiment) + override_args(self.tuning.overrides) + override_args(values)
        run_dir = self.trial_dir(experiment, number)
        cmd += [f"--seed_everything={SEED}", "--test_after_fit=false", "--trainer.enable_progress_bar=false",
                f"--trainer.logger.init_args.save_dir={self.out / 'tuning'}",
                f"--trainer.logger.init_args.name={experiment.label}", f"--trainer.logger.init_args.version={run_dir.name}",
                "--trainer.callbacks+=callbacks.DeployedValidation"]
        if self.tuning.pruning:
            cmd += ["--trainer.callbacks+=comparison.tune.StudyPruning", f"--trainer.callbacks.storage={self.url}",
                    f"--trainer.callbacks.study={self.suite.name}/{experiment.label}", f"--trainer.callbacks.trial={number}"]
        return cmd

    def start_from_recipe(self, study: optuna.Study, experiment: Experiment) -> None:
        """Enqueue the recipe as a new study's first trial: the experiment's own values of the searched arguments at
        the tuning budget, read from ``train.py fit ... --print_config`` (jsonargparse's own resolution)."""
        cmd = fit_command(self.suite, experiment) + override_args(self.tuning.overrides) + ["--print_config"]
        printed = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if printed.returncode != 0:
            raise SystemExit(f"{experiment.label}: {' '.join(cmd)} failed:\n{printed.stderr[-2000:]}")
        values, left = recipe_point(yaml.safe_load(printed.stdout), self.spaces[experiment.label])
        for key, why in left.items():
            print(f"      the recipe's {key} is left to the sampler: {why}", flush=True)
        if values:
            study.enqueue_trial(values, user_attrs={"recipe": "partial" if left else "whole"}, skip_if_exists=True)

    def objective(self, experiment: Experiment):
        failures = []

        def run_trial(trial: optuna.Trial) -> float | list[float]:
            values = suggest(trial, self.spaces[experiment.label])
            run_dir = self.trial_dir(experiment, trial.number)
            cmd = self.command(experiment, trial.number, values)
            trial.set_user_attr("command", " ".join(cmd))
            trial.set_user_attr("process", f"{socket.gethostname()}:{os.getpid()}")
            seconds, code = self.runner.execute(cmd, run_dir.parent / f"trial{trial.number}.log")
            summary_path = run_dir / "summary.json"
            summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
            measures = {name: measure(summary, name) for name in ("deployed/val_acc", *COSTS, self.tuning.metric)}
            values_out = [measures[name] for name in self.tuning.objectives]
            value = values_out[0]
            trial.set_user_attr("seconds", round(seconds, 1))
            trial.set_user_attr("measures", measures)
            if (run_dir / "pruned.json").is_file():
                print(f"      trial {trial.number}: pruned after {seconds:.0f} s", flush=True)
                raise optuna.TrialPruned()
            log = run_dir.parent / f"trial{trial.number}.log"
            if code != 0 and DIVERGED in log.read_text(errors="replace")[-4000:]:
                # a setting that diverges is an outcome of the search, not a broken experiment: it counts as a
                # stopped trial (the budget counts it, the samplers learn from it) and not toward MAX_FAILURES
                trial.set_user_attr("diverged", True)
                print(f"      trial {trial.number}: diverged (loss nan or inf) after {seconds:.0f} s  {values}", flush=True)
                raise optuna.TrialPruned()
            if code != 0 or any(v is None for v in values_out):
                failures.append(trial.number)
                if len(failures) >= MAX_FAILURES:
                    trial.study.stop()  # a broken experiment must not loop: its failed trials are not counted
                raise RuntimeError(f"trial {trial.number} of {experiment.label} failed (exit {code}); its log: "
                                   f"{run_dir.parent / f'trial{trial.number}.log'}")
            costs = "".join(f", {name} {v:.4g}" for name, v in zip(self.tuning.against, values_out[1:]))
            what = " (the recipe)" if trial.user_attrs.get("recipe") else ""
            print(f"      trial {trial.number}{what}: {self.tuning.metric} {value:.4f}{costs} in {seconds:.0f} s  {values}", flush=True)
            return value if not self.tuning.against else values_out

        return run_trial

    def run(self, only: list[str] | None = None, timeout: float | None = None) -> None:
        storage = self.storage()
        for experiment, _ in self.suite.runs(only, seeds=[SEED]):
            study = self.study(experiment, storage)
            done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))
            print(f"{study.study_name}: {done}/{self.tuning.trials} trials done", flush=True)
            if done >= self.tuning.trials:
                continue
            if not study.get_trials(deepcopy=False):
                self.start_from_recipe(study, experiment)
            # stop when the database holds the budget in finished, running (another process's) or waiting (a retry)
            # trials: processes sharing a study stop together instead of each running the whole budget
            counted = optuna.study.MaxTrialsCallback(
                self.tuning.trials, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING))
            study.optimize(self.objective(experiment), timeout=timeout, callbacks=[counted], catch=(RuntimeError,))

    def report(self) -> str:
        """``tuning.md``: per experiment the finished trials, the best on the metric, its values and its time."""
        storage = self.storage()
        lines = [f"| experiment | trials complete / pruned / failed | best {self.tuning.metric} | best trial | its values | trial time (s) |",
                 "|---|--:|--:|--:|---|--:|"]
        for experiment in self.suite.experiments:
            trials = self.study(experiment, storage).get_trials(deepcopy=False)
            count = {state: sum(t.state == state for t in trials) for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
            complete = [t for t in trials if t.state == TrialState.COMPLETE]
            seconds = sum(t.user_attrs.get("seconds", 0.0) for t in trials)
            counts = " / ".join(str(count[s]) for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL))
            if not complete:
                lines.append(f"| {experiment.label} | {counts} | - | - | - | {seconds:.0f} |")
                continue
            best = max(complete, key=lambda t: t.values[0])
            values = describe(best.params)
            lines.append(f"| {experiment.label} | {counts} | {best.values[0]:.4f} | {best.number} | {values} | {seconds:.0f} |")
        table = "\n".join(lines)
        text = (f"Suite `{self.suite.name}`: {self.tuning.trials} trials per experiment, budget {self.tuning.overrides}, "
                f"chosen on {self.tuning.metric}.\n\n{table}\n")
        replace_file(self.out / "tuning.md", lambda path: path.write_text(text))
        return table


def replace_file(path: Path, write: Callable[[Path], object]) -> None:
    """``write`` a file under a name of this process, then rename it to ``path`` (atomic: two tune processes that
    report at once never interleave their bytes)."""
    part = path.with_name(f".{path.name}.{os.getpid()}")
    write(part)
    os.replace(part, path)


def tuner_of(suite: Suite, results: Path, storage: str | None = None, grace: int = 120, trials: int | None = None) -> Tuner:
    """The ``Tuner`` of a suite with a ``tuning`` block and a ``search`` space for every experiment."""
    where = f"configs/suites/{suite.name}.yaml"
    if suite.tuning is None:
        raise SystemExit(f"{where} has no tuning block (trials, overrides, metric); see comparison/tune.py.")
    tuning = parse_tuning(suite.tuning, where)
    if trials is not None:
        tuning.trials = trials
    missing = [e.label for e in suite.experiments if e.search is None]
    if missing:
        raise SystemExit(f"{where}: experiment(s) {missing} have no search space; every tuned experiment needs one.")
    spaces = {e.label: parse_search(e.search, f"{where} ({e.label})") for e in suite.experiments}
    return Tuner(suite, tuning, spaces, results, storage, grace)
