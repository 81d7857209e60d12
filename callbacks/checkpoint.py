"""Checkpointing for resumable runs: best on the monitored metric, and ``last.ckpt`` after every epoch, each
written atomically (a kill mid-write leaves the previous file intact)."""

from __future__ import annotations

import os

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint


class BestAndLastCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` always holds the newest epoch.

    Lightning 2.6 writes ``last.ckpt`` only in steps where a top-k checkpoint was written, so with
    ``monitor=val/acc, save_top_k=1`` an epoch that does not improve leaves ``last.ckpt`` one or more epochs
    behind and ``fit --ckpt_path last`` would silently repeat epochs. After Lightning's own logic has run, this
    subclass writes ``last.ckpt`` for any epoch that did not get one.

    Every file is written as ``<name>.part`` next to its target and renamed over it (``os.replace``, atomic on
    POSIX). Lightning's own write goes through an fsspec transaction that stages the file in the system temp
    directory and *moves* it, which is a copy, not a rename, when that directory is on another file system.
    """

    def _save_checkpoint(self, trainer: Trainer, filepath: str) -> None:
        partial = f"{filepath}.part"
        super()._save_checkpoint(trainer, partial)
        if trainer.is_global_zero:
            os.replace(partial, filepath)
        self._last_checkpoint_saved = filepath

    def _ensure_last(self, trainer: Trainer) -> None:
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        # Also in epochs without validation (check_val_every_n_epoch > 1) and in the partial epoch a max_steps
        # stop ends; an epoch whose validation already wrote last.ckpt is skipped (same global step).
        self._ensure_last(trainer)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._ensure_last(trainer)
