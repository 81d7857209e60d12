"""Mobile baselines of the LruNet comparison (spec B5), adapted to 28x28 / 32x32 inputs like the reference repo.

All four end in global average pooling and one Linear; each cuts ImageNet's total stride of 32 down to 8 (a 4x4 map
from 32x32, 4x4 from 28x28) by a stride-1 stem and by dropping one further downsampling:

* ``MobileNetV1``: y = ReLU(BN(pw(ReLU(BN(dw(x)))))) per depthwise-separable block.
* ``MobileNetV2Small``: torchvision's inverted residuals x + BN(pw(ReLU6(BN(dw(ReLU6(BN(expand(x)))))))).
* ``ShuffleNetV1``: ReLU(x + BN(gconv(ReLU(BN(dw(shuffle(ReLU(BN(gconv(x)))))))))), concat with AvgPool(x) at stride 2.
  (The reference repo has a ReLU after the depthwise BN; the ShuffleNet paper has none. The repo is followed.)
* ``ShuffleNetV2Small``: torchvision's split / branch / concat / 2-group shuffle units.

Channel tables and rounding follow okankop/CNN-layer-reuse (commit 1dd8d42, MIT): widths are ``int(c * width)``.
"""

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn
from torchvision.models import mobilenetv2 as tv_mobilenetv2
from torchvision.models import shufflenetv2 as tv_shufflenetv2
from torchvision.ops.misc import Conv2dNormActivation

from constraints import Fraction, PositiveFloat


def _image_channels(input_shape: Sequence[int], name: str) -> int:
    if len(input_shape) != 3 or min(int(v) for v in input_shape) < 1:
        raise ValueError(f"{name} needs image inputs (C, H, W); the datamodule gives shape {tuple(input_shape)}.")
    return int(input_shape[0])


def _scaled(channels: int, width: float, name: str) -> int:
    """The reference repo's rounding, ``int(channels * width)`` (floor), which must stay >= 1."""
    if int(channels * width) < 1:
        raise ValueError(f"model.net.width ({name}) must keep every layer at >= 1 channel "
                         f"(int({channels} * width) >= 1), got {width}.")
    return int(channels * width)


def _init_conv_bn_linear(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


# --------------------------------------------------------------------------------------------------------
# MobileNet v1: torchvision has none, so it is written here.

# (channels, blocks, stride of the first block) per stage, as in the reference repo. The paper's table puts stride 2
# on the blocks that output 128/256/512/1024; the reference puts it one block earlier (outputs 64/128/256/512) and,
# with the stride-1 stem, sets the third stage (256) to stride 1 (B5). Parameter counts do not depend on strides.
_MOBILENET_V1_STAGES = ((64, 1, 2), (128, 2, 2), (256, 2, 1), (512, 6, 2), (1024, 2, 1))


def _separable(in_ch: int, out_ch: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, in_ch, 3, stride=stride, padding=1, groups=in_ch, bias=False), nn.BatchNorm2d(in_ch),
        nn.ReLU(inplace=True),
        nn.Conv2d(in_ch, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True))


class MobileNetV1(nn.Module):
    """MobileNet v1 for small images: 3x3 stem (stride 1, 32 x width) and 13 depthwise-separable blocks.

    Args:
        input_shape: ``(channels, height, width)``; num_classes: output logits.
        width: channel multiplier (B5 uses 0.25 for CIFAR-10 / Fashion-MNIST, 0.4 for CIFAR-100).
        dropout: dropout before the Linear head (0.2 in the reference repo).

    Initialisation is PyTorch's default, as in the reference repo.
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int, width: PositiveFloat = 0.25,
                 dropout: Fraction = 0.2) -> None:
        super().__init__()
        in_ch = _image_channels(input_shape, "MobileNetV1")
        channels = _scaled(32, width, "MobileNetV1")
        layers: list[nn.Module] = [Conv2dNormActivation(in_ch, channels, stride=1, activation_layer=nn.ReLU)]
        for out, blocks, stride in _MOBILENET_V1_STAGES:
            out = _scaled(out, width, "MobileNetV1")
            for i in range(blocks):
                layers.append(_separable(channels, out, stride if i == 0 else 1))
                channels = out
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(channels, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).mean((2, 3)))


# --------------------------------------------------------------------------------------------------------
# MobileNet v2: torchvision's network with the small-input setting.

# t, c, n, s: the ImageNet table with the fourth stage (64 channels) at stride 1 instead of 2.
_MOBILENET_V2_SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 1), (6, 96, 3, 1), (6, 160, 3, 2),
                         (6, 320, 1, 1))


class MobileNetV2Small(tv_mobilenetv2.MobileNetV2):
    """torchvision MobileNetV2 with a stride-1 stem and a stride-1 fourth stage; last conv 1280 for width <= 1.

    Channels are ``int(c * width)`` as in the reference repo (torchvision itself rounds to the nearest
    multiple of ``round_nearest``), so the stem, the first block and, for width > 1, the last conv are rebuilt.

    Args:
        input_shape: ``(channels, height, width)``; num_classes: output logits.
        width: channel multiplier (B5: 0.25 for CIFAR-10 / Fashion-MNIST, 0.4 for CIFAR-100).
        dropout: dropout before the Linear head.
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int, width: PositiveFloat = 0.25,
                 dropout: Fraction = 0.2) -> None:
        in_ch = _image_channels(input_shape, "MobileNetV2Small")
        setting = [[t, _scaled(c, width, "MobileNetV2Small"), n, s] for t, c, n, s in _MOBILENET_V2_SETTING]
        super().__init__(num_classes=num_classes, width_mult=1.0, inverted_residual_setting=setting, round_nearest=1,
                         dropout=dropout)
        stem = _scaled(32, width, "MobileNetV2Small")
        last = _scaled(1280, width, "MobileNetV2Small") if width > 1.0 else 1280
        self.features[0] = Conv2dNormActivation(in_ch, stem, stride=1, activation_layer=nn.ReLU6)
        self.features[1] = tv_mobilenetv2.InvertedResidual(stem, setting[0][1], stride=1, expand_ratio=1)
        rebuilt = [self.features[0], self.features[1]]
        if last != self.last_channel:
            self.features[-1] = Conv2dNormActivation(setting[-1][1], last, kernel_size=1, activation_layer=nn.ReLU6)
            self.classifier[-1] = nn.Linear(last, num_classes)
            self.last_channel = last
            rebuilt += [self.features[-1], self.classifier[-1]]
        for module in rebuilt:  # the same initialisation torchvision gave everything else
            _init_conv_bn_linear(module)


# --------------------------------------------------------------------------------------------------------
# ShuffleNet v1 (groups 3): torchvision has none, so it is written here.


def _group_shuffle(x: Tensor, groups: int) -> Tensor:
    batch, channels, height, width = x.shape
    grouped = x.reshape(batch, groups, channels // groups, height, width)  # integer division (B6)
    return grouped.transpose(1, 2).reshape(batch, channels, height, width)


class ShuffleUnitV1(nn.Module):
    """Grouped 1x1 -> BN ReLU -> shuffle -> depthwise 3x3 (stride s) BN ReLU -> grouped 1x1 BN, then
    ReLU(x + branch) for stride 1 or ReLU(concat(branch, AvgPool3x3s2(x))) for stride 2."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, groups: int) -> None:
        super().__init__()
        branch_out = out_ch - in_ch if stride == 2 else out_ch
        mid = (branch_out // (4 * groups)) * groups  # bottleneck = out / 4, kept a multiple of the groups
        if (stride == 1 and in_ch != out_ch) or branch_out < groups or mid < groups:
            raise ValueError(f"ShuffleUnitV1 cannot map {in_ch} -> {out_ch} channels with stride {stride}, "
                             f"groups {groups}; use a larger width.")
        self.stride, self.groups = stride, groups
        self.conv1 = nn.Conv2d(in_ch, mid, 1, groups=groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, branch_out, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(branch_out)
        self.shortcut = nn.AvgPool2d(3, stride=2, padding=1) if stride == 2 else nn.Identity()
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = _group_shuffle(self.relu(self.bn1(self.conv1(x))), self.groups)
        out = self.bn3(self.conv3(self.relu(self.bn2(self.conv2(out)))))
        shortcut = self.shortcut(x)
        return self.relu(torch.cat([out, shortcut], 1) if self.stride == 2 else out + shortcut)


class ShuffleNetV1(nn.Module):
    """ShuffleNet v1 (g = 3) for small images: 3x3 stem (stride 1, no max-pool), stages of [4, 8, 4] units.

    Stage outputs 240/480/960 x width and the 24 x width stem are rounded down to multiples of ``groups``. As in
    the reference repo, the first unit's 1x1 conv is grouped too (the paper leaves that one dense), and
    initialisation is PyTorch's default.

    Args:
        input_shape: ``(channels, height, width)``; num_classes: output logits.
        width: channel multiplier (B5: 0.5 for CIFAR-10 / Fashion-MNIST, 0.75 for CIFAR-100).
        groups: groups of the 1x1 convolutions (3; 8 uses the 384/768/1536 table).
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int, width: PositiveFloat = 0.5,
                 groups: Literal[3, 8] = 3) -> None:
        super().__init__()
        tables = {3: (24, 240, 480, 960), 8: (24, 384, 768, 1536)}
        in_ch = _image_channels(input_shape, "ShuffleNetV1")
        stem, *outs = (max(groups, _scaled(c, width, "ShuffleNetV1") // groups * groups) for c in tables[groups])
        self.stem = Conv2dNormActivation(in_ch, stem, stride=1, activation_layer=nn.ReLU)
        stages, channels = [], stem
        for out, units in zip(outs, (4, 8, 4)):
            first = ShuffleUnitV1(channels, out, 2, groups)
            stages.append(nn.Sequential(first, *(ShuffleUnitV1(out, out, 1, groups) for _ in range(units - 1))))
            channels = out
        self.stages = nn.Sequential(*stages)
        self.linear = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.stages(self.stem(x)).mean((2, 3)))


# --------------------------------------------------------------------------------------------------------
# ShuffleNet v2: torchvision's network with the small-input stem.

# Stage outputs (after the 24-channel stem) and the final 1x1 conv, from the reference repo's table (it matches the
# ShuffleNet V2 paper for 0.5/1/1.5; 0.25 and 0.75 are the repo's own; for 2.0 the repo has 224 where the paper
# has 244 for the first stage; the repo's value is kept for parity).
SHUFFLENET_V2_CHANNELS: dict[float, tuple[int, int, int, int]] = {
    0.25: (32, 64, 128, 1024), 0.5: (48, 96, 192, 1024), 0.75: (60, 120, 240, 1024),
    1.0: (116, 232, 464, 1024), 1.5: (176, 352, 704, 1024), 2.0: (224, 488, 976, 2048),
}


class ShuffleNetV2Small(tv_shufflenetv2.ShuffleNetV2):
    """torchvision ShuffleNetV2 (stage repeats [4, 8, 4]) with a stride-1 stem and no stem max-pool.

    ImageNet's stem (stride-2 conv + stride-2 max-pool) would shrink 32x32 to 8x8 before the three stride-2 stages
    (1x1 at the end); without both the stages see 32 -> 16 -> 8 -> 4 (28 -> 14 -> 7 -> 4).

    Args:
        input_shape: ``(channels, height, width)``; num_classes: output logits.
        width: one of ``SHUFFLENET_V2_CHANNELS`` (B5: 0.25 for CIFAR-10 / Fashion-MNIST, 0.75 for CIFAR-100).
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int, width: PositiveFloat = 0.25) -> None:
        in_ch = _image_channels(input_shape, "ShuffleNetV2Small")
        if width not in SHUFFLENET_V2_CHANNELS:  # a float choice: Literal takes no floats
            raise ValueError(f"model.net.width (ShuffleNetV2Small) must be one of {sorted(SHUFFLENET_V2_CHANNELS)}, "
                             f"got {width}.")
        super().__init__(stages_repeats=[4, 8, 4], stages_out_channels=[24, *SHUFFLENET_V2_CHANNELS[width]],
                         num_classes=num_classes)
        self.conv1[0] = nn.Conv2d(in_ch, 24, 3, stride=1, padding=1, bias=False)
        self.maxpool = nn.Identity()
