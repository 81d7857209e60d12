"""The Trainer's default progress bar: Lightning's tqdm bar, redrawn at most a few times a second.

Lightning's ``TQDMProgressBar`` redraws after every ``refresh_rate`` batches (default 1) and bypasses tqdm's own
time throttle (it calls ``refresh()``), twice a batch with the metrics postfix: about 0.5 ms a step on these
machines, 10 % of a small MLP's training step (``make bench``). A count cannot suit both a 0.5 ms and a 5 s step,
so this bar redraws on time instead: when ``refresh_interval`` seconds have passed, and at every bar's first and
last batch. ``--trainer.enable_progress_bar=false`` turns it off; a progress bar in ``--trainer.callbacks``
replaces it.
"""

from __future__ import annotations

import time

from lightning.pytorch.callbacks import TQDMProgressBar


class TimedProgressBar(TQDMProgressBar):
    """``TQDMProgressBar`` whose bars are redrawn every ``refresh_interval`` seconds at most (and at their ends)."""

    def __init__(self, refresh_interval: float = 0.25, process_position: int = 0, leave: bool = False) -> None:
        if refresh_interval < 0:
            raise ValueError(f"refresh_interval must be >= 0 seconds, got {refresh_interval}.")
        super().__init__(refresh_rate=1, process_position=process_position, leave=leave)
        self.refresh_interval = refresh_interval
        self._last_redraw = float("-inf")

    def _should_update(self, current: int, total: int) -> bool:
        # Lightning's one test of whether a bar is redrawn after a batch (train, validation, test, predict)
        if not self.is_enabled:
            return False
        now = time.monotonic()
        if current <= 1 or current == total or now - self._last_redraw >= self.refresh_interval:
            self._last_redraw = now
            return True
        return False
