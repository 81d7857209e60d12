"""The Trainer's default progress bar (callbacks.TimedProgressBar): redrawn on time, not after every batch."""

from __future__ import annotations

from unittest import mock

import pytest
from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar

import train
from callbacks import TimedProgressBar
from conftest import ROOT

MOONS = str(ROOT / "configs/moons/baseline.yaml")


def build(*args: str) -> train.MorphLabCLI:
    with mock.patch("sys.argv", ["train.py"]):
        return train.main(list(args), run=False)


def test_a_bar_is_redrawn_at_its_ends_and_once_per_interval(monkeypatch):
    clock = iter([0.0, 0.05, 0.10, 0.30, 0.31, 0.32, 0.90])
    monkeypatch.setattr("callbacks.progress.time.monotonic", lambda: next(clock))
    bar = TimedProgressBar(refresh_interval=0.25)
    # batch 1 of 100 at t=0 (first), 2 at 0.05, 3 at 0.10, 4 at 0.30 (0.30 s after the last redraw), 5 at 0.31,
    # 100 at 0.32 (the last), 1 of a new bar at 0.90
    drawn = [bar._should_update(n, 100) for n in (1, 2, 3, 4, 5, 100, 1)]
    assert drawn == [True, False, False, True, False, True, True]
    bar.disable()
    assert not bar._should_update(100, 100)
    with pytest.raises(ValueError, match="refresh_interval"):
        TimedProgressBar(refresh_interval=-1)


def test_train_py_uses_the_timed_bar_unless_the_bar_is_off_or_another_is_given():
    def bars(*args):
        return [c for c in build("--config", MOONS, *args).trainer.callbacks if isinstance(c, ProgressBar)]

    default = bars()
    assert len(default) == 1 and type(default[0]) is TimedProgressBar
    assert bars("--trainer.enable_progress_bar=false") == []
    given = bars("--trainer.callbacks+=lightning.pytorch.callbacks.TQDMProgressBar")
    assert len(given) == 1 and type(given[0]) is TQDMProgressBar
