"""Sparsity scheduling: the target density the MorphoNet penalty pulls toward, over training."""


from typing import Any, Literal

from lightning.pytorch import Callback, LightningModule, Trainer

from callbacks.controls import MaskSchedule, controls_of
from callbacks.schedules import interpolate, progress_in_epochs, ramp
from constraints import Fraction, NonNegativeFloat, UnitFraction


class SparsityScheduler(Callback):
    """Target sparsity s(p) from the initial sparsity to ``target``; sets the module's ``MaskSchedule``
    (``callbacks.controls``): ``target_density = 1 - s``.

    ``s(p) = s0 + (target - s0) f(p)`` with f constant, linear, cosine or cubic, p the progress from
    ``warmup_epochs`` to ``until`` x max_epochs (per step). s0 is the hard sparsity of the masks (of the module's
    budget: weights or FLOPs) when training starts (1 - init density) unless ``initial`` is given. During warm-up
    the masks are frozen (``masks_frozen``) and no target is set. The penalty that enforces s(p) lives in the module
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
        target: Fraction = 0.7,
        schedule: Literal["constant", "linear", "cosine", "cubic"] = "cosine",
        initial: Fraction | None = None,
        warmup_epochs: NonNegativeFloat = 0.0,
        until: UnitFraction = 0.75,
    ) -> None:
        self.target, self.schedule, self.initial = target, schedule, initial
        self.warmup_epochs, self.until = warmup_epochs, until
        self.current: float | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        controls_of(pl_module, MaskSchedule, "callbacks.SparsityScheduler")

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.initial is None:  # restored from the checkpoint when resuming
            self.initial = 1.0 - pl_module.density()

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        controls = pl_module.controls
        epochs = progress_in_epochs(trainer, batch_idx)
        if epochs < self.warmup_epochs:
            controls.masks_frozen, controls.target_density, self.current = True, None, None
            return
        p = ramp(epochs, self.warmup_epochs, self.until * (trainer.max_epochs or 1))
        self.current = interpolate(self.initial, self.target, p, self.schedule)
        controls.masks_frozen, controls.target_density = False, 1.0 - self.current

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.current is not None:
            pl_module.log("sched/target_sparsity", self.current)

    def state_dict(self) -> dict[str, Any]:
        return {"initial": self.initial, "current": self.current}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.initial, self.current = state_dict["initial"], state_dict["current"]
