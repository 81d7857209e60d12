"""LayerCollapse: pull single-slope PReLUs toward 1, then merge the linear layers around them.

Regulariser (spec A3): ``R = lambda_t * sum_{i in S} (a_i - 1)^2`` over the slopes of the selected
``CollapsibleBlock``s (all of them, the last k, or those whose names match regexes), with lambda constant or
linearly warmed up over ``lc_warmup_epochs``. PReLU slopes never get weight decay (decay pulls them toward 0,
i.e. toward ReLU, against the regulariser; spec A3/D4).

Test evaluates two models on the same batches: ``test/acc`` is the deployed model, every block with
|a - 1| < ``collapse_threshold`` merged into one ``nn.Linear`` (``models.layercollapse``), and
``test/acc_uncollapsed`` the network as trained. Blocks collapsed in place during training (callbacks) are
recorded in the checkpoint and rebuilt before the weights load, so ``test --ckpt_path`` and resume work.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_modules.base import ClassificationModule, NetworkFactory
from models.layercollapse import CollapsibleBlock
from models.plain_export import save_exported


class LayerCollapse(ClassificationModule):
    """Compression-aware training of a network with ``CollapsibleBlock``s.

    Args:
        net, input_shape, num_classes, optimizer, lr_scheduler: see ``ClassificationModule``.
        lc_weight: lambda of the regulariser (>= 0; spec defaults 0.5 from scratch, 5 when fine-tuning).
        lc_warmup_epochs: lambda grows linearly from 0 over this many epochs (0: constant).
        last_k_blocks: regularise only the last k collapsible blocks (None: all, unless ``block_names``).
        block_names: regexes; regularise the blocks whose module names match any of them.
        collapse_threshold: tau; a block collapses when |a - 1| < tau (spec: 0.05).
    """

    technique = "layercollapse"

    def __init__(
        self,
        net: NetworkFactory,
        input_shape: Sequence[int],
        num_classes: int,
        lc_weight: float = 0.5,
        lc_warmup_epochs: int = 0,
        last_k_blocks: int | None = None,
        block_names: list[str] | None = None,
        collapse_threshold: float = 0.05,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        if lc_weight < 0:
            raise ValueError(f"model.lc_weight (lambda) must be >= 0, got {lc_weight}.")
        if lc_warmup_epochs < 0 or (last_k_blocks is not None and last_k_blocks < 1):
            raise ValueError(f"model.lc_warmup_epochs must be >= 0 and model.last_k_blocks >= 1; got {lc_warmup_epochs}, {last_k_blocks}.")
        if not 0.0 < collapse_threshold < 1.0:
            raise ValueError(f"model.collapse_threshold must be in (0, 1), got {collapse_threshold}.")
        super().__init__(net, input_shape, num_classes, optimizer, lr_scheduler)
        self.lc_weight, self.lc_warmup_epochs, self.collapse_threshold = lc_weight, lc_warmup_epochs, collapse_threshold
        self.last_k_blocks, self.block_names = last_k_blocks, block_names
        blocks = self.selected_blocks()
        if not blocks:
            raise ValueError("model.net has no CollapsibleBlock matching last_k_blocks/block_names; nothing to collapse.")
        self.test_acc_uncollapsed = MulticlassAccuracy(num_classes, average="micro")
        self._collapsed_copy: nn.Module | None = None

    # --- selection and regulariser --------------------------------------------------------------------------
    def selected_blocks(self) -> dict[str, CollapsibleBlock]:
        """The regularised blocks, by module name, in registration order."""
        blocks = {name: m for name, m in self.net.named_modules() if isinstance(m, CollapsibleBlock)}
        if self.block_names:
            patterns = [re.compile(p) for p in self.block_names]
            blocks = {n: m for n, m in blocks.items() if any(p.fullmatch(n) or p.search(n) for p in patterns)}
        if self.last_k_blocks:
            blocks = dict(list(blocks.items())[-self.last_k_blocks :])
        return blocks

    def current_lambda(self) -> float:
        if self.lc_warmup_epochs == 0:
            return self.lc_weight
        return self.lc_weight * min(1.0, (self.current_epoch + 1) / self.lc_warmup_epochs)

    def regularization(self) -> Tensor | None:
        slopes = [block.act.weight for block in self.selected_blocks().values()]
        if not slopes or self.lc_weight == 0:
            return None
        return self.current_lambda() * sum(((a - 1.0) ** 2).sum() for a in slopes)

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        self.log("sched/lambda", self.current_lambda())
        for name, block in self.selected_blocks().items():
            self.log(f"compact/slope/{name}", float(block.act.weight.mean()))

    def optimizer_parameters(self) -> Any:
        slopes = [m.weight for m in self.net.modules() if isinstance(m, nn.PReLU)]
        ids = {id(p) for p in slopes}
        others = [p for p in self.net.parameters() if id(p) not in ids and p.requires_grad]
        return [{"params": others}, {"params": slopes, "weight_decay": 0.0}]  # slopes never decay

    # --- collapse -------------------------------------------------------------------------------------------
    def deployed_model(self) -> nn.Module:
        """A copy with every block within ``collapse_threshold`` of linear merged into one Linear."""
        collapsed = copy.deepcopy(self.net).eval()
        collapsed.collapse_(self.collapse_threshold)
        return collapsed

    def on_test_start(self) -> None:
        super().on_test_start()
        self._collapsed_copy = self.deployed_model().to(self.device)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.test_acc_uncollapsed(self.net(x), y)
        self.log("test/acc_uncollapsed", self.test_acc_uncollapsed, on_step=False, on_epoch=True)
        logits = self._collapsed_copy(x)
        self.log("test/loss", nn.functional.cross_entropy(logits, y), on_step=False, on_epoch=True)
        self.test_metrics(logits, y)
        self.log_dict(self.test_metrics, on_step=False, on_epoch=True)

    def on_test_end(self) -> None:
        super().on_test_end()
        self._collapsed_copy = None

    def on_fit_end(self) -> None:
        super().on_fit_end()
        if self.trainer.global_rank == 0 and self.trainer.log_dir:
            # the deployed (collapsed) network and, for before/after comparisons, the network as trained
            save_exported(self.deployed_model(), Path(self.trainer.log_dir) / "exported.pt")
            save_exported(copy.deepcopy(self.net).eval(), Path(self.trainer.log_dir) / "uncollapsed.pt")

    # --- structure in checkpoints ---------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["morphlab"]["collapsed_blocks"] = list(self.net.collapsed_structure())

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.net.apply_structure(checkpoint.get("morphlab", {}).get("collapsed_blocks", []))

    def summary_extras(self) -> dict[str, Any]:
        deployed = self.deployed_model()
        before = sum(p.numel() for p in self.net.parameters())
        after = sum(p.numel() for p in deployed.parameters())
        return {
            "layercollapse": {
                "slopes": {name: round(float(block.act.weight.mean()), 5) for name, block in self.selected_blocks().items()},
                "collapsed_at_test": [n for n in deployed.collapsed_structure()],
                "params_before": before,
                "params_after": after,
                "threshold": self.collapse_threshold,
            }
        }
