"""MorphReuse: train one shared block reused by many layers (``models.morphreuse``, ``models.reuse_network``).

The lab's own networks (``SharedCoreMLP`` for vision, ``ShapeSharedBert`` for text) are trained as they are;
any other network gets its target ``nn.Linear`` layers replaced by shared-weight layers
(``models.reuse_network.ReusedNetwork``: ``shape_shared`` or ``shared_core``), then trains like any classifier.
"""

from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from constraints import PositiveFloat, PositiveInt
from lightning_modules.base import ClassificationModule, NetworkFactory
from lightning_modules.text_hooks import DictInputNetwork
from models.morphreuse import SharedCoreMLP, ShapeSharedBert
from models.reuse_network import ReusedNetwork, Scale, Variant
from models.targets import TargetModules

_PRESETS = (SharedCoreMLP, ShapeSharedBert)


class MorphReuse(ClassificationModule):
    """Cross-entropy training of a MorphReuse network.

    Args:
        net, input_shape, num_classes, optimizer, lr_scheduler: see ``ClassificationModule``.
        variant, target_modules, exclude_modules, activation, init_from_original, core_dim, expand, scale,
            train_proj: for a plain network, how its Linear layers share weights (``ReusedNetwork``; default
            ``shape_shared`` over ``all-linear``). A ``SharedCoreMLP`` / ``ShapeSharedBert`` takes none of them.
    """

    technique = "morphreuse"

    def __init__(
        self,
        net: NetworkFactory,
        input_shape: Sequence[int],
        num_classes: int,
        variant: Variant | None = None,
        target_modules: TargetModules | None = None,
        exclude_modules: TargetModules | None = None,
        activation: bool | None = None,
        init_from_original: bool | None = None,
        core_dim: PositiveInt | None = None,
        expand: PositiveFloat | None = None,
        scale: Scale | None = None,
        train_proj: bool | None = None,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(net, input_shape, num_classes, optimizer, lr_scheduler)

    _OPTIONS = ("variant", "target_modules", "exclude_modules", "activation", "init_from_original", "core_dim",
                "expand", "scale", "train_proj")

    def build_network(self, net: NetworkFactory) -> nn.Module:
        network = super().build_network(net)
        given = {k: self.hparams[k] for k in self._OPTIONS if self.hparams[k] is not None}
        preset = next((m for m in network.modules() if isinstance(m, _PRESETS)), None)  # a backbone's head too
        if preset is not None:
            if given:
                raise ValueError(f"model.net {type(preset).__name__} shares its weights by construction: drop "
                                 f"model.init_args.{' / '.join(given)}, or give a plain network.")
            return network
        if isinstance(network, DictInputNetwork):
            raise ValueError(f"lightning_modules.MorphReuse shares the Linear layers of image and tabular networks; "
                             f"{type(network).__name__} takes token dicts: use models.ShapeSharedBert.")
        given.setdefault("target_modules", "all-linear")
        return ReusedNetwork(network, **given)

    def summary_extras(self, deployed: nn.Module) -> dict[str, Any]:
        if not isinstance(self.net, ReusedNetwork):
            return self._preset_extras()
        trainable = sum(p.numel() for p in self.net.parameters() if p.requires_grad)
        return {"morphreuse": {"variant": self.net.variant, "targets": self.net.targets, "uses": self.net.uses(),
                               "trainable_share": trainable / sum(p.numel() for p in self.net.parameters())}}

    def _preset_extras(self) -> dict[str, Any]:
        if isinstance(self.net, SharedCoreMLP):
            core = sum(p.numel() for p in self.net.core.parameters())
            return {"morphreuse": {"variant": "shared_core", "core_parameters": core, "core_uses": len(self.net.adapters)}}
        if isinstance(self.net, ShapeSharedBert):
            return {"morphreuse": {"variant": "shape_shared", "shape_groups": self.net.shape_groups()}}
        return {}
