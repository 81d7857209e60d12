"""Learning-rate schedules that follow the run: their length is the trainer's, not a second number in the config."""


import torch
from constraints import PositiveInt
from lightning.pytorch import Trainer


class CosineAnnealingLR(torch.optim.lr_scheduler.CosineAnnealingLR):
    """torch's cosine schedule, ``lr_e = eta_min + (lr_0 - eta_min) (1 + cos(pi e / T_max)) / 2`` per epoch, whose
    ``T_max`` defaults to the run's ``trainer.max_epochs`` (filled in by ``follow_run`` when the module builds its
    optimizer), so a suite or a command line that shortens a run shortens its schedule too.

    Args:
        optimizer: given by the module.
        T_max: epochs of the half cosine; ``None`` (the default): ``trainer.max_epochs``.
        eta_min: the final learning rate.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, T_max: PositiveInt | None = None, eta_min: float = 0.0) -> None:
        self.follows_run = T_max is None
        # T_max is not read before the first step(): the learning rate of epoch 0 is lr_0 whatever it is
        super().__init__(optimizer, T_max=T_max or 1, eta_min=eta_min)


def follow_run(scheduler: object, trainer: Trainer) -> None:
    """Give a schedule that follows the run (``CosineAnnealingLR`` without ``T_max``) the run's length."""
    if isinstance(scheduler, CosineAnnealingLR) and scheduler.follows_run:
        epochs = trainer.max_epochs
        if epochs is None or epochs < 1:
            raise ValueError("lr_scheduler CosineAnnealingLR without T_max follows trainer.max_epochs, which is not set; "
                             "set trainer.max_epochs or give T_max.")
        scheduler.T_max = epochs
