"""The repo's MNIST "LeNet" target (§1.2, §9.3 C), every tensor generated::

    conv1 C -> h (3x3) -> ReLU -> avgpool2 -> conv2 h -> 2h (5x5) -> ReLU -> avgpool2
    -> conv3 2h -> 4h (5x5) -> ReLU -> avgpool2 -> feature map at spatial position (0, 0) -> fc 4h -> K
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from constraints import PositiveInt
from models.neumeta_targets.base import Clique, Member, NeuMetaTarget, Shape, bn_members, check_width


@dataclass(frozen=True)
class CNNLayout:
    """Layout of ``NeuMetaCNN``: conv1 C -> h (3x3), conv2 h -> 2h (5x5), conv3 2h -> 4h (5x5), fc 4h -> K."""

    in_channels: int
    num_classes: int

    def tensors(self, width: int) -> dict[str, Shape]:
        h, c, k = check_width(width), self.in_channels, self.num_classes
        return {"conv1.weight": (h, c, 3, 3), "conv1.bias": (h,),
                "conv2.weight": (2 * h, h, 5, 5), "conv2.bias": (2 * h,),
                "conv3.weight": (4 * h, 2 * h, 5, 5), "conv3.bias": (4 * h,),
                "fc.weight": (k, 4 * h), "fc.bias": (k,)}

    def cliques(self, width: int, batch_norm: bool = False) -> tuple[Clique, ...]:
        h = check_width(width)
        cliques = []
        for i, (size, consumer) in enumerate(((h, "conv2"), (2 * h, "conv3"), (4 * h, "fc")), start=1):
            members = (Member(f"conv{i}.weight", 0), Member(f"conv{i}.bias", 0), *bn_members(f"bn{i}", batch_norm),
                       Member(f"{consumer}.weight", 1))
            cliques.append(Clique(f"conv{i}", size, members))
        return tuple(cliques)

    def bn_pairs(self) -> tuple[tuple[str, str], ...]:
        return ("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")

    def relu_producers(self) -> tuple[str, ...]:
        return "conv1", "conv2", "conv3"


class NeuMetaCNN(NeuMetaTarget):
    """The repo's MNIST "LeNet" (§1.2): three convs of widths h, 2h, 4h and a linear layer, all generated (T = 8).

    Every conv uses replicate padding k // 2 (size-preserving); the spec names replicate padding for conv1 only
    and leaves the 5x5 convs open, but without padding a 28x28 input vanishes before the third pooling.

    Args:
        input_shape: ``(C, H, W)`` of one sample, H and W >= 8 (three 2x poolings).
        num_classes: number of logits K.
        width: h (pretrained at 32 in the paper).
        batch_norm: BatchNorm2d after each conv (folded before smoothing / INR training).
    """

    def __init__(self, input_shape: Sequence[int], num_classes: PositiveInt, width: PositiveInt = 32,
                 batch_norm: bool = False) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"NeuMetaCNN needs image inputs (C, H, W), got input_shape {tuple(input_shape)}.")
        if min(int(v) for v in input_shape[1:]) < 8:
            raise ValueError(f"NeuMetaCNN needs H, W >= 8 (three 2x poolings), got {tuple(input_shape)}.")
        self.input_shape, self.num_classes = tuple(int(v) for v in input_shape), int(num_classes)
        self.width = int(width)
        self.layout = CNNLayout(self.input_shape[0], self.num_classes)
        h, c = self.width, self.input_shape[0]
        conv = dict(padding_mode="replicate")
        self.conv1 = nn.Conv2d(c, h, 3, padding=1, **conv)
        self.bn1 = nn.BatchNorm2d(h) if batch_norm else nn.Identity()
        self.conv2 = nn.Conv2d(h, 2 * h, 5, padding=2, **conv)
        self.bn2 = nn.BatchNorm2d(2 * h) if batch_norm else nn.Identity()
        self.conv3 = nn.Conv2d(2 * h, 4 * h, 5, padding=2, **conv)
        self.bn3 = nn.BatchNorm2d(4 * h) if batch_norm else nn.Identity()
        self.fc = nn.Linear(4 * h, self.num_classes)
        self.pool = nn.AvgPool2d(2)

    def _config(self) -> dict:
        return {"input_shape": self.input_shape, "num_classes": self.num_classes}

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(torch.relu(self.bn1(self.conv1(x))))
        x = self.pool(torch.relu(self.bn2(self.conv2(x))))
        x = self.pool(torch.relu(self.bn3(self.conv3(x))))
        return self.fc(x[:, :, 0, 0])
