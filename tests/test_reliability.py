"""Reliability: a kill during a checkpoint write, deterministic reruns, a NaN loss that stops and says where."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, quiet, run_cli, summary

MOONS = ["--config", str(ROOT / "configs/moons/baseline.yaml"), "--model.init_args.net.init_args.dropout=0.2"]

# Runs train.py with Lightning's checkpoint writer replaced by one that, at its KILL_AT-th call, writes half the
# bytes to the file it was given and SIGKILLs its own process: a crash in the middle of a checkpoint write.
DYING_WRITER = """
import io, os, signal, sys
import torch
from lightning.fabric.plugins.io import torch_io

KILL_AT, real, calls = int(sys.argv[1]), torch_io._atomic_save, []

def dying_save(checkpoint, filepath):
    calls.append(filepath)
    if len(calls) == KILL_AT:
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        with open(filepath, "wb") as handle:
            handle.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    real(checkpoint, filepath)

torch_io._atomic_save = dying_save
sys.argv = ["train.py", *sys.argv[2:]]
sys.path.insert(0, os.getcwd())
import train
train.main()
"""


@pytest.mark.slow  # subprocess runs killed mid-write, over a minute (make test-reliability)
def test_a_kill_while_a_checkpoint_is_written_leaves_loadable_checkpoints(in_tmp):
    args = ["fit", *MOONS, "--trainer.max_epochs=4", *quiet(in_tmp)]
    crashed = subprocess.run([sys.executable, "-c", DYING_WRITER, "3", *args], cwd=ROOT, capture_output=True, text=True,
                             timeout=300)
    assert crashed.returncode == -9, crashed.stderr[-2000:]
    checkpoints = in_tmp / "run" / "version_0" / "checkpoints"
    assert (checkpoints / "last.ckpt").is_file()
    for path in checkpoints.glob("*.ckpt"):  # every file named .ckpt is whole (the torn write is a .part file)
        state = torch.load(path, weights_only=True, map_location="cpu")
        assert state["epoch"] in (0, 1)
    assert list(checkpoints.glob("*.part")), "the killed write should have gone to a .part file"

    resumed = subprocess.run([sys.executable, "train.py", *args, "--ckpt_path=last"], cwd=ROOT, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    done = summary(in_tmp / "run" / "version_0")
    assert done["stage"] == "test" and done["epochs"] == 4


def test_two_runs_with_the_same_seed_give_identical_summaries(in_tmp):
    metrics = []
    for name in ("first", "second"):
        run_cli("fit", *MOONS, "--trainer.max_epochs=3", *quiet(in_tmp, name))
        result = summary(in_tmp / name / "version_0")
        metrics.append((result["metrics"], result["params"], result["flops_per_sample"], result["seed"]))
    assert metrics[0] == metrics[1]
    assert metrics[0][0]["test/acc"] > 0.5


def test_a_nan_loss_stops_training_and_names_the_step(in_tmp):
    with pytest.raises(FloatingPointError, match=r"training loss became (nan|inf|-inf) at or before global step \d+ \(epoch 0\); lower the learning rate"):
        run_cli("fit", *MOONS, "--trainer.max_epochs=2", "--model.init_args.optimizer.init_args.lr=1e30",
                "--model.init_args.optimizer.init_args.weight_decay=0", *quiet(in_tmp))
    assert not list(in_tmp.rglob("*.ckpt")), "no checkpoint of a diverged model"
