"""compare.py tune: Optuna studies of train.py trials that survive a kill and can be shared by processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from comparison.suite import load_suite
from comparison.tune import Tuner, lookup, measure, parse_search, parse_tuning, recipe_point, tuner_of
from comparison.tuned import choose
from conftest import ROOT

BUDGET = {"trainer.max_epochs": 2, "trainer.enable_model_summary": False}


def write_suite(tmp_path: Path, trials: int, pruning: bool = False, **tuning) -> Path:
    suite = {
        "description": "tuning test",
        "seeds": [0],
        "tuning": {"trials": trials, "overrides": BUDGET, "metric": "val/acc_best", "pruning": pruning, **tuning},
        "experiments": [{"label": "baseline", "config": "configs/wine/baseline.yaml",
                         "search": {"model.init_args.optimizer.init_args.lr": {"log": [1e-4, 1e-1]}}}],
    }
    path = tmp_path / "tune_test.yaml"
    path.write_text(yaml.safe_dump(suite))
    return path


def trials_of(results: Path) -> list[optuna.trial.FrozenTrial]:
    study = optuna.load_study(study_name="tune_test/baseline", storage=f"sqlite:///{results / 'tune_test' / 'tuning.db'}")
    return study.get_trials(deepcopy=False)


@pytest.mark.parametrize("block, message", [
    ({"trials": 0}, "positive integer"),
    ({"trials": 3, "metric": "test/acc"}, "validation metric"),
    ({"trials": 3, "budget": {}}, "keys"),
    ({"trials": 3, "against": ["latency"], "pruning": True}, "prunes single-objective studies only"),
    ({"trials": 3, "against": ["speed"]}, "distinct costs from"),
    ({"trials": 3, "against": ["nonzero", "nonzero"]}, "distinct costs from"),
    ({"trials": 3, "against": ["nonzero"], "reference": {"latency": 2.0}}, "tuning.reference must map"),
])
def test_a_bad_tuning_block_is_refused_in_one_sentence(block, message):
    with pytest.raises(SystemExit, match=message):
        parse_tuning(block, "suite.yaml")


@pytest.mark.parametrize("space, message", [
    ({"a.lr": {"log": [0.0, 1.0]}}, "low > 0"),
    ({"a.lr": {"float": [1.0, 0.5]}}, "low < high"),
    ({"a.rank": {"int": [1.5, 4]}}, "integers"),
    ({"a.kind": {"choice": []}}, "non-empty list"),
    ({"a.lr": {"normal": [0, 1]}}, "must be one of"),
    ({}, "non-empty mapping"),
])
def test_a_bad_search_space_is_refused_in_one_sentence(space, message):
    with pytest.raises(SystemExit, match=message):
        parse_search(space, "suite.yaml")


def test_multi_objective_defaults_to_no_pruning_and_reads_the_deployed_measures():
    tuning = parse_tuning({"trials": 3, "metric": "deployed/val_acc", "against": ["latency", "nonzero"],
                           "reference": {"accuracy": 0.8, "nonzero": 1000}}, "suite.yaml")
    assert tuning.objectives == ["deployed/val_acc", "latency", "nonzero"] and tuning.pruning is False
    assert parse_tuning({"trials": 3}, "suite.yaml").pruning is True  # single objective: the median pruner
    summary = {"metrics": {"val/acc_best": 0.9}, "params": {"nonzero": 500}, "flops_per_sample": 64,
               "deployed": {"val_acc": 0.85, "nonzero": 400, "onnx": {"latency": {"ms": {"1": 0.1, "256": 2.5}}}}}
    assert [measure(summary, k) for k in ("deployed/val_acc", "latency", "nonzero", "flops", "val/acc_best")] == [0.85, 2.5, 400, 64, 0.9]
    assert measure({"metrics": {}}, "latency") is None and measure({"metrics": {"val/acc": float("nan")}}, "val/acc") is None


def test_the_best_and_the_knee_of_a_study():
    def trial(number, acc, size):
        return optuna.trial.create_trial(values=[acc, size], params={}, distributions={},
                                         user_attrs={"measures": {"deployed/val_acc": acc, "nonzero": size}})
    trials = [trial(i, acc, size) for i, (acc, size) in enumerate([(0.80, 10), (0.88, 20), (0.90, 100), (0.70, 50)])]
    for i, t in enumerate(trials):
        t.number = i
    chosen = choose(trials, "deployed/val_acc", "nonzero")
    assert chosen["best"].number == 2 and chosen["knee"].number == 1
    assert set(choose(trials[2:3], "deployed/val_acc", "nonzero")) == {"best"}  # a one-point front: its knee is the best


def test_a_suite_without_a_search_space_cannot_be_tuned(tmp_path):
    suite = load_suite(ROOT / "configs/suites/quick.yaml")
    with pytest.raises(SystemExit, match="no tuning block"):
        tuner_of(suite, tmp_path)


def test_the_recipe_point_is_read_as_jsonargparse_reads_a_dotted_key():
    config = {"model": {"class_path": "M", "init_args": {"lr": 0.001, "hidden": [64, 64], "wd": 0.0}},
              "trainer": {"callbacks": [{"class_path": "A", "init_args": {"target": 0.2}},
                                        {"class_path": "B", "init_args": {"target": 0.7}}]}}
    assert lookup(config, "model.init_args.lr") == (True, 0.001) and lookup(config, "model.lr") == (True, 0.001)
    assert lookup(config, "trainer.callbacks.target") == (True, 0.7)  # the last callback, as on the command line
    assert lookup(config, "model.init_args.rank") == (False, None)
    space = parse_search({"model.init_args.lr": {"log": [1e-4, 1e-2]}, "model.init_args.hidden": {"choice": ["[32]", "[64, 64]"]},
                          "trainer.callbacks.target": {"float": [0.5, 0.9]}, "model.init_args.wd": {"log": [1e-6, 1e-2]},
                          "model.init_args.rank": {"int": [2, 8]}}, "test")
    values, left = recipe_point(config, space)
    assert values == {"model.init_args.lr": 0.001, "model.init_args.hidden": "[64, 64]", "trainer.callbacks.target": 0.7}
    assert set(left) == {"model.init_args.wd", "model.init_args.rank"} and "outside" in left["model.init_args.wd"]
    assert recipe_point(config, parse_search({"model.init_args.hidden": {"choice": ["[32]"]}}, "t"))[0] == {}


@pytest.mark.slow
def test_trials_are_train_py_runs_with_the_sampled_values_and_a_rerun_continues(tmp_path):
    results = tmp_path / "results"
    tuner_of(load_suite(write_suite(tmp_path, trials=2)), results).run()
    first = trials_of(results)
    assert [t.state for t in first] == [TrialState.COMPLETE] * 2
    for trial in first:
        run_dir = results / "tune_test" / "tuning" / "baseline" / f"trial{trial.number}"
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert config["model"]["init_args"]["optimizer"]["init_args"]["lr"] == pytest.approx(trial.params["model.init_args.optimizer.init_args.lr"])
        assert config["trainer"]["max_epochs"] == 2 and config["test_after_fit"] is False
        log = (run_dir.parent / f"trial{trial.number}.log").read_text()
        assert log.splitlines()[0] == trial.user_attrs["command"] and "train.py fit" in log.splitlines()[0]
        record = json.loads((run_dir / "summary.json").read_text())
        assert not any(k.startswith("test/") for k in record["metrics"])  # validation only: no test
        assert (run_dir / "exported.onnx").is_file() and record["deployed"]["onnx"]["argmax_agree"]  # what ships, measured
        assert trial.user_attrs["measures"]["deployed/val_acc"] == record["deployed"]["val_acc"]
    assert first[0].params != first[1].params
    # the first trial is the recipe: configs/wine/baseline.yaml's own learning rate (moons/baseline -> adamw_cosine)
    lr = yaml.safe_load((ROOT / "configs/recipes/adamw_cosine.yaml").read_text())["model.init_args.optimizer"]["init_args"]["lr"]
    assert first[0].user_attrs["recipe"] == "whole" and first[0].params == {"model.init_args.optimizer.init_args.lr": lr}
    # a larger budget later: only the missing trial runs, the finished ones are not rerun or counted twice
    tuner_of(load_suite(write_suite(tmp_path, trials=3)), results).run()
    again = trials_of(results)
    assert [t.state for t in again] == [TrialState.COMPLETE] * 3
    assert [t.value for t in again[:2]] == [t.value for t in first]


def start_tune(suite: Path, results: Path, *extra: str) -> subprocess.Popen:
    """``compare.py tune`` in a process group of its own, its output in ``<suite>.<n>.out`` beside the suite file."""
    n = len(list(suite.parent.glob(f"{suite.name}.*.out")))
    out = open(suite.parent / f"{suite.name}.{n}.out", "w")
    return subprocess.Popen([sys.executable, str(ROOT / "compare.py"), "tune", str(suite), f"--results={results}", *extra],
                            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def outputs(suite: Path) -> str:
    return "\n".join(p.read_text()[-2000:] for p in sorted(suite.parent.glob(f"{suite.name}.*.out")))


@pytest.mark.slow
def test_a_killed_tune_continues_and_retries_the_trial_it_left_running(tmp_path):
    results, suite = tmp_path / "results", write_suite(tmp_path, trials=2)
    tune = start_tune(suite, results, "--grace=2")
    log = results / "tune_test" / "tuning" / "baseline" / "trial0.log"
    deadline = time.time() + 120
    while not (log.is_file() and "[data]" in log.read_text(errors="replace")) and time.time() < deadline:  # in its fit
        time.sleep(0.5)
    os.killpg(tune.pid, signal.SIGKILL)  # the tune process and its trial, as a crash or a lost machine would
    tune.wait()
    assert [t.state for t in trials_of(results)] == [TrialState.RUNNING]
    time.sleep(3)  # past the grace period: the trial's heartbeat has stopped
    assert start_tune(suite, results, "--grace=2").wait(timeout=300) == 0, outputs(suite)
    trials = trials_of(results)
    states = [t.state for t in trials]
    assert states.count(TrialState.COMPLETE) == 2 and states[0] == TrialState.FAIL
    retried = [t for t in trials if t.system_attrs.get("failed_trial") == trials[0].number]
    assert len(retried) == 1 and retried[0].params == trials[0].params  # the dead trial, run again as it was


@pytest.mark.slow
def test_two_tune_processes_share_the_studies(tmp_path):
    results, suite = tmp_path / "results", write_suite(tmp_path, trials=4)
    tunes = [start_tune(suite, results) for _ in range(2)]
    assert [t.wait(timeout=600) for t in tunes] == [0, 0], outputs(suite)
    trials = trials_of(results)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    # each process stops when the database holds 4 finished or running trials; two that finish together can
    # both start one more, so at most one trial over the budget, never one per process (which would be 8)
    assert 4 <= len(complete) <= 5
    assert len({t.number for t in trials}) == len(trials)
    hosts = {t.user_attrs["process"] for t in complete}
    assert len(hosts) == 2  # both processes ran trials of the one study


@pytest.mark.slow
def test_a_multi_objective_study_its_fronts_and_the_retrained_choices(tmp_path):
    """compare.py tune --retrain on a 3-objective study: every trial measures its deployed model, the recipe, best
    and knee are retrained and tested, and the report holds their figures, the fronts and the hparams table."""
    results = tmp_path / "results"
    suite = write_suite(tmp_path, trials=3, metric="deployed/val_acc", against=["latency", "nonzero"],
                        reference={"accuracy": 0.3})
    spec = yaml.safe_load(suite.read_text())
    spec["experiments"][0]["search"]["model.init_args.net.init_args.hidden"] = {"choice": ["[8]", "[64, 64]"]}
    suite.write_text(yaml.safe_dump(spec))
    run = subprocess.run([sys.executable, str(ROOT / "compare.py"), "tune", str(suite), f"--results={results}", "--retrain"],
                         cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    study = optuna.load_study(study_name="tune_test/baseline", storage=f"sqlite:///{results / 'tune_test' / 'tuning.db'}")
    assert len(study.directions) == 3
    trials = study.get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    assert all(t.values[0] == t.user_attrs["measures"]["deployed/val_acc"] for t in trials)
    out = results / "tune_test"
    retrained = sorted(p.parent.parent.name for p in (out / "tuned" / "baseline").glob("*/seed0/summary.json"))
    assert "recipe" in retrained and len(retrained) >= 2
    for name in retrained:
        record = json.loads((out / "tuned" / "baseline" / name / "seed0" / "summary.json").read_text())
        assert record["stage"] == "test" and 0 <= record["deployed"]["test_acc"] <= 1
    text = (out / "tuned.md").read_text()
    assert "| baseline | recipe | recipe | 1 |" in text and "hypervolume" in text
    assert (out / "fronts.png").stat().st_size > 10_000
    events = (out / "tuning" / "hparams" / "baseline").glob("trial*/events.out.tfevents.*")
    assert {p.parent.name for p in events} == {f"trial{t.number}" for t in trials}  # one hparams row per trial


@pytest.mark.parametrize("error, state", [
    ("train.py: error: the training loss became nan at or before global step 215 (epoch 10); lower the learning rate", TrialState.PRUNED),
    ("Traceback ...\nValueError: something broke", TrialState.FAIL),
])
def test_a_diverged_trial_is_stopped_not_failed(tmp_path, error, state):
    """A setting whose loss turns nan is an outcome of the search (counted, learnt from), a crash is a failure."""
    tuner = tuner_of(load_suite(write_suite(tmp_path, trials=1)), tmp_path / "results")
    experiment = tuner.suite.experiments[0]

    def execute(cmd, log):
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(" ".join(cmd) + "\n" + error + "\n")
        return 0.1, 2

    tuner.runner.execute = execute
    study = tuner.study(experiment)
    study.optimize(tuner.objective(experiment), n_trials=1, catch=(RuntimeError,))
    (trial,) = study.get_trials(deepcopy=False)
    assert trial.state == state and trial.user_attrs.get("diverged", False) == (state == TrialState.PRUNED)
