"""Progressive hard pruning of learned masks during training."""


from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

from callbacks.controls import MaskSchedule, controls_of
from callbacks.schedules import is_last_batch
from callbacks.sparsity import SparsityScheduler
from constraints import OpenFraction, PositiveInt, Probability


class ProgressivePruning(Callback):
    """Every ``every`` epochs from ``start`` x max_epochs on, prune connections with sigmoid(M/T) < ``threshold``.

    Pruning sets M := -100 (the connection is off for good: its gradient vanishes). It runs after the epoch's
    last training step, so that epoch's validation and checkpoint already see the pruned network.
    Which epochs prune is a function of the epoch number; the pruned logits are parameters and live in the
    checkpoint, so a resumed run continues exactly. The final prune before export is the module's
    (``MorphoNet.final_prune_threshold``).

    With ``to_target``, each event then also switches off the weakest connections (lowest logits, all layers
    ranked together) until the density is at most the ``SparsityScheduler``'s current target: the penalty steers
    the masks toward the target, this makes sure the exported model does not stay above it.

    Args:
        start: fraction of max_epochs after which pruning begins (v1: 0.5).
        every: epochs between prunes (v1: 10).
        threshold: soft-mask value below which a connection is pruned (v1: 0.2).
        to_target: also prune down to the scheduled target density (needs a SparsityScheduler).
    """

    def __init__(self, start: Probability = 0.5, every: PositiveInt = 10, threshold: OpenFraction = 0.2,
                 to_target: bool = False) -> None:
        self.start, self.every, self.threshold, self.to_target = start, every, threshold, to_target
        self.events: list[tuple[int, int]] = []  # (epoch, connections pruned)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        controls_of(pl_module, MaskSchedule, "callbacks.ProgressivePruning")
        if self.to_target and stage == "fit" and not any(isinstance(c, SparsityScheduler) for c in trainer.callbacks):
            raise ValueError("callbacks.ProgressivePruning to_target: true prunes to the target of a "
                             "callbacks.SparsityScheduler; add one to trainer.callbacks or set to_target: false.")

    def should_prune(self, epoch: int, max_epochs: int) -> bool:
        done = epoch + 1
        return done > self.start * max_epochs and done % self.every == 0

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if is_last_batch(trainer, batch_idx) and self.should_prune(trainer.current_epoch, trainer.max_epochs or 1):
            pruned = int(pl_module.net.prune_(self.threshold))
            target = pl_module.controls.target_density
            if self.to_target and target is not None:
                pruned += int(pl_module.net.prune_to_density_(target, pl_module.budget))
            self.events.append((trainer.current_epoch, pruned))
            pl_module.log("compact/pruned", float(pruned))

    def state_dict(self) -> dict[str, Any]:
        return {"events": self.events}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.events = [tuple(e) for e in state_dict["events"]]
