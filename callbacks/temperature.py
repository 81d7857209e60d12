"""Temperature annealing of learned masks ``sigmoid(M / T)``."""


from typing import Any, Literal

from lightning.pytorch import Callback, LightningModule, Trainer

from callbacks.controls import MaskSchedule, controls_of
from callbacks.schedules import interpolate, progress_in_epochs, ramp
from constraints import NonNegativeFloat, PositiveFloat, UnitFraction


class TemperatureAnnealing(Callback):
    """Anneal T from ``start`` to ``end`` between ``warmup_epochs`` and ``until`` x max_epochs, then hold.

    Parity (spec 2.3): per epoch, linear 2.0 -> 0.5 over the whole run (``until: 1.0``), i.e.
    T(e) = 2.0 - 1.5 e / E. Intended (spec 2.6): per step, linear from the end of a 10-epoch warm-up to 75 % of
    training. T is a function of (epoch, batch), so a resumed run continues exactly; the network keeps the
    value in a buffer, so it is also in every checkpoint.

    Args:
        start: temperature during warm-up and at the start of the anneal (> 0).
        end: final temperature (> 0).
        schedule: linear or exponential (start * (end / start)^p).
        interval: ``step`` (every batch) or ``epoch`` (constant within an epoch).
        warmup_epochs: epochs held at ``start``.
        until: fraction of ``max_epochs`` at which ``end`` is reached.
    """

    def __init__(
        self,
        start: PositiveFloat = 2.0,
        end: PositiveFloat = 0.5,
        schedule: Literal["linear", "exponential"] = "linear",
        interval: Literal["step", "epoch"] = "epoch",
        warmup_epochs: NonNegativeFloat = 0.0,
        until: UnitFraction = 1.0,
    ) -> None:
        self.start, self.end, self.schedule, self.interval = start, end, schedule, interval
        self.warmup_epochs, self.until = warmup_epochs, until
        self.current = start

    def temperature(self, trainer: Trainer, batch_idx: int | None) -> float:
        epochs = progress_in_epochs(trainer, batch_idx if self.interval == "step" else None)
        p = ramp(epochs, self.warmup_epochs, self.until * (trainer.max_epochs or 1))
        return interpolate(self.start, self.end, p, self.schedule)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        controls_of(pl_module, MaskSchedule, "callbacks.TemperatureAnnealing")

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self.current = self.temperature(trainer, batch_idx)
        pl_module.net.set_temperature(self.current)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        pl_module.log("sched/temperature", self.current)

    def state_dict(self) -> dict[str, Any]:
        return {"current": self.current}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.current = state_dict["current"]
