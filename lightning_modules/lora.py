"""LoRA through peft: freeze the network, learn low-rank updates ``W + (alpha / r) B A`` on chosen layers.

The adapters are injected by ``peft.get_peft_model`` (never hand-written). Deployed, they are merged into the
weights (``merge_and_unload``), so the exported model has the base architecture: that is what ``nonzero``,
FLOPs and bytes describe, and ``dense_equivalent`` is its parameter count.
"""

import copy
import re
from collections.abc import Sequence

from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from constraints import Fraction, PositiveFloat, PositiveInt
from lightning_modules.base import ClassificationModule, NetworkFactory


def _count_layers(model: nn.Module, pattern: str | None) -> int:
    """Number of entries of the ModuleList called ``pattern`` (e.g. BERT's ``layer``)."""
    found = re.compile(rf"(?:^|\.){re.escape(pattern or 'layers')}\.(\d+)(?:\.|$)")
    indices = {int(m.group(1)) for name, _ in model.named_modules() if (m := found.search(name))}
    if not indices:
        raise ValueError(f"model.layers_pattern {pattern!r} names no indexed layer list in the network.")
    return max(indices) + 1


class LoRA(ClassificationModule):
    """Low-rank adaptation of a frozen ``net``.

    Args:
        net, input_shape, num_classes, optimizer, lr_scheduler: see ``ClassificationModule``.
        r: rank of the update (>= 1).
        alpha: ``lora_alpha``; the update is scaled by ``alpha / r``.
        dropout: dropout on the LoRA branch input.
        target_modules: module names (suffix match) or one regex (full match) that get adapters, peft semantics.
        modules_to_save: modules trained in full besides the adapters (e.g. ``["classifier"]``).
        layers_to_transform: restrict adapters to these layer indices (``layers_pattern`` names the ModuleList);
            negative indices count from the top (``[-2, -1]``: the last two layers of any depth).
        layers_pattern: name of the ModuleList that ``layers_to_transform`` indexes (``layer`` for BERT).
    """

    technique = "lora"

    def __init__(
        self,
        net: NetworkFactory,
        input_shape: Sequence[int],
        num_classes: int,
        r: PositiveInt = 4,
        alpha: PositiveFloat = 4.0,
        dropout: Fraction = 0.0,
        target_modules: list[str] | str = "all-linear",
        modules_to_save: list[str] | None = None,
        layers_to_transform: list[int] | None = None,
        layers_pattern: str | None = None,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        self.lora_config = LoraConfig(
            r=r,
            lora_alpha=alpha,
            lora_dropout=dropout,
            bias="none",
            target_modules=target_modules,
            modules_to_save=modules_to_save,
            layers_to_transform=layers_to_transform,
            layers_pattern=layers_pattern,
        )
        super().__init__(net, input_shape, num_classes, optimizer, lr_scheduler)

    def build_network(self, net: NetworkFactory) -> nn.Module:
        base = super().build_network(net)
        layers = self.lora_config.layers_to_transform
        if layers and any(i < 0 for i in layers):  # "-2, -1" = the top two, whatever the encoder's depth
            count = _count_layers(base, self.lora_config.layers_pattern)
            self.lora_config.layers_to_transform = sorted(i % count for i in layers)
        return get_peft_model(base, self.lora_config)

    def deployed_model(self) -> nn.Module:
        """A merged copy: the base architecture with ``W + (alpha / r) B A`` folded in."""
        return copy.deepcopy(self.net).merge_and_unload()

    def dense_equivalent_parameters(self, deployed: nn.Module) -> int:
        return sum(p.numel() for p in deployed.parameters())  # the merged model: no second merge
