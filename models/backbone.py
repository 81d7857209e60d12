"""A convolutional feature extractor with any classifier head on top (the CIFAR conv modes of MorphReuse).

``ConvBackbone`` is the backbone described in spec 1.4: [Conv3x3 -> BN -> ReLU -> MaxPool2] for every stage but
the last, which is not pooled (3 -> 32 -> 64 -> 128 channels give 128 x 8 x 8 = 8,192 features on 32x32).
``BackboneClassifier`` puts a head network (MLP, SharedCoreMLP, ...) on its features; the backbone can be
trained with the head, or loaded from a Baseline run's checkpoint and frozen (its BatchNorm then stays in eval
mode, running statistics included).
"""

from collections.abc import Callable, Sequence
from typing import Annotated

import torch
from annotated_types import MinLen
from torch import Tensor, nn

from constraints import PositiveInt


class ConvBackbone(nn.Sequential):
    """``[Conv3x3 -> BN -> ReLU (-> MaxPool2)] x len(channels)``, the last stage without pooling."""

    def __init__(self, in_channels: int, channels: Sequence[int] = (32, 64, 128)) -> None:
        layers: list[nn.Module] = []
        for index, out in enumerate(channels):
            layers += [nn.Conv2d(in_channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
            if index < len(channels) - 1:
                layers.append(nn.MaxPool2d(2))
            in_channels = out
        super().__init__(*layers)


def load_backbone_state(checkpoint_path: str) -> dict[str, Tensor]:
    """The ``backbone.*`` tensors of a Lightning checkpoint (any wrapping prefix stripped)."""
    state = torch.load(checkpoint_path, map_location="cpu", weights_only=True)["state_dict"]
    found = {key.split("backbone.", 1)[1]: value for key, value in state.items() if "backbone." in key}
    if not found:
        raise ValueError(f"model.net.backbone_checkpoint {checkpoint_path!r} holds no backbone.* weights; give a checkpoint of a BackboneClassifier run.")
    return found


class BackboneClassifier(nn.Module):
    """``head(flatten(backbone(x)))``.

    Args:
        input_shape: ``(channels, height, width)``.
        num_classes: number of logits.
        head: the head network, called as ``head(feature_shape, num_classes)``.
        channels: backbone stages.
        freeze_backbone: keep the backbone fixed (no gradients, BatchNorm in eval mode).
        backbone_checkpoint: load the backbone from this checkpoint (e.g. a ``baseline_conv`` run's best).
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        head: Callable[[Sequence[int], int], nn.Module],
        channels: Annotated[Sequence[PositiveInt], MinLen(1)] = (32, 64, 128),
        freeze_backbone: bool = False,
        backbone_checkpoint: str | None = None,
    ) -> None:
        super().__init__()
        in_channels, height, width = input_shape
        self.backbone = ConvBackbone(in_channels, channels)
        if backbone_checkpoint:
            self.backbone.load_state_dict(load_backbone_state(backbone_checkpoint))
        self.freeze_backbone = freeze_backbone
        self.backbone.requires_grad_(not freeze_backbone)
        shrink = 2 ** (len(channels) - 1)
        self.head = head((channels[-1], height // shrink, width // shrink), num_classes)

    def train(self, mode: bool = True) -> "BackboneClassifier":
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()
        return self

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))
