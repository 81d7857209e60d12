"""A crash for tests: ``--trainer.callbacks+=crash.KillAt`` SIGKILLs the training process after a given batch of a
given epoch (no clean-up, no checkpoint: the process is gone, as after an OOM kill or a power cut)."""

from __future__ import annotations

import os
import signal

from lightning.pytorch import Callback


class KillAt(Callback):
    def __init__(self, epoch: int, batch: int) -> None:
        self.epoch, self.batch = epoch, batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            os.kill(os.getpid(), signal.SIGKILL)
