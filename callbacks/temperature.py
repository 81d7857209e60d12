"""Temperature annealing of learned masks ``sigmoid(M / T)``."""

from __future__ import annotations

from typing import Any, Literal

from lightning.pytorch import Callback, LightningModule, Trainer

from callbacks.schedules import interpolate, progress_in_epochs, ramp


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
        start: float = 2.0,
        end: float = 0.5,
        schedule: Literal["linear", "exponential"] = "linear",
        interval: Literal["step", "epoch"] = "epoch",
        warmup_epochs: float = 0.0,
        until: float = 1.0,
    ) -> None:
        if start <= 0 or end <= 0:
            raise ValueError(f"TemperatureAnnealing.start and .end must be > 0 (temperatures), got start={start}, end={end}.")
        if schedule not in ("linear", "exponential"):
            raise ValueError(f"TemperatureAnnealing.schedule must be linear or exponential; got {schedule!r}.")
        if interval not in ("step", "epoch"):
            raise ValueError(f"TemperatureAnnealing.interval must be step or epoch; got {interval!r}.")
        if not 0.0 < until <= 1.0 or warmup_epochs < 0:
            raise ValueError(f"TemperatureAnnealing needs 0 < until <= 1 and warmup_epochs >= 0; got {until}, {warmup_epochs}.")
        self.start, self.end, self.schedule, self.interval = start, end, schedule, interval
        self.warmup_epochs, self.until = warmup_epochs, until
        self.current = start

    def temperature(self, trainer: Trainer, batch_idx: int | None) -> float:
        epochs = progress_in_epochs(trainer, batch_idx if self.interval == "step" else None)
        p = ramp(epochs, self.warmup_epochs, self.until * (trainer.max_epochs or 1))
        return interpolate(self.start, self.end, p, self.schedule)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self.current = self.temperature(trainer, batch_idx)
        pl_module.net.set_temperature(self.current)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        pl_module.log("sched/temperature", self.current)

    def state_dict(self) -> dict[str, Any]:
        return {"current": self.current}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.current = state_dict["current"]
