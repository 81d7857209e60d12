"""Schedule arithmetic of the MorphoNet callbacks (temperature, target sparsity, pruning epochs)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from callbacks import ProgressivePruning, SparsityScheduler, TemperatureAnnealing
from callbacks.controls import MaskSchedule
from callbacks.schedules import interpolate, ramp
from parsing import parser_refuses


def trainer_at(epoch: int, max_epochs: int = 100, batches: int = 10):
    return SimpleNamespace(current_epoch=epoch, max_epochs=max_epochs, num_training_batches=batches)


def test_schedule_shapes_start_and_end_where_they_should():
    for shape in ("linear", "cosine", "cubic", "exponential"):
        assert interpolate(0.4, 0.7, 0.0, shape) == pytest.approx(0.4)
        assert interpolate(0.4, 0.7, 1.0, shape) == pytest.approx(0.7)
    assert interpolate(0.4, 0.7, 0.5, "constant") == 0.4
    assert interpolate(0.4, 0.7, 0.5, "cosine") == pytest.approx(0.55)
    assert interpolate(0.0, 1.0, 0.5, "cubic") == pytest.approx(1 - 0.5**3)  # AGP: fast first, slow last
    assert interpolate(2.0, 0.5, 0.5, "exponential") == pytest.approx(1.0)
    with pytest.raises(ValueError, match="schedule must be one of"):
        interpolate(0, 1, 0.5, "quadratic")
    assert ramp(5, 10, 20) == 0 and ramp(15, 10, 20) == 0.5 and ramp(25, 10, 20) == 1


def test_parity_temperature_is_the_upstream_formula():
    anneal = TemperatureAnnealing(start=2.0, end=0.5, interval="epoch", until=1.0)
    for epoch in (0, 1, 50, 99):
        expected = max(0.5, 2.0 - 1.5 * epoch / 100)  # spec 2.3
        assert anneal.temperature(trainer_at(epoch), batch_idx=7) == pytest.approx(expected)


def test_intended_temperature_holds_through_warmup_then_anneals_per_step_until_three_quarters():
    anneal = TemperatureAnnealing(start=2.0, end=0.5, interval="step", warmup_epochs=10, until=0.75)
    assert anneal.temperature(trainer_at(9), batch_idx=9) == 2.0
    inside = [anneal.temperature(trainer_at(40), batch_idx=b) for b in range(10)]
    assert all(a > b for a, b in zip(inside, inside[1:]))  # changes within an epoch
    assert anneal.temperature(trainer_at(75), batch_idx=0) == pytest.approx(0.5)
    assert anneal.temperature(trainer_at(99), batch_idx=9) == pytest.approx(0.5)


@pytest.mark.parametrize("kwargs", [{"start": 0.0}, {"end": -1.0}, {"interval": "batch"}, {"until": 0.0}])
def test_bad_temperatures_are_refused(kwargs):
    assert parser_refuses(TemperatureAnnealing, **kwargs)
    assert not parser_refuses(TemperatureAnnealing, start=1.0, until=0.5)


def test_sparsity_target_follows_the_schedule_and_freezes_masks_in_warmup():
    scheduler = SparsityScheduler(target=0.7, schedule="cosine", initial=0.6, warmup_epochs=10, until=0.75)
    module = SimpleNamespace(controls=MaskSchedule())
    schedule = module.controls
    scheduler.on_train_batch_start(trainer_at(5), module, None, 0)
    assert schedule.masks_frozen and schedule.target_density is None
    scheduler.on_train_batch_start(trainer_at(10), module, None, 0)
    assert not schedule.masks_frozen and schedule.target_density == pytest.approx(1 - 0.6)
    scheduler.on_train_batch_start(trainer_at(42, batches=10), module, None, 5)
    p = (42.5 - 10) / 65
    assert schedule.target_density == pytest.approx(1 - (0.6 + 0.1 * (1 - math.cos(math.pi * p)) / 2))
    scheduler.on_train_batch_start(trainer_at(90), module, None, 0)
    assert schedule.target_density == pytest.approx(0.3)
    restored = SparsityScheduler()
    restored.load_state_dict(scheduler.state_dict())
    assert restored.initial == 0.6 and restored.current == pytest.approx(0.7)


@pytest.mark.parametrize("kwargs", [{"target": 1.0}, {"target": -0.1}, {"initial": 1.5}, {"schedule": "step"}])
def test_bad_sparsity_settings_are_refused(kwargs):
    assert parser_refuses(SparsityScheduler, **kwargs)


def test_progressive_pruning_epochs_follow_v1():
    pruning = ProgressivePruning(start=0.5, every=10, threshold=0.2)
    epochs = [e for e in range(100) if pruning.should_prune(e, 100)]
    assert epochs == [59, 69, 79, 89, 99]  # after epochs 60, 70, ..., 100
    assert parser_refuses(ProgressivePruning, threshold=1.0) and parser_refuses(ProgressivePruning, every=0)
