"""LayerCollapse: pull single-slope PReLUs toward 1, then merge the linear layers around them.

Regulariser (spec A3): ``R = lambda_t * sum_{i in S} (a_i - 1)^2`` over the slopes of the selected
``CollapsibleBlock``s (all of them, the last k, or those whose names match regexes), with lambda constant or
linearly warmed up over ``lc_warmup_epochs``. PReLU slopes never get weight decay (decay pulls them toward 0,
i.e. toward ReLU, against the regulariser; spec A3/D4).

Test evaluates two models on the same batches: ``test/acc`` is the deployed model, every selected block with
|a - 1| < ``collapse_threshold`` merged into one ``nn.Linear`` (``models.layercollapse``), and
``test/acc_uncollapsed`` the network as trained. Blocks collapsed in place during training
(``callbacks.CollapseBlocks``, ``callbacks.ProgressiveCollapse``) are recorded in the checkpoint and rebuilt
before the weights load, so ``test --ckpt_path`` and resume work; the optimizer drops the removed parameters
and takes the new Linear's in the order a fresh ``configure_optimizers`` would give (exact resume).
"""

import copy
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from callbacks.controls import CollapseStage
from constraints import NonNegativeFloat, NonNegativeInt, OpenFraction, PositiveFloat, PositiveInt
from lightning_modules.base import ClassificationModule, NetworkFactory
from lightning_modules.structure import after_structure_change
from models.layercollapse import CollapsibleBlock, collapse_blocks_, collapsible_blocks, rebuild_collapsed_
from models.plain_export import save_exported


class LayerCollapse(ClassificationModule):
    """Compression-aware training of a network with ``CollapsibleBlock``s.

    Args:
        net, input_shape, num_classes, optimizer, lr_scheduler: see ``ClassificationModule``.
        lc_weight: lambda of the regulariser (>= 0; spec defaults 0.5 from scratch, 5 when fine-tuning).
        lc_warmup_epochs: lambda grows linearly from 0 over this many epochs (0: constant).
        last_k_blocks: select only the last k collapsible blocks (None: all, unless ``block_names``).
        block_names: regexes; select the blocks whose module paths match any of them.
        regularize_prelus: regexes; single-slope PReLUs outside the blocks (e.g. ``features\\..*`` of the custom
            VGG) whose module paths match are regularised too but never collapsed ("LC as a regulariser", A3).
        collapse_threshold: tau; a selected block collapses when |a - 1| < tau (spec: 0.05).
        slope_lr: learning rate of the PReLU slopes (None: the optimizer's). Adam moves a parameter by about
            lr per step whatever lambda is, so with lr 1e-3 a slope needs ~1,000 steps to travel from 0.01 to 1;
            a larger slope_lr lets a short (progressive) stage get there.
    """

    technique = "layercollapse"

    def __init__(
        self,
        net: NetworkFactory,
        input_shape: Sequence[int],
        num_classes: int,
        lc_weight: NonNegativeFloat = 0.5,
        lc_warmup_epochs: NonNegativeInt = 0,
        last_k_blocks: PositiveInt | None = None,
        block_names: list[str] | None = None,
        regularize_prelus: list[str] | None = None,
        collapse_threshold: OpenFraction = 0.05,
        slope_lr: PositiveFloat | None = None,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(net, input_shape, num_classes, optimizer, lr_scheduler)
        self.lc_weight, self.lc_warmup_epochs, self.collapse_threshold = lc_weight, lc_warmup_epochs, collapse_threshold
        self.last_k_blocks, self.block_names, self.slope_lr = last_k_blocks, block_names, slope_lr
        self.collapsed_blocks: list[str] = []  # collapsed in place during training, in order
        self.controls = CollapseStage()  # ProgressiveCollapse sets the blocks regularised now
        self._selected_names: list[str] | None = None  # cache: the selection is fixed; regularization() runs every step
        if not self.selected_block_names():
            raise ValueError("model.net has no CollapsibleBlock matching last_k_blocks/block_names; nothing to collapse.")
        patterns = [re.compile(p) for p in regularize_prelus or []]
        self.extra_prelus = {
            name: m for name, m in self.net.named_modules()
            if isinstance(m, nn.PReLU) and m.weight.numel() == 1 and any(p.search(name) for p in patterns)
            and not any(name.startswith(b + ".") for b in self.selected_block_names())
        }
        if patterns and not self.extra_prelus:
            raise ValueError(f"model.regularize_prelus {regularize_prelus} matches no single-slope PReLU of model.net.")
        self.test_acc_uncollapsed = MulticlassAccuracy(num_classes, average="micro")
        self._collapsed_copy: nn.Module | None = None

    # --- selection and regulariser --------------------------------------------------------------------------
    def selected_block_names(self) -> list[str]:
        """Module paths of the selected blocks, collapsed ones included, in registration order (a fixed list:
        collapsing a block does not shift "the last k" to another one)."""
        if self._selected_names is not None:
            return self._selected_names
        names = [n for n, m in self.net.named_modules() if isinstance(m, CollapsibleBlock) or n in self.collapsed_blocks]
        if self.block_names:
            patterns = [re.compile(p) for p in self.block_names]
            names = [n for n in names if any(p.search(n) for p in patterns)]
        if self.last_k_blocks:
            names = names[-self.last_k_blocks :]
        self._selected_names = names
        return names

    def selected_blocks(self) -> dict[str, CollapsibleBlock]:
        """The selected blocks not yet collapsed, by module path."""
        blocks = collapsible_blocks(self.net)
        return {n: blocks[n] for n in self.selected_block_names() if n in blocks}

    def regularized_slopes(self) -> dict[str, Tensor]:
        """Slope parameters in the penalty now: the selected (or, progressively, active) blocks and the extra PReLUs."""
        blocks = self.selected_blocks()
        active = self.controls.active_blocks
        if active is not None:
            blocks = {n: b for n, b in blocks.items() if n in active}
        slopes = {n: b.act.weight for n, b in blocks.items()}
        slopes.update({n: m.weight for n, m in self.extra_prelus.items()})
        return slopes

    def current_lambda(self) -> float:
        if self.lc_warmup_epochs == 0:
            return self.lc_weight
        return self.lc_weight * min(1.0, (self.current_epoch + 1) / self.lc_warmup_epochs)

    def regularization(self) -> Tensor | None:
        slopes = list(self.regularized_slopes().values())
        if not slopes or self.lc_weight == 0:
            return None
        return self.current_lambda() * sum(((a - 1.0) ** 2).sum() for a in slopes)

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        self.log("sched/lambda", self.current_lambda())
        for name, block in self.selected_blocks().items():
            self.log(f"compact/slope/{name}", block.slope())
        for name in self.collapsed_blocks:  # collapsed = exactly linear: slope 1 (a resumed run logs the same)
            self.log(f"compact/slope/{name}", 1.0)
        self.log("compact/collapsed_blocks", float(len(self.collapsed_blocks)))

    def optimizer_parameters(self) -> Any:
        slopes = [m.weight for m in self.net.modules() if isinstance(m, nn.PReLU)]
        ids = {id(p) for p in slopes}
        others = [p for p in self.net.parameters() if id(p) not in ids and p.requires_grad]
        slope_group = {"params": slopes, "weight_decay": 0.0}  # slopes never decay
        if self.slope_lr is not None:
            slope_group["lr"] = self.slope_lr
        return [{"params": others}, slope_group]

    # --- collapse -------------------------------------------------------------------------------------------
    def collapsible_now(self) -> list[str]:
        """Selected blocks with |a - 1| < tau."""
        return [n for n, b in self.selected_blocks().items() if b.collapsible(self.collapse_threshold)]

    @torch.no_grad()
    def collapse_in_place(self, names: Sequence[str] | None = None) -> list[str]:
        """Collapse ``names`` (default: ``collapsible_now()``) in the trained network itself and hand the optimizer
        the new parameters; returns the collapsed names."""
        names = self.collapsible_now() if names is None else list(names)
        if not names:
            return []
        collapse_blocks_(self.net, names)
        self.collapsed_blocks += names
        after_structure_change(self)
        return names

    def deployed_model(self) -> nn.Module:
        """A copy with every selected block within ``collapse_threshold`` of linear merged into one Linear."""
        collapsed = copy.deepcopy(self.net).eval()
        collapse_blocks_(collapsed, self.collapsible_now())
        return collapsed

    def on_test_start(self) -> None:
        super().on_test_start()
        self._collapsed_copy = self.deployed_model().to(self.device)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.test_acc_uncollapsed(self.net(x), y)
        self.log("test/acc_uncollapsed", self.test_acc_uncollapsed, on_step=False, on_epoch=True)
        logits = self._collapsed_copy(x)
        self.log_eval_loss("test", logits, y)
        self.test_metrics(logits, y)
        self.log_dict(self.test_metrics, on_step=False, on_epoch=True)

    def on_test_end(self) -> None:
        super().on_test_end()
        self._collapsed_copy = None

    def save_exports(self, deployed: nn.Module, log_dir: Path) -> None:
        # the deployed (collapsed) network and, for before/after comparisons, the network as trained
        save_exported(deployed, log_dir / "exported.pt")
        save_exported(copy.deepcopy(self.net).eval(), log_dir / "uncollapsed.pt")

    # --- structure in checkpoints ---------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["morphlab"]["collapsed_blocks"] = list(self.collapsed_blocks)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        names = list(checkpoint.get("morphlab", {}).get("collapsed_blocks", []))
        rebuild_collapsed_(self.net, names)
        self.collapsed_blocks = names

    def summary_extras(self, deployed: nn.Module) -> dict[str, Any]:
        original = self.net_factory(self.input_shape, self.num_classes)
        return {
            "layercollapse": {
                "slopes": {name: round(block.slope(), 5) for name, block in self.selected_blocks().items()},
                "collapsed_in_training": list(self.collapsed_blocks),
                "collapsed_at_test": self.collapsed_blocks + self.collapsible_now(),
                "params_original": sum(p.numel() for p in original.parameters()),
                "params_before": sum(p.numel() for p in self.net.parameters()),
                "params_after": sum(p.numel() for p in deployed.parameters()),
                "threshold": self.collapse_threshold,
            }
        }
