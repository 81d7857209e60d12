"""A suite: technique configs x seeds, each run through ``train.py fit`` (the same LightningCLI) in a subprocess.

A suite file (``configs/suites/<name>.yaml``)::

    description: what it compares, and on which data
    seeds: [0, 1, 2]
    overrides: {trainer.max_epochs: 3}        # for every run (optional)
    experiments:
      - label: baseline                       # a row of the table, a directory under runs/
        config: configs/fashion_mnist/baseline.yaml    # or a list of configs, composed in order
        overrides: {model.init_args.lr_scheduler.init_args.T_max: 3}     # this experiment only (optional)
        search: {model.init_args.optimizer.init_args.lr: {log: [1.0e-4, 1.0e-2]}}   # compare.py tune (optional)
    tuning: {trials: 12, overrides: {trainer.max_epochs: 3}}   # compare.py tune: see comparison/tune.py (optional)

Runs live in ``results/<suite>/runs/<label>/seed<k>/`` (the usual run directory: TensorBoard events,
``config.yaml``, ``checkpoints/``, ``summary.json``) with the child's output in ``results/<suite>/logs/``.
A run is finished when its ``summary.json`` comes from a test. An unfinished run with a ``last.ckpt`` is resumed
from it (``fit --ckpt_path``), one without is started afresh, so an interrupted suite continues where it stopped.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
SUITE_KEYS = {"description", "seeds", "overrides", "experiments", "tuning"}
EXPERIMENT_KEYS = {"label", "config", "overrides", "search"}  # tuning, search: comparison/tune.py


@dataclass
class Experiment:
    label: str
    configs: list[Path]
    overrides: dict[str, Any] = field(default_factory=dict)
    search: dict[str, Any] | None = None  # its tuning search space (comparison/tune.py checks it)


@dataclass
class Suite:
    name: str
    description: str
    seeds: list[int]
    experiments: list[Experiment]
    overrides: dict[str, Any] = field(default_factory=dict)
    tuning: dict[str, Any] | None = None  # trials, budget and metric of `compare.py tune` (comparison/tune.py)

    def runs(self, only: list[str] | None = None, seeds: list[int] | None = None) -> list[tuple[Experiment, int]]:
        """(experiment, seed) pairs in suite order (experiments outer), restricted to ``only`` labels and ``seeds``."""
        if only:
            unknown = sorted(set(only) - {e.label for e in self.experiments})
            if unknown:
                raise SystemExit(f"--only: no experiment {unknown} in suite {self.name}; it has {[e.label for e in self.experiments]}.")
        return [(e, s) for e in self.experiments if not only or e.label in only for s in (seeds or self.seeds)]


def _fail(path: Path, message: str) -> SystemExit:
    return SystemExit(f"{path}: {message}")


def load_suite(path: Path) -> Suite:
    """Read and check a suite file; every mistake stops with one sentence naming the field."""
    if not path.is_file():
        raise SystemExit(f"no suite file {path}; the suites are {sorted(p.stem for p in (ROOT / 'configs/suites').glob('*.yaml'))}.")
    spec = yaml.safe_load(path.read_text()) or {}
    if not isinstance(spec, dict):
        raise _fail(path, "a suite is a mapping with keys description, seeds, overrides, experiments.")
    unknown = sorted(set(spec) - SUITE_KEYS)
    if unknown:
        raise _fail(path, f"unknown key(s) {unknown}; allowed: {sorted(SUITE_KEYS)}.")
    seeds = spec.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise _fail(path, f"seeds must be a non-empty list of integers, got {seeds!r}.")
    overrides = spec.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise _fail(path, f"overrides must be a mapping of dotted argument names to values, got {overrides!r}.")
    entries = spec.get("experiments")
    if not isinstance(entries, list) or not entries:
        raise _fail(path, "experiments must be a non-empty list of {label, config, overrides}.")
    experiments, labels = [], set()
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "label" not in entry or "config" not in entry:
            raise _fail(path, f"experiments[{i}] needs a label and a config, got {entry!r}.")
        unknown = sorted(set(entry) - EXPERIMENT_KEYS)
        if unknown:
            raise _fail(path, f"experiments[{i}] has unknown key(s) {unknown}; allowed: {sorted(EXPERIMENT_KEYS)}.")
        label = str(entry["label"])
        parts = label.split("/")
        if label in labels or not all(p.replace("_", "").replace("-", "").isalnum() for p in parts):
            raise _fail(path, f"experiments[{i}].label {label!r} must be unique and made of letters, digits, '-', '_' and '/'.")
        labels.add(label)
        configs = entry["config"] if isinstance(entry["config"], list) else [entry["config"]]
        configs = [ROOT / c for c in configs]
        missing = [str(c.relative_to(ROOT)) for c in configs if not c.is_file()]
        if missing:
            raise _fail(path, f"experiments[{i}] ({label}): no config file {missing}.")
        extra = entry.get("overrides") or {}
        if not isinstance(extra, dict):
            raise _fail(path, f"experiments[{i}].overrides must be a mapping, got {extra!r}.")
        experiments.append(Experiment(label, configs, extra, entry.get("search")))
    return Suite(path.stem, str(spec.get("description", "")).strip(), seeds, experiments, overrides, spec.get("tuning"))


def override_args(overrides: dict[str, Any]) -> list[str]:
    """``{"trainer.max_epochs": 3, "a.b": [1, 2]}`` -> ``["--trainer.max_epochs=3", "--a.b=[1, 2]"]``."""
    args = []
    for key, value in overrides.items():
        text = value if isinstance(value, str) else yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
        if text.endswith("\n...") or text.endswith("..."):  # safe_dump marks the end of a bare scalar document
            text = text.rsplit("\n", 1)[0].strip()
        args.append(f"--{key}={text}")
    return args


def fit_command(suite: Suite, experiment: Experiment) -> list[str]:
    """``python train.py fit --config ...`` with the suite's and the experiment's overrides (a run's or a trial's head)."""
    cmd = [sys.executable, str(ROOT / "train.py"), "fit"]
    cmd += [f"--config={c.relative_to(ROOT) if c.is_relative_to(ROOT) else c}" for c in experiment.configs]
    return cmd + override_args(suite.overrides) + override_args(experiment.overrides)


class Runner:
    """Run a suite's missing runs one after another, printing progress, then leave the summaries for the report."""

    def __init__(self, suite: Suite, results: Path, verbose: bool = False) -> None:
        self.suite, self.verbose = suite, verbose
        self.out = results / suite.name
        self.runs_dir, self.logs_dir = self.out / "runs", self.out / "logs"

    def log_path(self, experiment: Experiment, seed: int) -> Path:
        return self.logs_dir / f"{experiment.label.replace('/', '-')}-seed{seed}.log"

    def run_dir(self, experiment: Experiment, seed: int) -> Path:
        return self.runs_dir / experiment.label / f"seed{seed}"

    def test_summary(self, experiment: Experiment, seed: int) -> dict | None:
        """The run's ``summary.json`` if it comes from a test (the run is finished), else None."""
        path = self.run_dir(experiment, seed) / "summary.json"
        summary = json.loads(path.read_text()) if path.is_file() else {}
        return summary if summary.get("stage") == "test" and "test/acc" in summary.get("metrics", {}) else None

    def command(self, experiment: Experiment, seed: int) -> list[str]:
        """The ``train.py fit`` command line of one run (resuming from its ``last.ckpt`` when there is one)."""
        cmd = fit_command(self.suite, experiment) + [
            f"--seed_everything={seed}",
            f"--trainer.logger.init_args.save_dir={self.runs_dir}",
            f"--trainer.logger.init_args.name={experiment.label}",
            f"--trainer.logger.init_args.version=seed{seed}",
            f"--trainer.enable_progress_bar={str(self.verbose).lower()}",
        ]
        last = self.run_dir(experiment, seed) / "checkpoints" / "last.ckpt"
        if last.is_file():
            cmd.append(f"--ckpt_path={last}")
        return cmd

    def run(self, only: list[str] | None = None, seeds: list[int] | None = None, dry_run: bool = False) -> list[str]:
        """Run what is missing; returns the names of failed runs."""
        runs = self.suite.runs(only, seeds)
        todo = [(e, s) for e, s in runs if self.test_summary(e, s) is None]
        print(f"suite {self.suite.name}: {len(runs)} runs, {len(runs) - len(todo)} finished, {len(todo)} to run -> {self.out}", flush=True)
        failed, durations, start = [], [], time.perf_counter()
        for index, (experiment, seed) in enumerate(todo, 1):
            name = f"{experiment.label} seed {seed}"
            cmd = self.command(experiment, seed)
            if dry_run:
                print(" ".join(cmd))
                continue
            run_dir = self.run_dir(experiment, seed)
            resuming = any(a.startswith("--ckpt_path=") for a in cmd)
            if not resuming and run_dir.exists():  # killed before its first checkpoint: start clean
                shutil.rmtree(run_dir)
            eta = ""
            if durations:
                eta = f", about {_minutes(sum(durations) / len(durations) * (len(todo) - index + 1))} left"
            print(f"[{index}/{len(todo)}] {name}{' (resuming from last.ckpt)' if resuming else ''}{eta}", flush=True)
            seconds, code = self.execute(cmd, self.log_path(experiment, seed))
            durations.append(seconds)
            summary = self.test_summary(experiment, seed) if code == 0 else None
            if summary is not None:
                print(f"      done in {seconds:.0f} s: test acc {100 * summary['metrics']['test/acc']:.2f} %", flush=True)
            else:
                failed.append(name)
                print(f"      FAILED (exit {code}) after {seconds:.0f} s; the end of its log:", flush=True)
                log = self.log_path(experiment, seed).read_text(errors="replace").splitlines()
                print("\n".join("      | " + line for line in log[-15:]), flush=True)
        if todo and not dry_run:
            print(f"suite {self.suite.name}: ran {len(todo)} runs in {_minutes(time.perf_counter() - start)}, {len(failed)} failed", flush=True)
        return failed

    def execute(self, cmd: list[str], log_path: Path) -> tuple[float, int]:
        """Run one child, its output to ``log_path`` (and the terminal with ``verbose``); a heartbeat every minute."""
        log_path.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        with open(log_path, "w") as log:
            log.write(" ".join(cmd) + "\n\n")
            log.flush()
            # the child stays in our process group: Ctrl-C or a kill of the group stops the run with the suite
            child = subprocess.Popen(
                cmd, cwd=ROOT, stdout=None if self.verbose else log, stderr=None if self.verbose else subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
            try:
                while True:
                    try:
                        code = child.wait(timeout=60)
                        break
                    except subprocess.TimeoutExpired:
                        if not self.verbose:
                            print(f"      ... {_minutes(time.perf_counter() - start)} (tail -f {log_path})", flush=True)
            except BaseException:
                child.terminate()
                child.wait()
                raise
        return time.perf_counter() - start, code


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"
