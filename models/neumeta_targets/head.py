"""The MLP targets behind a fixed stem, on flattened inputs (§9.3 A/B): ``NeuMetaHead`` and ``NeuMetaResidual``.

Head::

    s = ReLU(stem(x))               stem: D -> 64, pretrained then frozen
    u = ReLU(fc1(s))                fc1:  64 -> h   (generated)
    logits = fc2(u)                 fc2:  h -> K    (generated)

Residual (the analogue of the paper's resizable ResNet-20 block)::

    s = ReLU(stem(x));  b = ReLU(s + fc2(ReLU(fc1(s))));  logits = fc(b)
    fc1: 64 -> h, fc2: h -> 64 generated; stem and fc frozen
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from constraints import PositiveInt
from models.neumeta_targets.base import Clique, Member, NeuMetaTarget, Shape, bn_members, check_width


@dataclass(frozen=True)
class HeadLayout:
    """Layout of ``NeuMetaHead``: stem D -> stem_width (fixed), fc1 stem_width -> h, fc2 h -> K (generated)."""

    in_features: int
    num_classes: int
    stem_width: int = 64

    def tensors(self, width: int) -> dict[str, Shape]:
        h, s, k = check_width(width), self.stem_width, self.num_classes
        return {"fc1.weight": (h, s), "fc1.bias": (h,), "fc2.weight": (k, h), "fc2.bias": (k,)}

    def cliques(self, width: int, batch_norm: bool = False) -> tuple[Clique, ...]:
        h = check_width(width)
        stem = (Member("stem.weight", 0), Member("stem.bias", 0), *bn_members("bn0", batch_norm),
                Member("fc1.weight", 1))
        hidden = (Member("fc1.weight", 0), Member("fc1.bias", 0), *bn_members("bn1", batch_norm),
                  Member("fc2.weight", 1))
        return Clique("stem", self.stem_width, stem), Clique("hidden", h, hidden)

    def bn_pairs(self) -> tuple[tuple[str, str], ...]:
        return ("stem", "bn0"), ("fc1", "bn1")

    def relu_producers(self) -> tuple[str, ...]:
        """Generated modules whose outputs feed a ReLU (their units can die; spec 9.4.6)."""
        return ("fc1",)


@dataclass(frozen=True)
class ResidualLayout:
    """Layout of ``NeuMetaResidual``: stem and fc fixed, the block fc1 (64 -> h) and fc2 (h -> 64) generated."""

    in_features: int
    num_classes: int
    stem_width: int = 64

    def tensors(self, width: int) -> dict[str, Shape]:
        h, s = check_width(width), self.stem_width
        return {"fc1.weight": (h, s), "fc1.bias": (h,), "fc2.weight": (s, h), "fc2.bias": (s,)}

    def cliques(self, width: int, batch_norm: bool = False) -> tuple[Clique, ...]:
        h = check_width(width)
        # The residual add couples the stem's outputs with the block's outputs: one stream clique.
        stream = (Member("stem.weight", 0), Member("stem.bias", 0), *bn_members("bn0", batch_norm),
                  Member("fc1.weight", 1), Member("fc2.weight", 0), Member("fc2.bias", 0),
                  *bn_members("bn2", batch_norm), Member("fc.weight", 1))
        hidden = (Member("fc1.weight", 0), Member("fc1.bias", 0), *bn_members("bn1", batch_norm),
                  Member("fc2.weight", 1))
        return Clique("stream", self.stem_width, stream), Clique("hidden", h, hidden)

    def bn_pairs(self) -> tuple[tuple[str, str], ...]:
        return ("stem", "bn0"), ("fc1", "bn1"), ("fc2", "bn2")

    def relu_producers(self) -> tuple[str, ...]:
        return ("fc1",)


def _flat_features(input_shape: Sequence[int]) -> int:
    features = math.prod(int(v) for v in input_shape)
    if features < 1:
        raise ValueError(f"input_shape must describe at least one feature, got {tuple(input_shape)}.")
    return features


class _StemTarget(NeuMetaTarget):
    """Shared bookkeeping of the MLP targets behind a fixed stem (``NeuMetaHead``, ``NeuMetaResidual``)."""

    def _set_sizes(self, input_shape: Sequence[int], num_classes: int, width: int, stem_width: int) -> None:
        self.input_shape, self.num_classes = tuple(int(v) for v in input_shape), int(num_classes)
        self.width, self.stem_width = int(width), int(stem_width)

    def _config(self) -> dict:
        return {"input_shape": self.input_shape, "num_classes": self.num_classes, "stem_width": self.stem_width}


class NeuMetaHead(_StemTarget):
    """flatten -> stem D->64 -> ReLU -> fc1 64->h -> ReLU -> fc2 h->K; fc1 and fc2 are generated (T = 4).

    Args:
        input_shape: shape of one sample (flattened): (64,) or (1, 8, 8) for digits, (1, 28, 28) for MNIST.
        num_classes: number of logits K.
        width: the morphable hidden width h.
        stem_width: the fixed interface width (64 in the spec).
        batch_norm: BatchNorm1d after stem and fc1 (folded before smoothing / INR training).
    """

    def __init__(self, input_shape: Sequence[int], num_classes: PositiveInt, width: PositiveInt = 64,
                 stem_width: PositiveInt = 64, batch_norm: bool = False) -> None:
        super().__init__()
        self._set_sizes(input_shape, num_classes, width, stem_width)
        self.layout = HeadLayout(_flat_features(input_shape), self.num_classes, self.stem_width)
        self.stem = nn.Linear(self.layout.in_features, self.stem_width)
        self.bn0 = nn.BatchNorm1d(self.stem_width) if batch_norm else nn.Identity()
        self.fc1 = nn.Linear(self.stem_width, self.width)
        self.bn1 = nn.BatchNorm1d(self.width) if batch_norm else nn.Identity()
        self.fc2 = nn.Linear(self.width, self.num_classes)

    def forward(self, x: Tensor) -> Tensor:
        s = torch.relu(self.bn0(self.stem(x.flatten(1))))
        return self.fc2(torch.relu(self.bn1(self.fc1(s))))


class NeuMetaResidual(_StemTarget):
    """flatten -> s = ReLU(stem(x)) -> ReLU(s + fc2(ReLU(fc1(s)))) -> fc; fc1 (64->h), fc2 (h->64) generated.

    Args:
        input_shape: shape of one sample (flattened).
        num_classes: number of logits K.
        width: the morphable hidden width h of the residual block.
        stem_width: width of the residual stream (64 in the spec).
        batch_norm: BatchNorm1d after stem, fc1 and fc2 (before the add), as in a ResNet BasicBlock.
    """

    def __init__(self, input_shape: Sequence[int], num_classes: PositiveInt, width: PositiveInt = 64,
                 stem_width: PositiveInt = 64, batch_norm: bool = False) -> None:
        super().__init__()
        self._set_sizes(input_shape, num_classes, width, stem_width)
        self.layout = ResidualLayout(_flat_features(input_shape), self.num_classes, self.stem_width)
        self.stem = nn.Linear(self.layout.in_features, self.stem_width)
        self.bn0 = nn.BatchNorm1d(self.stem_width) if batch_norm else nn.Identity()
        self.fc1 = nn.Linear(self.stem_width, self.width)
        self.bn1 = nn.BatchNorm1d(self.width) if batch_norm else nn.Identity()
        self.fc2 = nn.Linear(self.width, self.stem_width)
        self.bn2 = nn.BatchNorm1d(self.stem_width) if batch_norm else nn.Identity()
        self.fc = nn.Linear(self.stem_width, self.num_classes)

    def forward(self, x: Tensor) -> Tensor:
        s = torch.relu(self.bn0(self.stem(x.flatten(1))))
        branch = self.bn2(self.fc2(torch.relu(self.bn1(self.fc1(s)))))
        return self.fc(torch.relu(s + branch))
