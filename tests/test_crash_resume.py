"""Exact resume after a crash, per technique: train, SIGKILL the process in the middle of epoch k + 1, resume with
``fit --ckpt_path last``, and compare with an uninterrupted run. Weights, optimizer state, callback state (temperature,
sparsity target, pruning counters, collapsed structure), loops and logged metrics must be identical on CPU.

Slow (a child process per technique): ``make test-slow``.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, TECHNIQUES, quiet, run_cli, summary, technique_args

KILL = ["--trainer.callbacks+=crash.KillAt", "--trainer.callbacks.epoch=2", "--trainer.callbacks.batch=1"]
TIMING = ("train_seconds", "seconds_per_epoch")


def checkpoint(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")


def same(x, y) -> bool:
    """Equal nested state: tensors bit for bit, NaN equal to NaN (a metric never measured), everything else by ==."""
    if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
        return isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.shape == y.shape and torch.equal(x, y)
    if isinstance(x, dict) and isinstance(y, dict):
        return x.keys() == y.keys() and all(same(x[k], y[k]) for k in x)
    if isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)):
        return len(x) == len(y) and all(same(a, b) for a, b in zip(x, y))
    if isinstance(x, float) and isinstance(y, float) and math.isnan(x):
        return math.isnan(y)
    return x == y


def callback_states(ckpt: dict) -> dict:
    """Callback states without the checkpoint callback's own (it holds the run's paths) and the crash."""
    return {k: v for k, v in ckpt["callbacks"].items() if "Checkpoint" not in k and "KillAt" not in k}


@pytest.mark.slow
@pytest.mark.parametrize("technique", TECHNIQUES)
def test_a_run_killed_mid_epoch_resumes_to_the_uninterrupted_result(technique, in_tmp):
    args = technique_args(technique)
    straight = run_cli("fit", *args, *quiet(in_tmp, "straight"))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests"), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    killed = subprocess.run([sys.executable, str(ROOT / "train.py"), "fit", *args, *KILL, *quiet(in_tmp, "crashed")],
                            cwd=in_tmp, env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-3000:]
    crashed = in_tmp / "crashed" / "version_0"
    assert checkpoint(crashed)["epoch"] == 1  # the last whole epoch before the kill
    resumed = run_cli("fit", *args, "--ckpt_path=last", *quiet(in_tmp, "crashed"))
    assert Path(resumed.trainer.log_dir) == crashed

    a, b = checkpoint(Path(straight.trainer.log_dir)), checkpoint(crashed)
    assert (a["epoch"], a["global_step"]) == (b["epoch"], b["global_step"])
    assert a["state_dict"].keys() == b["state_dict"].keys()
    different = [k for k in a["state_dict"] if not torch.equal(a["state_dict"][k], b["state_dict"][k])]
    assert not different, different
    assert same(a["optimizer_states"], b["optimizer_states"]) and same(a["lr_schedulers"], b["lr_schedulers"])
    assert same(callback_states(a), callback_states(b)), (callback_states(a), callback_states(b))
    assert same(a.get("morphlab", {}).get("epochs_trained"), b.get("morphlab", {}).get("epochs_trained"))
    first, second = summary(Path(straight.trainer.log_dir)), summary(crashed)
    assert same(first["metrics"], second["metrics"]), (first["metrics"], second["metrics"])
    assert first["params"] == second["params"]
    assert first["epochs"] == second["epochs"]
