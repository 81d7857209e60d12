"""Shared test helpers: run the real CLI in-process on tiny data, find a run's files."""

from __future__ import annotations

import json
from pathlib import Path
from unittest import mock

import pytest
from lightning.pytorch import Callback

import train

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str) -> train.MorphLabCLI:
    """Run ``python train.py ARGS`` in this process (one interpreter start for the whole test session)."""
    with mock.patch("sys.argv", ["train.py"]):  # pytest's own argv must not reach the parser
        return train.main(list(args))


def quiet(save_dir: Path, name: str = "run") -> list[str]:
    """CLI overrides that keep a test run small, silent and inside ``save_dir``."""
    return [
        f"--trainer.logger.init_args.save_dir={save_dir}",
        f"--trainer.logger.init_args.name={name}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
    ]


class StopAfter(Callback):
    """Stop training after ``epochs`` epochs, like a crash right after a checkpoint (max_epochs unchanged)."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run inside an empty directory so relative paths (data/, runs/) land in tmp."""
    monkeypatch.chdir(tmp_path)
    return tmp_path
