"""LayerCollapse callbacks: collapse blocks during training, and the progressive top-down driver (spec A4)."""


from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from callbacks.controls import CollapseStage, controls_of
from callbacks.schedules import is_last_batch
from constraints import PositiveInt


class CollapseBlocks(Callback):
    """Collapse, in the trained network itself, every selected block with |a - 1| < tau: after the last training
    epoch and, with ``every_n_epochs``, after every n-th epoch (the remaining epochs fine-tune the merged Linear).

    It acts after the epoch's last training batch, so that epoch's validation and checkpoint already see the
    collapsed network (Lightning checkpoints before ``on_train_epoch_end``); the checkpoint stores which blocks
    are collapsed and ``test``/resume rebuild them. A run that stops before ``max_epochs`` still collapses at
    fit end (after its last checkpoint).
    """

    def __init__(self, every_n_epochs: PositiveInt | None = None) -> None:
        self.every_n_epochs = every_n_epochs

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        controls_of(pl_module, CollapseStage, "callbacks.CollapseBlocks")

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not is_last_batch(trainer, batch_idx):
            return
        done = trainer.current_epoch + 1
        if done == trainer.max_epochs or (self.every_n_epochs and done % self.every_n_epochs == 0):
            self._collapse(pl_module, trainer.current_epoch)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._collapse(pl_module, trainer.current_epoch)

    @staticmethod
    def _collapse(pl_module: LightningModule, epoch: int) -> None:
        names = pl_module.collapse_in_place()
        if names:
            rank_zero_info(f"[layercollapse] epoch {epoch}: collapsed {', '.join(names)}")


class ProgressiveCollapse(Callback):
    """Top-down LayerCollapse (spec A4, the procedure of the authors' notebooks): the selected blocks are taken
    from the last to the first; for ``epochs_per_block`` epochs only the current block's slope is regularised
    (the others train freely), then it is collapsed if |a - 1| < tau (otherwise left as it is, and logged), and
    the next block up follows. After the last block the remaining epochs fine-tune with no penalty.

    Stage = epoch // epochs_per_block, a function of the epoch alone, so a resumed run is in the same stage; the
    collapsed blocks live in the checkpoint. In the notebooks a block is *converted* (GELU -> PReLU) when its
    stage starts; here the selected blocks are collapsible from the start (built so, or converted before
    training) and a block outside its stage is simply not regularised.
    """

    def __init__(self, epochs_per_block: PositiveInt = 3) -> None:
        self.epochs_per_block = epochs_per_block
        self.order: list[str] = []
        self.skipped: list[str] = []

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        controls_of(pl_module, CollapseStage, "callbacks.ProgressiveCollapse")

    def current(self, epoch: int) -> str | None:
        stage = epoch // self.epochs_per_block
        return self.order[stage] if stage < len(self.order) else None

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.order = list(reversed(pl_module.selected_block_names()))  # fixed: collapsed names stay listed
        block = self.current(trainer.current_epoch)
        pl_module.controls.active_blocks = [block] if block is not None else []

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        epoch = trainer.current_epoch
        if not is_last_batch(trainer, batch_idx) or (epoch + 1) % self.epochs_per_block:
            return
        block = self.current(epoch)
        if block is None or block in pl_module.collapsed_blocks:
            return
        if block in pl_module.collapsible_now():
            pl_module.collapse_in_place([block])
            rank_zero_info(f"[layercollapse] epoch {epoch}: collapsed {block}")
        else:
            self.skipped.append(block)
            slope = pl_module.slopes()[block]
            rank_zero_info(f"[layercollapse] epoch {epoch}: {block} not collapsible (slope {slope:.4f}); moving on")

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        pl_module.log("sched/progressive_stage", float(trainer.current_epoch // self.epochs_per_block))

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = list(state_dict["skipped"])
