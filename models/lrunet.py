"""LruNet: a CNN whose stages reuse one depthwise/pointwise conv pair N times.

Spec: shared/specs/layercollapse_lrunet.md, B1-B7.

One stage (``LruBlock``) on P channels owns two shared convolutions, ``dw``: 3x3, groups P, P -> 2P and
``pw``: 1x1, groups 8, 2P -> P (no biases), and 2N BatchNorms of its own. With u_1 the stage input,

    v_i = BN^pw_i(pw(BN^dw_i(dw(u_i)))),   u_{i+1} = S(ReLU(v_i + u_i)) for i < N,   out = ReLU(v_N + u_N),

where S is the shuffle between uses (swap the two channel halves, then a 2-group channel shuffle):
S(u)[2k] = u[P/2 + k], S(u)[2k + 1] = u[k]. The shared weights get the sum of the N per-use gradients.

Network (cfg = [64, 128, 256, 512, 256] x width, width in {1, 2}): stem conv3x3 s2 (C -> 64) BN ReLU
[, concat(x, x) when width = 2] -> stage1 -> maxpool3 s2 -> concat(x, x) -> stage2 -> maxpool -> concat ->
stage3 -> concat -> stage4 -> maxpool -> grouped 1x1 conv (g 8) BN ReLU Dropout -> 1x1 conv (bias) ->
[ReLU on the logits in "parity" mode] -> average pool over the final 2x2 map -> (B, classes).
Concatenating a tensor with itself doubles channels without parameters.
"""

import re
from collections.abc import Mapping, Sequence
from typing import Literal, get_args

import torch
from torch import Tensor, nn

from constraints import Fraction, PositiveInt

LruNetWidth = Literal[1, 2]
LRUNET_WIDTHS: tuple[int, ...] = get_args(LruNetWidth)
_BASE_CFG = (64, 128, 256, 512, 256)
_STEM_CHANNELS = 64  # fixed for every width (B2); width 2 duplicates the stem output


def channel_shuffle_between_uses(x: Tensor) -> Tensor:
    """Swap the channel halves, then shuffle with 2 groups: out[2k] = x[P/2 + k], out[2k + 1] = x[k]."""
    batch, channels, height, width = x.shape
    if channels % 2:
        raise ValueError(f"the LRU shuffle needs an even number of channels, got {channels}.")
    halves = x.reshape(batch, 2, channels // 2, height, width).flip(1)  # (second half, first half)
    return halves.transpose(1, 2).reshape(batch, channels, height, width)


class LruBlock(nn.Module):
    """One LruNet stage: the shared ``dw``/``pw`` pair applied ``reuse`` times with per-use BatchNorms (B1).

    Args:
        channels: P, the stage's input and output channels (a multiple of 8, for the groups-8 ``pw``).
        reuse: N >= 1, how often the shared pair is applied.
    """

    def __init__(self, channels: int, reuse: int) -> None:
        super().__init__()
        if channels < 8 or channels % 8:
            raise ValueError(f"LruBlock channels must be a positive multiple of 8 (pw has groups=8), got {channels}.")
        if reuse < 1:
            raise ValueError(f"reuse must be >= 1, got {reuse}.")
        self.channels, self.reuse = channels, reuse
        self.dw = nn.Conv2d(channels, 2 * channels, 3, padding=1, groups=channels, bias=False)
        self.pw = nn.Conv2d(2 * channels, channels, 1, groups=8, bias=False)
        self.dw_bn_list = nn.ModuleList(nn.BatchNorm2d(2 * channels) for _ in range(reuse))
        self.pw_bn_list = nn.ModuleList(nn.BatchNorm2d(channels) for _ in range(reuse))
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        for i, (dw_bn, pw_bn) in enumerate(zip(self.dw_bn_list, self.pw_bn_list)):
            x = self.relu(pw_bn(self.pw(dw_bn(self.dw(x)))) + x)
            if i < self.reuse - 1:
                x = channel_shuffle_between_uses(x)
        return x

    def count_dense_equivalent_parameters(self) -> int:
        """The unrolled stage (accounting contract): N private copies of dw/pw plus the 2N BatchNorms."""
        shared = self.dw.weight.numel() + self.pw.weight.numel()
        norms = sum(p.numel() for bn in (*self.dw_bn_list, *self.pw_bn_list) for p in bn.parameters())
        return self.reuse * shared + norms


def _pooled(size: int) -> int:
    """Spatial size after a 3x3 stride-2 pad-1 conv or max-pool."""
    return (size - 1) // 2 + 1


class LruNet(nn.Module):
    """LruNet for 28x28 / 32x32 images (B2); state_dict keys match the authors' released checkpoints.

    Args:
        input_shape: ``(channels, height, width)`` of one sample (linked from the datamodule).
        num_classes: number of output logits.
        reuse: N, uses of each stage's shared conv pair (N-LruNet).
        width: channel multiplier, 1 or 2 (the reference design supports no other value).
        dropout: dropout probability before the final 1x1 conv.
        mode: "parity" keeps the reference ReLU on the logits (so logits >= 0); "clean" drops it.
        channels_last: keep weights and activations in NHWC memory layout. Same numbers; on CPU the grouped
            and depthwise convolutions train about 1.9x faster so (measured on 2 cores, N = 2, batch 128).
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        reuse: PositiveInt = 1,
        width: LruNetWidth = 1,
        dropout: Fraction = 0.5,
        mode: Literal["parity", "clean"] = "parity",
        channels_last: bool = True,
    ) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"LruNet needs image inputs (C, H, W); the datamodule gives shape {tuple(input_shape)}.")
        in_ch, height, width_px = (int(v) for v in input_shape)
        if in_ch < 1 or num_classes < 1:
            raise ValueError(f"need at least one input channel and one class, got input_shape {tuple(input_shape)}, "
                             f"num_classes {num_classes}.")
        final = [height, width_px]
        for _ in range(4):  # stem stride 2, then the three max-pools
            final = [_pooled(s) if s >= 1 else 0 for s in final]
        if min(final) < 1:
            raise ValueError(f"input spatial size {tuple(input_shape[1:])} vanishes in LruNet's four halvings.")

        cfg = [c * width for c in _BASE_CFG]
        self.num_classes, self.reuse, self.width, self.mode = num_classes, reuse, width, mode
        self.features = nn.Sequential(nn.Conv2d(in_ch, _STEM_CHANNELS, 3, stride=2, padding=1, bias=False),
                                      nn.BatchNorm2d(_STEM_CHANNELS), nn.ReLU())
        self.stage1, self.stage2, self.stage3, self.stage4 = (LruBlock(c, reuse) for c in cfg[:4])
        self.mpool = nn.MaxPool2d(3, stride=2, padding=1)
        # Indices 0, 1, 4 carry the published keys; 5 is the parity-mode ReLU on the logits (Identity in clean
        # mode, so indices never shift). Pooling sits outside the Sequential.
        self.classifier = nn.Sequential(
            nn.Conv2d(cfg[3], cfg[4], 1, groups=8, bias=False), nn.BatchNorm2d(cfg[4]), nn.ReLU(), nn.Dropout(dropout),
            nn.Conv2d(cfg[4], num_classes, 1), nn.ReLU() if mode == "parity" else nn.Identity())
        # The reference averages a 2x2 window over the final 2x2 map (28 and 32 pixel inputs both end at 2x2);
        # a global average is the same there and also valid for other input sizes.
        self.pool = nn.AdaptiveAvgPool2d(1)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")  # final conv bias keeps PyTorch's default init
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        self.channels_last = channels_last
        if channels_last:
            self.to(memory_format=torch.channels_last)

    @staticmethod
    def _double(x: Tensor) -> Tensor:
        return torch.cat([x, x], dim=1)

    def forward(self, x: Tensor) -> Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.features(x)
        if self.width == 2:
            x = self._double(x)
        x = self._double(self.mpool(self.stage1(x)))
        x = self._double(self.mpool(self.stage2(x)))
        x = self._double(self.stage3(x))
        x = self.mpool(self.stage4(x))
        return self.pool(self.classifier(x)).flatten(1)

    def conv_parameters(self) -> int:
        """Convolution weights and biases only (the B3 "conv-only" count: BatchNorm affine excluded)."""
        return sum(p.numel() for m in self.modules() if isinstance(m, nn.Conv2d) for p in m.parameters())


# --------------------------------------------------------------------------------------------------------
# Released checkpoints ({'net': state_dict, 'acc', 'epoch'}; keys prefixed 'module.', no num_batches_tracked)

_LRU_KEY = re.compile(r"stage(\d)\.(dw|pw)_bn_list\.(\d+)\.")
_REQUIRED_KEYS = ("features.0.weight", "stage1.dw.weight", "stage1.pw.weight", "classifier.4.weight")


def _plain_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Unwrap a ``{'net': ...}`` checkpoint and strip a DataParallel ``module.`` prefix."""
    if "net" in state_dict and isinstance(state_dict["net"], Mapping):
        state_dict = state_dict["net"]
    return {k.removeprefix("module."): v for k, v in state_dict.items()}


def lrunet_config_from_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, int]:
    """Infer ``reuse``, ``width``, ``num_classes`` and ``in_channels`` from an LruNet (published) state dict.

    Build the network with ``LruNet((in_channels, H, W), num_classes, reuse=..., width=...)``.
    """
    sd = _plain_state_dict(state_dict)
    missing = [k for k in _REQUIRED_KEYS if k not in sd]
    if missing:
        raise ValueError(f"not an LruNet state dict: missing {missing} (keys look like {sorted(sd)[:4]}).")
    uses: dict[tuple[int, str], set[int]] = {}
    for key in sd:
        if match := _LRU_KEY.match(key):
            uses.setdefault((int(match[1]), match[2]), set()).add(int(match[3]))
    counts = {len(v) for v in uses.values()}
    if len(uses) != 8 or len(counts) != 1 or any(v != set(range(len(v))) for v in uses.values()):
        found = {f"stage{s}.{kind}": sorted(v) for (s, kind), v in sorted(uses.items())}
        raise ValueError("not an LruNet state dict: stage1..4 need dw_bn_list/pw_bn_list entries 0..N-1 with the "
                         f"same N everywhere; found {found}.")
    stage1_channels = sd["stage1.pw.weight"].shape[0]
    if stage1_channels % _BASE_CFG[0] or stage1_channels // _BASE_CFG[0] not in LRUNET_WIDTHS:
        raise ValueError(f"not a supported LruNet state dict: stage1 has {stage1_channels} channels; width must be "
                         f"one of {LRUNET_WIDTHS} (64 or 128 channels).")
    return {"reuse": counts.pop(), "width": stage1_channels // _BASE_CFG[0],
            "num_classes": int(sd["classifier.4.weight"].shape[0]),
            "in_channels": int(sd["features.0.weight"].shape[1])}


def load_published_state_dict(net: LruNet, state_dict: Mapping[str, Tensor]) -> LruNet:
    """Load a released checkpoint's state dict into ``net`` strictly (``module.`` stripped, counters added)."""
    sd = _plain_state_dict(state_dict)
    own = net.state_dict()
    for key, value in own.items():
        if key.endswith("num_batches_tracked") and key not in sd:
            sd[key] = torch.zeros_like(value)
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    wrong = sorted(k for k in set(own) & set(sd) if tuple(own[k].shape) != tuple(sd[k].shape))
    if missing or unexpected or wrong:
        raise ValueError(f"state dict does not fit this LruNet (reuse {net.reuse}, width {net.width}, "
                         f"{net.num_classes} classes): missing {missing[:5]}, unexpected {unexpected[:5]}, "
                         f"wrong shape {wrong[:5]}; "
                         "use lrunet_config_from_state_dict to build a matching network.")
    net.load_state_dict(sd, strict=True)
    return net
