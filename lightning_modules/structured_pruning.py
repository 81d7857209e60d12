"""StructuredPruning: what a user would reach for instead of a learned technique, torch-pruning's magnitude pruner.

The dense network trains for ``prune_epoch`` epochs; then whole channels are removed, the coupled groups of
torch-pruning's ``DependencyGraph`` ranked by the L2 norm of their weights (``MagnitudePruner`` with
``MagnitudeImportance(p=2)``), until the FLOPs per sample are at most ``flops_ratio`` of the dense network's; the
smaller dense network is fine-tuned for the rest of the run. The uniform per-layer pruning ratio that meets the
FLOP target is found by bisection on copies, then the network is pruned in place and the optimizers and DDP are
handed the new parameters. The checkpoint holds torch-pruning's pruning history, replayed on load, so a resumed run
and ``test --ckpt_path`` rebuild the pruned shapes.
"""

import copy
from collections.abc import Sequence
from typing import Any

import torch
import torch_pruning as tp
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from constraints import NonNegativeInt, OpenFraction
from lightning_modules.base import ClassificationModule, NetworkFactory
from lightning_modules.structure import after_structure_change
from models.accounting import flops_per_sample
from models.channel_groups import dependency_graph
from models.targets import TargetModules, match_modules, output_layer

PRUNABLE = (nn.Linear, nn.Conv2d)
BISECTION_STEPS = 10


def _flops(net: nn.Module, example: torch.Tensor) -> int:
    was_training = net.training
    try:
        return flops_per_sample(lambda: net.eval()(example))
    finally:
        net.train(was_training)


def _replay(net: nn.Module, example: torch.Tensor, history: list) -> None:
    """Apply a torch-pruning pruning history to ``net`` in place."""
    was_training = net.training
    dependency_graph(net.eval(), example, mark_input=False).load_pruning_history(history)
    net.train(was_training)


class StructuredPruning(ClassificationModule):
    """Dense training, one magnitude channel-pruning step to a FLOP budget, fine-tuning; see the module docstring.

    Args:
        net, input_shape, num_classes, optimizer, lr_scheduler: see ``ClassificationModule``.
        flops_ratio: FLOPs per sample of the pruned network / the dense network's (at most).
        prune_epoch: the epoch at whose start the network is pruned (default: half of ``trainer.max_epochs``).
        target_modules, exclude_modules: the Linear / Conv2d layers whose output channels may be removed
            (``models.targets``; default every one but the output layer); channels coupled to a layer outside
            them are kept.
        global_pruning: rank channels across layers (torch-pruning's global pruning) instead of the same ratio
            in every layer.
    """

    technique = "structured_pruning"

    def __init__(
        self,
        net: NetworkFactory,
        input_shape: Sequence[int],
        num_classes: int,
        flops_ratio: OpenFraction = 0.5,
        prune_epoch: NonNegativeInt | None = None,
        target_modules: TargetModules = "all",
        exclude_modules: TargetModules | None = None,
        global_pruning: bool = False,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(net, input_shape, num_classes, optimizer, lr_scheduler)
        self.flops_ratio, self.prune_epoch, self.global_pruning = flops_ratio, prune_epoch, global_pruning
        prunable = match_modules(self.net, target_modules, exclude_modules, PRUNABLE, "StructuredPruning")
        self.output_name = output_layer(self.net, PRUNABLE)
        self.kept_names = [n for n, m in self.net.named_modules() if isinstance(m, PRUNABLE) and n not in prunable]
        self.history: list = []
        self.flops_dense = _flops(self.net, self.example_input_array)
        self.params_dense = sum(p.numel() for p in self.net.parameters())
        self.pruning_ratio: float | None = None
        self.pruned_at_epoch: int | None = None

    def _prune_trial(self, net: nn.Module, ratio: float) -> tp.pruner.MagnitudePruner:
        ignored = [net.get_submodule(n) for n in {self.output_name, *self.kept_names}]
        was_training = net.training
        with torch.enable_grad():
            pruner = tp.pruner.MagnitudePruner(
                net.eval(), self.example_input_array, importance=tp.importance.MagnitudeImportance(p=2),
                pruning_ratio=ratio, ignored_layers=ignored, global_pruning=self.global_pruning,
            )
        pruner.step()
        net.train(was_training)
        return pruner

    @torch.no_grad()
    def prune_now(self) -> None:
        """Bisect the pruning ratio on copies to meet ``flops_ratio``, then prune ``self.net`` with it."""
        budget = self.flops_ratio * self.flops_dense
        low, high, best = 0.0, 1.0, None
        for _ in range(BISECTION_STEPS):
            ratio = (low + high) / 2
            trial = copy.deepcopy(self.net)
            history = self._prune_trial(trial, ratio).DG.pruning_history()
            if _flops(trial, self.example_input_array) <= budget:
                high, best = ratio, (ratio, copy.deepcopy(history))
            else:
                low = ratio
        if best is None:
            raise ValueError(f"StructuredPruning: no pruning ratio brings {type(self.net).__name__} to "
                             f"{self.flops_ratio} of its FLOPs; raise model.flops_ratio or widen target_modules.")
        self.pruning_ratio, self.history = best
        _replay(self.net, self.example_input_array, self.history)
        self.pruned_at_epoch = self.current_epoch
        after_structure_change(self)

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        prune_epoch = self.prune_epoch if self.prune_epoch is not None else (self.trainer.max_epochs or 0) // 2
        if not self.history and self.current_epoch >= prune_epoch:
            self.prune_now()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["morphlab"]["pruning"] = {"history": self.history, "ratio": self.pruning_ratio,
                                             "epoch": self.pruned_at_epoch}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        pruning = checkpoint.get("morphlab", {}).get("pruning", {})
        if self.history and not pruning.get("history"):
            raise ValueError(f"this checkpoint (epoch {checkpoint.get('epoch')}) was saved before the network was "
                             f"pruned at epoch {self.pruned_at_epoch}: test the last checkpoint (test_ckpt: last) "
                             "or one saved after pruning.")
        if pruning.get("history") and not self.history:
            self.history = pruning["history"]
            self.pruning_ratio, self.pruned_at_epoch = pruning["ratio"], pruning["epoch"]
            _replay(self.net, self.example_input_array, self.history)

    def dense_equivalent_parameters(self, deployed: nn.Module) -> int:
        return self.params_dense

    def summary_extras(self, deployed: nn.Module) -> dict[str, Any]:
        return {
            "structured_pruning": {
                "flops_ratio_target": self.flops_ratio,
                "flops_dense": self.flops_dense,
                "flops_pruned": _flops(deployed, self.example_input_array.to(self.device)),
                "pruning_ratio": self.pruning_ratio,
                "pruned_at_epoch": self.pruned_at_epoch,
            }
        }
