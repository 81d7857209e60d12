"""Sparsity scheduling: the target density the MorphoNet penalty pulls toward, over training."""

from __future__ import annotations

from typing import Any, Literal

from lightning.pytorch import Callback, LightningModule, Trainer

from callbacks.schedules import interpolate, progress_in_epochs, ramp


class SparsityScheduler(Callback):
    """Target sparsity s(p) from the initial sparsity to ``target``; sets ``pl_module.target_density = 1 - s``.

    ``s(p) = s0 + (target - s0) f(p)`` with f constant, linear, cosine or cubic, p the progress from
    ``warmup_epochs`` to ``until`` x max_epochs (per step). s0 is the hard sparsity of the masks when training
    starts (1 - init density) unless ``initial`` is given. During warm-up the masks are frozen
    (``pl_module.masks_frozen``) and no target is set. The penalty that enforces s(p) lives in the module
    (``MorphoNet.regularization``); this callback only schedules it.

    Args:
        target: final sparsity in [0, 1).
        schedule: constant (target from the first step), linear, cosine or cubic.
        initial: s0; default: measured at the start of training.
        warmup_epochs: epochs with frozen masks and no target.
        until: fraction of max_epochs at which the target is reached (then held).
    """

    def __init__(
        self,
        target: float = 0.7,
        schedule: Literal["constant", "linear", "cosine", "cubic"] = "cosine",
        initial: float | None = None,
        warmup_epochs: float = 0.0,
        until: float = 0.75,
    ) -> None:
        for name, value in (("target", target), ("initial", initial)):
            if value is not None and not 0.0 <= value < 1.0:
                raise ValueError(f"SparsityScheduler.{name} (a sparsity) must be in [0, 1), got {value}.")
        if schedule not in ("constant", "linear", "cosine", "cubic"):
            raise ValueError(f"SparsityScheduler.schedule must be one of constant, linear, cosine, cubic; got {schedule!r}.")
        if not 0.0 < until <= 1.0 or warmup_epochs < 0:
            raise ValueError(f"SparsityScheduler needs 0 < until <= 1 and warmup_epochs >= 0; got {until}, {warmup_epochs}.")
        self.target, self.schedule, self.initial = target, schedule, initial
        self.warmup_epochs, self.until = warmup_epochs, until
        self.current: float | None = None

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.initial is None:  # restored from the checkpoint when resuming
            self.initial = 1.0 - float(pl_module.net.weighted_density())

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        epochs = progress_in_epochs(trainer, batch_idx)
        if epochs < self.warmup_epochs:
            pl_module.masks_frozen, pl_module.target_density, self.current = True, None, None
            return
        p = ramp(epochs, self.warmup_epochs, self.until * (trainer.max_epochs or 1))
        self.current = interpolate(self.initial, self.target, p, self.schedule)
        pl_module.masks_frozen, pl_module.target_density = False, 1.0 - self.current

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.current is not None:
            pl_module.log("sched/target_sparsity", self.current)

    def state_dict(self) -> dict[str, Any]:
        return {"initial": self.initial, "current": self.current}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.initial, self.current = state_dict["initial"], state_dict["current"]
