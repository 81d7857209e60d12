"""Progressive hard pruning of learned masks during training."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer


class ProgressivePruning(Callback):
    """Every ``every`` epochs from ``start`` x max_epochs on, prune connections with sigmoid(M/T) < ``threshold``.

    Pruning sets M := -100 (the connection is off for good: its gradient vanishes). It runs at the end of an
    epoch, after that epoch's checkpoint-relevant validation, so the next epoch trains the pruned network.
    Which epochs prune is a function of the epoch number; the pruned logits are parameters and live in the
    checkpoint, so a resumed run continues exactly. The final prune before export is the module's
    (``MorphoNet.final_prune_threshold``).

    Args:
        start: fraction of max_epochs after which pruning begins (v1: 0.5).
        every: epochs between prunes (v1: 10).
        threshold: soft-mask value below which a connection is pruned (v1: 0.2).
    """

    def __init__(self, start: float = 0.5, every: int = 10, threshold: float = 0.2) -> None:
        if not 0.0 <= start <= 1.0 or every < 1 or not 0.0 < threshold < 1.0:
            raise ValueError(
                f"ProgressivePruning needs start in [0, 1], every >= 1 and threshold in (0, 1); got {start}, {every}, {threshold}."
            )
        self.start, self.every, self.threshold = start, every, threshold
        self.events: list[tuple[int, int]] = []  # (epoch, connections pruned)

    def should_prune(self, epoch: int, max_epochs: int) -> bool:
        done = epoch + 1
        return done > self.start * max_epochs and done % self.every == 0

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.should_prune(trainer.current_epoch, trainer.max_epochs or 1):
            pruned = int(pl_module.net.prune_(self.threshold))
            self.events.append((trainer.current_epoch, pruned))
            pl_module.log("compact/pruned", float(pruned))

    def state_dict(self) -> dict[str, Any]:
        return {"events": self.events}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.events = [tuple(e) for e in state_dict["events"]]
