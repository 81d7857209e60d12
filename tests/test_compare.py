"""The comparison harness: suite files, the report (table, CSV, plots, README block), latency, and a suite that
is killed midway and rerun finishing only the missing runs."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import compare
from comparison.report import collect, markdown_table, mean_std, splice_readme
from comparison.suite import Runner, load_suite, override_args
from conftest import ROOT, run_cli
from models.latency import measure_latency

SUITES = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs/suites").glob("*.yaml"))


def write_suite(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --- suite files ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, message",
    [
        ("experiments: [{label: a, config: configs/moons/baseline.yaml}]\nseed: [0]\n", "unknown key(s) ['seed']"),
        ("seeds: 0\nexperiments: [{label: a, config: configs/moons/baseline.yaml}]\n", "seeds must be a non-empty list"),
        ("seeds: [0]\nexperiments: []\n", "experiments must be a non-empty list"),
        ("experiments: [{label: a, config: configs/moons/nope.yaml}]\n", "no config file ['configs/moons/nope.yaml']"),
        ("experiments: [{config: configs/moons/baseline.yaml}]\n", "experiments[0] needs a label and a config"),
        ("experiments: [{label: a, config: configs/moons/baseline.yaml, seeds: [1]}]\n", "experiments[0] has unknown key(s) ['seeds']"),
        ("experiments: [{label: a, config: configs/moons/baseline.yaml}, {label: a, config: configs/moons/baseline.yaml}]\n",
         "label 'a' must be unique"),
        ("experiments: [{label: 'a b', config: configs/moons/baseline.yaml}]\n", "made of letters, digits"),
        ("overrides: [--trainer.max_epochs, 3]\nexperiments: [{label: a, config: configs/moons/baseline.yaml}]\n",
         "overrides must be a mapping"),
    ],
)
def test_a_bad_suite_stops_with_one_sentence_naming_the_field(tmp_path, text, message):
    with pytest.raises(SystemExit) as error:
        load_suite(write_suite(tmp_path / "bad.yaml", text))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_missing_suite_lists_the_suites():
    with pytest.raises(SystemExit, match="the suites are .*'quick'"):
        load_suite(ROOT / "configs/suites/nope.yaml")


def test_overrides_become_cli_arguments():
    args = override_args({"trainer.max_epochs": 3, "a.widths": [16, 64], "a.on": True, "a.s": "rt-snippets",
                          "a.x": 0.5, "a.d": {"class_path": "m.C", "init_args": {"k": 1}}})
    assert args == ["--trainer.max_epochs=3", "--a.widths=[16, 64]", "--a.on=true", "--a.s=rt-snippets", "--a.x=0.5",
                    "--a.d={class_path: m.C, init_args: {k: 1}}"]


def test_only_and_seeds_select_runs_and_an_unknown_label_is_refused(tmp_path):
    suite = load_suite(write_suite(tmp_path / "s.yaml", "seeds: [0, 1, 2]\nexperiments:\n"
                                   "  - {label: a, config: configs/moons/baseline.yaml}\n"
                                   "  - {label: b, config: configs/moons/morphonet.yaml}\n"))
    assert [(e.label, s) for e, s in suite.runs()] == [("a", 0), ("a", 1), ("a", 2), ("b", 0), ("b", 1), ("b", 2)]
    assert [(e.label, s) for e, s in suite.runs(["b"], [1])] == [("b", 1)]
    with pytest.raises(SystemExit, match=r"no experiment \['c'\]"):
        suite.runs(["c"])


@pytest.mark.parametrize("suite_file", SUITES)
def test_every_suite_run_parses_with_its_overrides(suite_file, capsys):
    """Each experiment of every suite, with the suite's and its own overrides, is a valid train.py command."""
    suite = load_suite(ROOT / suite_file)
    runner = Runner(suite, Path("/nonexistent/results"))
    assert {"quick", "fashion_mnist", "mnist5k", "tabular", "rt_snippets", "cifar10"} <= {Path(s).stem for s in SUITES}
    for experiment in suite.experiments:
        args = runner.command(experiment, suite.seeds[0])[3:]
        with pytest.raises(SystemExit) as exit_info:
            run_cli("fit", *args, "--print_config")
        assert exit_info.value.code in (0, None), f"{suite_file}: {experiment.label}"
        printed = capsys.readouterr().out
        assert f"name: {experiment.label}" in printed and f"version: seed{suite.seeds[0]}" in printed
        for key, value in {**suite.overrides, **experiment.overrides}.items():
            leaf = key.split(".")[-1]
            if key.endswith("+"):  # an appended callback: its class is in the list
                assert f"class_path: {value}" in printed, f"{suite_file}: {experiment.label}: {key} not applied"
            elif not isinstance(value, (dict, list)):
                assert f"{leaf}: {value}" in printed, f"{suite_file}: {experiment.label}: {key} not applied"


# --- report -------------------------------------------------------------------------------------------------
def fake_run(root: Path, label: str, seed: int, acc: float, trainable: int, stage: str = "test") -> None:
    run = root / label / f"seed{seed}"
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({
        "technique": label.split("_")[0], "dataset": "fashion_mnist", "seed": seed, "stage": stage,
        "metrics": {"test/acc": acc} if stage == "test" else {"val/acc": acc},
        "params": {"total": 2 * trainable, "trainable": trainable, "nonzero": trainable + seed, "dense_equivalent": 3 * trainable},
        "flops_per_sample": 10 * trainable, "model_bytes": 8 * trainable, "epochs": 3, "train_seconds": 30.0,
        "seconds_per_epoch": 10.0 + seed,
        "latency": {"threads": 2, "ms": {"1": 0.1 * (seed + 1), "256": 2.0 * (seed + 1)}},
        **({"deploy": {"onnx": {"max_abs_diff": 1e-7, "latency": {"threads": 2, "ms": {"1": 0.05 * (seed + 1), "256": 1.5}}}}}
           if label == "zeta" else {}),
    }))


def test_report_writes_table_csv_plot_and_readme_block(tmp_path):
    results = tmp_path / "results"
    suite = load_suite(write_suite(tmp_path / "mini.yaml", "seeds: [0, 1, 2]\nexperiments:\n"
                                   "  - {label: zeta, config: configs/moons/baseline.yaml}\n"
                                   "  - {label: alpha, config: configs/moons/morphonet.yaml}\n"))
    runs = results / "mini" / "runs"
    for seed, acc in enumerate([0.80, 0.82, 0.84]):
        fake_run(runs, "zeta", seed, acc, 1000)
    fake_run(runs, "alpha", 0, 0.70, 50_000)
    fake_run(runs, "alpha", 1, 0.99, 50_000, stage="fit")  # unfinished: not reported
    fake_run(runs, "stray", 0, 0.5, 10)  # not in the suite: not reported
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- suite:mini:begin -->\nold\n<!-- suite:mini:end -->\nafter\n")

    table = compare.report(suite, results, readme)

    rows = [line for line in table.splitlines() if line.startswith("| zeta") or line.startswith("| alpha")]
    assert [r.split(" | ")[0] for r in rows] == ["| zeta", "| alpha"]  # suite order, not alphabetical
    zeta = [c.strip() for c in rows[0].split("|")]
    assert zeta[3] == "3" and zeta[4] == "82.00 ± 2.00"  # seeds, accuracy mean ± sample std
    assert zeta[5:10] == ["2k", "1k", "1k", "10k", "8kB"]  # total, trainable, mean nonzero (1001), FLOPs, bytes
    assert zeta[10] == "11.0 ± 1.0" and zeta[11] == "0.200" and zeta[12] == "4.00"  # s/epoch, median latency b1, b256
    assert zeta[13:15] == ["0.100", "1.50"]  # median ONNX Runtime latency b1, b256
    alpha = [c.strip() for c in rows[1].split("|")]
    assert alpha[13:15] == ["-", "-"]  # a run without an exported.onnx
    with open(results / "mini" / "results.csv") as handle:
        records = list(csv.DictReader(handle))
    assert len(records) == 4 and {r["experiment"] for r in records} == {"zeta", "alpha"}
    png = (results / "mini" / "tradeoff.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    assert list((results / "mini" / "tensorboard").glob("events.out.tfevents.*"))
    text = readme.read_text()
    assert text.startswith("intro\n<!-- suite:mini:begin -->\nSuite `mini`") and text.endswith("<!-- suite:mini:end -->\nafter\n")
    assert "old" not in text and "![mini trade-off](results/mini/tradeoff.png)" in text and "| zeta |" in text


def test_report_keeps_the_runs_of_results_csv_whose_directories_are_elsewhere(tmp_path):
    """A fresh checkout has results.csv but no run directories: a report after a partial rerun keeps the other
    rows (same table as before) and takes a rerun row from its new run directory."""
    results = tmp_path / "results"
    suite = load_suite(write_suite(tmp_path / "mini.yaml", "seeds: [0, 1]\nexperiments:\n"
                                   "  - {label: zeta, config: configs/moons/baseline.yaml}\n"))
    runs = results / "mini" / "runs"
    fake_run(runs, "zeta", 0, 0.80, 1000)
    fake_run(runs, "zeta", 1, 0.84, 1000)
    before = compare.report(suite, results)
    shutil.rmtree(runs)  # the run directories of another checkout: not here
    assert compare.report(suite, results) == before
    fake_run(runs, "zeta", 1, 0.90, 1000)  # seed 1 rerun here
    table = compare.report(suite, results)
    assert "| zeta | zeta | 2 | 85.00 ± 7.07 |" in table  # seed 0 from the CSV, seed 1 from its new run
    with open(results / "mini" / "results.csv") as handle:
        assert sorted(r["run"] for r in csv.DictReader(handle)) == ["seed0", "seed1"]


def test_mean_std_and_the_table_of_any_directory(tmp_path):
    assert mean_std([0.5, None], 100) == "50.00" and mean_std([]) == "-" and mean_std([1.0, 3.0]) == "2.00 ± 1.41"
    fake_run(tmp_path, "a", 0, 0.5, 10)
    assert "| a | a | 1 | 50.00 |" in markdown_table(collect(tmp_path))


# --- latency ------------------------------------------------------------------------------------------------
class DictNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, batch: dict) -> torch.Tensor:
        assert batch["x"].shape[0] == batch["mask"].shape[0]
        return self.linear(batch["x"] * batch["mask"])


def test_latency_is_a_median_per_batch_size_and_leaves_the_model_as_it_was():
    model = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.5), nn.Linear(16, 2)).train()
    calls = []
    model.register_forward_hook(lambda m, args, out: calls.append((m.training, args[0].shape[0])))
    result = measure_latency(model, (torch.zeros(1, 8),), batch_sizes=(1, 32), warmup=2, repeats=5)
    assert model.training and all(not training for training, _ in calls)  # measured in eval mode, restored after
    assert [b for _, b in calls] == [1] * 7 + [32] * 7  # warm-up + repeats per batch size
    assert result["threads"] == torch.get_num_threads() and result["repeats"] == {"1": 5, "32": 5}
    assert result["ms"]["32"] > 0 and result["ms_per_sample"]["32"] == pytest.approx(result["ms"]["32"] / 32, rel=1e-2)
    quick = measure_latency(model, torch.zeros(1, 8), batch_sizes=(4,), warmup=0, repeats=50, min_repeats=3, budget_seconds=0.0)
    assert quick["repeats"] == {"4": 3}  # the budget stops early, never below min_repeats
    dict_input = ({"x": torch.ones(1, 4), "mask": torch.ones(1, 4)},)
    assert measure_latency(DictNet(), dict_input, batch_sizes=(16,), warmup=1, repeats=2)["repeats"] == {"16": 2}


# --- a suite killed midway --------------------------------------------------------------------------------------
KILL_SUITE = """seeds: [0]
overrides: {trainer.enable_model_summary: false}
experiments:
  - {label: first, config: configs/moons/baseline.yaml, overrides: {trainer.max_epochs: 2}}
  - {label: second, config: configs/digits/baseline.yaml, overrides: {trainer.max_epochs: 400, model.init_args.lr_scheduler.init_args.T_max: 400}}
"""


def compare_cmd(*args: str) -> list[str]:
    return [sys.executable, str(ROOT / "compare.py"), *args]


@pytest.mark.slow  # about 2 min: real runs in subprocesses (make test-reliability)
def test_a_suite_killed_midway_reruns_only_what_is_missing(tmp_path):
    suite_file = write_suite(tmp_path / "kill.yaml", KILL_SUITE)
    results = tmp_path / "results"
    first = results / "kill" / "runs" / "first" / "seed0"
    second = results / "kill" / "runs" / "second" / "seed0"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    suite = subprocess.Popen(compare_cmd("run", str(suite_file), "--results", str(results)), cwd=tmp_path, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, text=True)
    try:  # kill the whole suite (parent and child) once the second run has written its first last.ckpt
        deadline = time.time() + 240
        while not (second / "checkpoints" / "last.ckpt").is_file():
            assert suite.poll() is None, suite.stdout.read()
            assert time.time() < deadline, "the second run never wrote a checkpoint"
            time.sleep(0.2)
    finally:
        os.killpg(suite.pid, signal.SIGKILL)
        suite.wait()
    finished_first = (first / "summary.json").stat().st_mtime_ns
    assert json.loads((first / "summary.json").read_text())["stage"] == "test"
    assert not (second / "summary.json").is_file() or json.loads((second / "summary.json").read_text())["stage"] != "test"

    # rerun with the second run shortened to two more epochs: it resumes from its last.ckpt, the first one is untouched
    epochs = torch.load(second / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")["epoch"] + 1 + 2
    write_suite(suite_file, KILL_SUITE.replace("max_epochs: 400", f"max_epochs: {epochs}"))
    rerun = subprocess.run(compare_cmd("run", str(suite_file), "--results", str(results)), cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "2 runs, 1 finished, 1 to run" in rerun.stdout and "[1/1] second seed 0 (resuming from last.ckpt)" in rerun.stdout
    assert (first / "summary.json").stat().st_mtime_ns == finished_first
    done = json.loads((second / "summary.json").read_text())
    assert done["stage"] == "test" and done["epochs"] == epochs and done["latency"]["threads"] == 1
    assert set(done["latency"]["ms"]) == {"1", "256"}
    rows = list(csv.DictReader(open(results / "kill" / "results.csv")))
    assert sorted(r["experiment"] for r in rows) == ["first", "second"]

    again = subprocess.run(compare_cmd("run", str(suite_file), "--results", str(results), "--only", "first"), cwd=tmp_path,
                           env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "1 runs, 1 finished, 0 to run" in again.stdout
