"""LruNet: convolutional layer reuse (spec shared/specs/layercollapse_lrunet.md B).

The technique lives in the network (``models.LruNet``: each stage's depthwise/pointwise pair applied N times,
the shared weights summing the N per-use gradients); training is plain cross-entropy (B4 recipe in the configs).
This module names the technique in summaries and records what reuse buys: total trainable parameters, the
conv-only count (B3), and the parameters of the unrolled network (``params.dense_equivalent``).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lightning_modules.base import ClassificationModule, NetworkFactory


class LayerReuse(ClassificationModule):
    """Cross-entropy training of a layer-reusing network (``models.LruNet``); see ``ClassificationModule``."""

    technique = "lrunet"

    def build_network(self, net: NetworkFactory) -> nn.Module:
        network = net(self.input_shape, self.num_classes)
        if not hasattr(network, "reuse") or not hasattr(network, "conv_parameters"):
            raise ValueError(f"lightning_modules.LayerReuse needs model.net models.LruNet, got {type(network).__name__}.")
        return network

    def summary_extras(self, deployed: nn.Module) -> dict[str, Any]:
        return {"lrunet": {"reuse": self.net.reuse, "width": self.net.width, "mode": self.net.mode,
                           "conv_parameters": self.net.conv_parameters()}}
