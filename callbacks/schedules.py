"""Shared arithmetic of the schedule callbacks: training progress and the shapes of a schedule."""

from __future__ import annotations

import math

from lightning.pytorch import Trainer

SHAPES = ("constant", "linear", "cosine", "cubic", "exponential")


def progress_in_epochs(trainer: Trainer, batch_idx: int | None) -> float:
    """Epochs done so far, fractional inside an epoch when ``batch_idx`` is given (step-wise schedules)."""
    if batch_idx is None:
        return float(trainer.current_epoch)
    batches = max(int(trainer.num_training_batches), 1) if trainer.num_training_batches != float("inf") else 1
    return trainer.current_epoch + batch_idx / batches


def ramp(epochs_done: float, start_epoch: float, end_epoch: float) -> float:
    """0 before ``start_epoch``, 1 from ``end_epoch`` on, linear in between."""
    if end_epoch <= start_epoch:
        return 1.0 if epochs_done >= start_epoch else 0.0
    return min(max((epochs_done - start_epoch) / (end_epoch - start_epoch), 0.0), 1.0)


def interpolate(start: float, end: float, p: float, shape: str) -> float:
    """Value at progress ``p`` in [0, 1] of a schedule from ``start`` to ``end``.

    constant: start; linear: start + (end - start) p; cosine: start + (end - start)(1 - cos(pi p))/2;
    cubic (Zhu & Gupta's AGP): end + (start - end)(1 - p)^3; exponential: start (end / start)^p.
    """
    if shape == "constant":
        return start
    if shape == "linear":
        return start + (end - start) * p
    if shape == "cosine":
        return start + (end - start) * (1 - math.cos(math.pi * p)) / 2
    if shape == "cubic":
        return end + (start - end) * (1 - p) ** 3
    if shape == "exponential":
        return start * (end / start) ** p
    raise ValueError(f"schedule must be one of {', '.join(SHAPES)}; got {shape!r}.")


def is_last_batch(trainer: Trainer, batch_idx: int) -> bool:
    """Whether ``batch_idx`` ends the training epoch.

    End-of-epoch changes to the network (pruning) happen here rather than in ``on_train_epoch_end``: Lightning
    validates and checkpoints before ``on_train_epoch_end``, so a change made there would be missing from the
    epoch's checkpoint and a resumed run would differ.
    """
    return batch_idx + 1 >= trainer.num_training_batches
