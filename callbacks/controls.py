"""What a technique and the callbacks that drive it share: one small object the module owns (``pl_module.controls``).

* ``MaskSchedule`` (MorphoNet): ``SparsityScheduler`` sets the target density and the warm-up freeze every step;
  the module's penalty and mask optimizer read them, ``ProgressivePruning`` prunes down to the target.
  ``TemperatureAnnealing``, ``ProgressivePruning`` and ``ConnectivityImages`` act on the masked network itself.
* ``CollapseStage`` (LayerCollapse): ``ProgressiveCollapse`` sets the blocks regularised now; ``CollapseBlocks``
  and ``ProgressiveCollapse`` collapse blocks through the module.

A callback asks ``controls_of(pl_module, MaskSchedule, "callbacks.SparsityScheduler")`` in ``setup``: a module of
another technique is refused in one sentence instead of silently getting attributes nobody reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

from lightning.pytorch import LightningModule


@dataclass
class MaskSchedule:
    """MorphoNet's schedule state, set by ``SparsityScheduler`` before every training step.

    Attributes:
        target_density: the density ``1 - s_t`` the intended-mode penalty pulls toward; ``None``: no target yet
            (warm-up, or no scheduler: parity).
        masks_frozen: during the scheduler's warm-up the mask logits are not stepped.
    """

    target_density: float | None = None
    masks_frozen: bool = False


@dataclass
class CollapseStage:
    """LayerCollapse's stage, set by ``ProgressiveCollapse`` at every epoch start.

    Attributes:
        active_blocks: the selected blocks whose slopes are regularised now; ``None``: all of them.
    """

    active_blocks: list[str] | None = None


Controls = TypeVar("Controls", MaskSchedule, CollapseStage)
TECHNIQUE = {MaskSchedule: "lightning_modules.MorphoNet", CollapseStage: "lightning_modules.LayerCollapse"}


def controls_of(pl_module: LightningModule, kind: type[Controls], who: str) -> Controls:
    """``pl_module.controls`` if it is a ``kind``; otherwise a one-sentence refusal naming the callback ``who``."""
    controls = getattr(pl_module, "controls", None)
    if not isinstance(controls, kind):
        raise ValueError(f"{who} drives {TECHNIQUE[kind]} (model.class_path), not {type(pl_module).__name__}; "
                         "remove it from trainer.callbacks or change the model.")
    return controls
