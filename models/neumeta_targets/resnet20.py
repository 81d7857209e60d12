"""The CIFAR ResNet-20 target with a resizable last block (the paper's CIFAR setting; §1.2 first row, §9.3 D).

Stem 3x3 C -> 16, three stages of 3 BasicBlocks with 16/32/64 channels, 1x1 conv + BN shortcut where the shape
changes, global average pool, fc 64 -> K; the last block is resizable::

    b = ReLU(s + conv2(ReLU(conv1(s))))    layer3.2: conv1 64 -> h (3x3), conv2 h -> 64 (3x3), generated
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from constraints import PositiveInt
from models.neumeta_targets.base import Clique, Member, NeuMetaTarget, Shape, bn_members, check_width


def _conv_rows(conv: str, bn: str, batch_norm: bool) -> tuple[Member, ...]:
    """The output rows of a bias-free conv followed by BN (BN entries), or of its folded form (weight and bias)."""
    if batch_norm:
        return (Member(f"{conv}.weight", 0), *bn_members(bn, True))
    return Member(f"{conv}.weight", 0), Member(f"{conv}.bias", 0)


@dataclass(frozen=True)
class ResNet20Layout:
    """Layout of ``NeuMetaResNet20``: everything fixed except the last block of stage 3, ``layer3.2``
    (conv1 64 -> h, conv2 h -> 64, both 3x3; with their folded-BN biases, T = 4).

    Cliques (§2.2, §2.5): one per residual stream (stage s: the stem or the stage's downsample shortcut, and
    every block's conv2, produce it; every block's conv1 and the next stage's conv1 + shortcut, or fc, consume
    it) and one per block (conv1 rows -> conv2 columns). Only ``hidden`` (layer3.2) has h channels; the
    stage-3 stream keeps 64 although it holds generated slices (layer3.2.conv2 rows, layer3.2.conv1 columns).
    """

    in_channels: int
    num_classes: int
    stage_widths: tuple[int, ...] = (16, 32, 64)
    blocks_per_stage: int = 3

    @property
    def morphable(self) -> str:
        """Module path of the resizable block."""
        return f"layer{len(self.stage_widths)}.{self.blocks_per_stage - 1}"

    def blocks(self) -> tuple[tuple[str, int, int, int], ...]:
        """``(path, in_channels, out_channels, stride)`` of every BasicBlock; a shortcut conv where in != out."""
        out, c_in = [], self.stage_widths[0]
        for s, c_out in enumerate(self.stage_widths):
            for b in range(self.blocks_per_stage):
                out.append((f"layer{s + 1}.{b}", c_in, c_out, 2 if s > 0 and b == 0 else 1))
                c_in = c_out
        return tuple(out)

    def tensors(self, width: int) -> dict[str, Shape]:
        h, c, m = check_width(width), self.stage_widths[-1], self.morphable
        return {f"{m}.conv1.weight": (h, c, 3, 3), f"{m}.conv1.bias": (h,),
                f"{m}.conv2.weight": (c, h, 3, 3), f"{m}.conv2.bias": (c,)}

    def cliques(self, width: int, batch_norm: bool = False) -> tuple[Clique, ...]:
        h = check_width(width)
        streams: list[list[Member]] = [list(_conv_rows("conv1", "bn1", batch_norm))]
        streams += [[] for _ in self.stage_widths[1:]]
        hidden = []
        for path, c_in, c_out, _ in self.blocks():
            s = int(path[len("layer"):path.index(".")]) - 1
            source = s - 1 if c_in != c_out else s  # the stream the block reads
            streams[source].append(Member(f"{path}.conv1.weight", 1))
            streams[s] += _conv_rows(f"{path}.conv2", f"{path}.bn2", batch_norm)
            if c_in != c_out:
                streams[source].append(Member(f"{path}.downsample.0.weight", 1))
                streams[s] += _conv_rows(f"{path}.downsample.0", f"{path}.downsample.1", batch_norm)
            members = (*_conv_rows(f"{path}.conv1", f"{path}.bn1", batch_norm), Member(f"{path}.conv2.weight", 1))
            if path == self.morphable:
                hidden.append(Clique("hidden", h, members))
            else:
                hidden.append(Clique(f"{path}.hidden", c_out, members))
        streams[-1].append(Member("fc.weight", 1))
        stream_cliques = tuple(Clique(f"stream{s + 1}", c, tuple(m)) for s, (c, m) in
                               enumerate(zip(self.stage_widths, streams)))
        return *stream_cliques, *hidden

    def bn_pairs(self) -> tuple[tuple[str, str], ...]:
        pairs = [("conv1", "bn1")]
        for path, c_in, c_out, _ in self.blocks():
            pairs += [(f"{path}.conv1", f"{path}.bn1"), (f"{path}.conv2", f"{path}.bn2")]
            if c_in != c_out:
                pairs.append((f"{path}.downsample.0", f"{path}.downsample.1"))
        return tuple(pairs)

    def relu_producers(self) -> tuple[str, ...]:
        return (f"{self.morphable}.conv1",)


class _BasicBlock(nn.Module):
    """``ReLU(shortcut(x) + bn2(conv2(ReLU(bn1(conv1(x))))))``: 3x3 convs c_in -> hidden -> c_out; the shortcut is
    the identity, or a strided 1x1 conv + BN (``downsample``) where the shape changes (option B)."""

    def __init__(self, c_in: int, hidden: int, c_out: int, stride: int, batch_norm: bool) -> None:
        super().__init__()

        def bn(c: int) -> nn.Module:
            return nn.BatchNorm2d(c) if batch_norm else nn.Identity()

        self.conv1 = nn.Conv2d(c_in, hidden, 3, stride=stride, padding=1, bias=not batch_norm)
        self.bn1 = bn(hidden)
        self.conv2 = nn.Conv2d(hidden, c_out, 3, padding=1, bias=not batch_norm)
        self.bn2 = bn(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=not batch_norm), bn(c_out))

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class NeuMetaResNet20(NeuMetaTarget):
    """CIFAR ResNet-20 (He et al. 2016, §4.2; shortcut option B) with a resizable last block (§1.2, T = 4).

    conv1 C -> 16 (3x3) + BN + ReLU -> layer1 (3 blocks, 16) -> layer2 (3 blocks, 32, stride 2) -> layer3
    (3 blocks, 64, stride 2) -> global average pool -> fc 64 -> K. Block ``layer3.2`` is 64 -> h -> 64; its two
    convs (with folded-BN biases) are generated, everything else is the frozen pretrained network. Module names
    follow torchvision (``layer2.0.downsample.0`` / ``.1`` is the shortcut conv / BN).

    Args:
        input_shape: ``(C, H, W)`` of one sample ((3, 32, 32) for CIFAR).
        num_classes: number of logits K.
        width: h, the hidden width of ``layer3.2`` (64 = the standard ResNet-20).
        batch_norm: bias-free convs each followed by BatchNorm2d (the trainable network); ``False`` is the folded
            form: every conv has a bias and every BN is ``nn.Identity`` (the state dict of a folded network loads).
    """

    def __init__(self, input_shape: Sequence[int], num_classes: PositiveInt, width: PositiveInt = 64,
                 batch_norm: bool = True) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"NeuMetaResNet20 needs image inputs (C, H, W), got input_shape {tuple(input_shape)}.")
        self.input_shape, self.num_classes = tuple(int(v) for v in input_shape), int(num_classes)
        self.width = int(width)
        self.layout = ResNet20Layout(self.input_shape[0], self.num_classes)
        stem = self.layout.stage_widths[0]
        self.conv1 = nn.Conv2d(self.input_shape[0], stem, 3, padding=1, bias=not batch_norm)
        self.bn1 = nn.BatchNorm2d(stem) if batch_norm else nn.Identity()
        stages: dict[str, list[nn.Module]] = {}
        for path, c_in, c_out, stride in self.layout.blocks():
            hidden = self.width if path == self.layout.morphable else c_out
            stages.setdefault(path.split(".")[0], []).append(_BasicBlock(c_in, hidden, c_out, stride, batch_norm))
        for name, blocks in stages.items():
            self.add_module(name, nn.Sequential(*blocks))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(self.layout.stage_widths[-1], self.num_classes)
        for m in self.modules():  # He initialisation (torchvision's ResNet); BN starts as the identity map
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def _config(self) -> dict:
        return {"input_shape": self.input_shape, "num_classes": self.num_classes}

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.pool(x).flatten(1))
