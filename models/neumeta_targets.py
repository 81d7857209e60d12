"""NeuMeta target networks: the width-h networks whose weights the INR generates (spec: shared/specs/neumeta.md
§1.2, §2.2, §9.3).

Four targets, each a plain ``nn.Module`` built as ``Class(input_shape, num_classes, width=h, ...)``; ``x`` is
the flattened input (MLP targets) and ``h`` the morphable hidden width:

* ``NeuMetaHead`` ("digits_head" on sklearn digits, "mnist_head" on 784-pixel MNIST/FashionMNIST; §9.3 A/B)::

      s = ReLU(stem(x))               stem: D -> 64, pretrained then frozen
      u = ReLU(fc1(s))                fc1:  64 -> h   (generated)
      logits = fc2(u)                 fc2:  h -> K    (generated)

* ``NeuMetaResidual`` ("digits_res", the analogue of the paper's resizable ResNet-20 block; §9.3 A)::

      s = ReLU(stem(x));  b = ReLU(s + fc2(ReLU(fc1(s))));  logits = fc(b)
      fc1: 64 -> h, fc2: h -> 64 generated; stem and fc frozen

* ``NeuMetaCNN`` ("mnist_cnn", the repo's 3-conv "LeNet"; §1.2, §9.3 C), every tensor generated::

      conv1 C -> h (3x3) -> ReLU -> avgpool2 -> conv2 h -> 2h (5x5) -> ReLU -> avgpool2
      -> conv3 2h -> 4h (5x5) -> ReLU -> avgpool2 -> feature map at spatial position (0, 0) -> fc 4h -> K

* ``NeuMetaResNet20`` ("cifar_resnet20_block", the paper's CIFAR setting; §1.2 first row, §9.3 D): the CIFAR
  ResNet-20 (stem 3x3 C -> 16, three stages of 3 BasicBlocks with 16/32/64 channels, 1x1 conv + BN shortcut
  where the shape changes, global average pool, fc 64 -> K) whose last block is resizable::

      b = ReLU(s + conv2(ReLU(conv1(s))))    layer3.2: conv1 64 -> h (3x3), conv2 h -> 64 (3x3), generated

With ``batch_norm=True`` a BatchNorm sits after every producer except the last layer (before the ReLU, and for
the residual target after fc2, before the add, as in a ResNet BasicBlock; the ResNet-20 has it by default, with
bias-free convs, as the standard network). NeuMeta folds it away before smoothing and INR training (§1.1,
``models.neumeta_smoothing.fold_batchnorm_``); the INR always generates the folded (BN-free) tensors.

Each target carries a *layout* (a small frozen dataclass, picklable, independent of the module's weights) that
lists, as functions of h, the generated tensors in state-dict order (``tensors(h)``: name -> shape; the INR
numbers them t = 0 .. T-1 in this order, §3.1) and the cliques (§2.2): the (tensor, axis) slices that one hidden
channel permutation must move together, i.e. the output rows of a producer (weight rows, bias, BN
weight/bias/running_mean/running_var while BN is unfolded), the input columns of every consumer and, through a
residual add, every producer/consumer of the same stream. The first layer's input axis (pixels) and the last
layer's output axis (classes) belong to no clique, so they are never permuted (§2.5).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Member:
    """One slice of a clique: axis ``axis`` of the parameter or buffer ``name`` (a state-dict key)."""

    name: str
    axis: int


@dataclass(frozen=True)
class Clique:
    """``size`` channels whose slices in ``members`` are permuted together by one permutation."""

    name: str
    size: int
    members: tuple[Member, ...]


def _bn_members(prefix: str, present: bool) -> tuple[Member, ...]:
    """The per-channel entries of an unfolded BatchNorm (parameters and running statistics)."""
    if not present:
        return ()
    return tuple(Member(f"{prefix}.{key}", 0) for key in ("weight", "bias", "running_mean", "running_var"))


def _check_width(width: int) -> int:
    if isinstance(width, bool) or int(width) != width or width < 1:
        raise ValueError(f"width must be a positive integer, got {width!r}.")
    return int(width)


@dataclass(frozen=True)
class HeadLayout:
    """Layout of ``NeuMetaHead``: stem D -> stem_width (fixed), fc1 stem_width -> h, fc2 h -> K (generated)."""

    in_features: int
    num_classes: int
    stem_width: int = 64

    def tensors(self, width: int) -> dict[str, Shape]:
        h, s, k = _check_width(width), self.stem_width, self.num_classes
        return {"fc1.weight": (h, s), "fc1.bias": (h,), "fc2.weight": (k, h), "fc2.bias": (k,)}

    def cliques(self, width: int, batch_norm: bool = False) -> tuple[Clique, ...]:
        h = _check_width(width)
        stem = (Member("stem.weight", 0), Member("stem.bias", 0), *_bn_members("bn0", batch_norm),
                Member("fc1.weight", 1))
        hidden = (Member("fc1.weight", 0), Member("fc1.bias", 0), *_bn_members("bn1", batch_norm),
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
        h, s = _check_width(width), self.stem_width
        return {"fc1.weight": (h, s), "fc1.bias": (h,), "fc2.weight": (s, h), "fc2.bias": (s,)}

    def cliques(self, width: int, batch_norm: bool = False) -> tuple[Clique, ...]:
        h = _check_width(width)
        # The residual add couples the stem's outputs with the block's outputs: one stream clique.
        stream = (Member("stem.weight", 0), Member("stem.bias", 0), *_bn_members("bn0", batch_norm),
                  Member("fc1.weight", 1), Member("fc2.weight", 0), Member("fc2.bias", 0),
                  *_bn_members("bn2", batch_norm), Member("fc.weight", 1))
        hidden = (Member("fc1.weight", 0), Member("fc1.bias", 0), *_bn_members("bn1", batch_norm),
                  Member("fc2.weight", 1))
        return Clique("stream", self.stem_width, stream), Clique("hidden", h, hidden)

    def bn_pairs(self) -> tuple[tuple[str, str], ...]:
        return ("stem", "bn0"), ("fc1", "bn1"), ("fc2", "bn2")

    def relu_producers(self) -> tuple[str, ...]:
        return ("fc1",)


@dataclass(frozen=True)
class CNNLayout:
    """Layout of ``NeuMetaCNN``: conv1 C -> h (3x3), conv2 h -> 2h (5x5), conv3 2h -> 4h (5x5), fc 4h -> K."""

    in_channels: int
    num_classes: int

    def tensors(self, width: int) -> dict[str, Shape]:
        h, c, k = _check_width(width), self.in_channels, self.num_classes
        return {"conv1.weight": (h, c, 3, 3), "conv1.bias": (h,),
                "conv2.weight": (2 * h, h, 5, 5), "conv2.bias": (2 * h,),
                "conv3.weight": (4 * h, 2 * h, 5, 5), "conv3.bias": (4 * h,),
                "fc.weight": (k, 4 * h), "fc.bias": (k,)}

    def cliques(self, width: int, batch_norm: bool = False) -> tuple[Clique, ...]:
        h = _check_width(width)
        cliques = []
        for i, (size, consumer) in enumerate(((h, "conv2"), (2 * h, "conv3"), (4 * h, "fc")), start=1):
            members = (Member(f"conv{i}.weight", 0), Member(f"conv{i}.bias", 0), *_bn_members(f"bn{i}", batch_norm),
                       Member(f"{consumer}.weight", 1))
            cliques.append(Clique(f"conv{i}", size, members))
        return tuple(cliques)

    def bn_pairs(self) -> tuple[tuple[str, str], ...]:
        return ("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")

    def relu_producers(self) -> tuple[str, ...]:
        return "conv1", "conv2", "conv3"


def _conv_rows(conv: str, bn: str, batch_norm: bool) -> tuple[Member, ...]:
    """The output rows of a bias-free conv followed by BN (BN entries), or of its folded form (weight and bias)."""
    if batch_norm:
        return (Member(f"{conv}.weight", 0), *_bn_members(bn, True))
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
        h, c, m = _check_width(width), self.stage_widths[-1], self.morphable
        return {f"{m}.conv1.weight": (h, c, 3, 3), f"{m}.conv1.bias": (h,),
                f"{m}.conv2.weight": (c, h, 3, 3), f"{m}.conv2.bias": (c,)}

    def cliques(self, width: int, batch_norm: bool = False) -> tuple[Clique, ...]:
        h = _check_width(width)
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


class NeuMetaTarget(nn.Module):
    """Common interface of the targets: ``layout``, ``width``, the generated tensors and the cliques."""

    layout: HeadLayout | ResidualLayout | CNNLayout | ResNet20Layout
    width: int

    @property
    def has_batchnorm(self) -> bool:
        """True while BatchNorm modules are present (i.e. not yet folded)."""
        return any(isinstance(m, _BatchNorm) for m in self.modules())

    def generated_shapes(self) -> dict[str, Shape]:
        """Name -> shape of the INR-generated tensors at this target's width, in state-dict order."""
        return self.layout.tensors(self.width)

    def cliques(self) -> tuple[Clique, ...]:
        """The cliques of this module as it is now (BN entries included while BN is unfolded)."""
        return self.layout.cliques(self.width, batch_norm=self.has_batchnorm)

    def bn_pairs(self) -> list[tuple[str, str]]:
        """``(producer, batchnorm)`` module paths still to fold."""
        return [(p, b) for p, b in self.layout.bn_pairs() if isinstance(self.get_submodule(b), _BatchNorm)]

    def _config(self) -> dict:
        raise NotImplementedError

    def resized(self, width: int) -> NeuMetaTarget:
        """The same target at width ``width`` carrying this target's fixed (non-generated) weights.

        The generated tensors keep their random initialisation (they are replaced through
        ``torch.func.functional_call``). BatchNorm inside the width-dependent part must be folded first.
        """
        config = self._config() | {"width": _check_width(width), "batch_norm": self.has_batchnorm}
        ref = next(self.parameters())
        new = type(self)(**config).to(device=ref.device, dtype=ref.dtype)
        generated = set(self.layout.tensors(width))
        own = self.state_dict()
        fixed = {k: v for k, v in own.items() if k not in generated}
        target = new.state_dict()
        wrong = sorted(k for k, v in fixed.items() if tuple(target[k].shape) != tuple(v.shape))
        if wrong:
            raise ValueError(f"fixed entries {wrong} depend on the width; fold BatchNorm (fold_batchnorm_) before "
                             "building other widths.")
        new.load_state_dict(fixed, strict=False)
        new.train(self.training)
        return new


def _flat_features(input_shape: Sequence[int]) -> int:
    features = math.prod(int(v) for v in input_shape)
    if features < 1:
        raise ValueError(f"input_shape must describe at least one feature, got {tuple(input_shape)}.")
    return features


def _check_common(num_classes: int, stem_width: int | None = None) -> None:
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}.")
    if stem_width is not None and stem_width < 1:
        raise ValueError(f"stem_width must be >= 1, got {stem_width}.")


class _StemTarget(NeuMetaTarget):
    """Shared bookkeeping of the MLP targets behind a fixed stem (``NeuMetaHead``, ``NeuMetaResidual``)."""

    def _set_sizes(self, input_shape: Sequence[int], num_classes: int, width: int, stem_width: int) -> None:
        _check_common(num_classes, stem_width)
        self.input_shape, self.num_classes = tuple(int(v) for v in input_shape), int(num_classes)
        self.width, self.stem_width = _check_width(width), int(stem_width)

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

    def __init__(self, input_shape: Sequence[int], num_classes: int, width: int = 64, stem_width: int = 64,
                 batch_norm: bool = False) -> None:
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

    def __init__(self, input_shape: Sequence[int], num_classes: int, width: int = 64, stem_width: int = 64,
                 batch_norm: bool = False) -> None:
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

    def __init__(self, input_shape: Sequence[int], num_classes: int, width: int = 32, batch_norm: bool = False) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"NeuMetaCNN needs image inputs (C, H, W), got input_shape {tuple(input_shape)}.")
        if min(int(v) for v in input_shape[1:]) < 8:
            raise ValueError(f"NeuMetaCNN needs H, W >= 8 (three 2x poolings), got {tuple(input_shape)}.")
        _check_common(num_classes)
        self.input_shape, self.num_classes = tuple(int(v) for v in input_shape), int(num_classes)
        self.width = _check_width(width)
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

    def __init__(self, input_shape: Sequence[int], num_classes: int, width: int = 64, batch_norm: bool = True) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"NeuMetaResNet20 needs image inputs (C, H, W), got input_shape {tuple(input_shape)}.")
        _check_common(num_classes)
        self.input_shape, self.num_classes = tuple(int(v) for v in input_shape), int(num_classes)
        self.width = _check_width(width)
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


NEUMETA_TARGETS: dict[str, type[NeuMetaTarget]] = {"head": NeuMetaHead, "res": NeuMetaResidual, "cnn": NeuMetaCNN,
                                                     "resnet20": NeuMetaResNet20}


def build_target(kind: str, input_shape: Sequence[int], num_classes: int, width: int, **kwargs) -> NeuMetaTarget:
    """``NEUMETA_TARGETS[kind](input_shape, num_classes, width=width, **kwargs)`` with a clear error for ``kind``."""
    if kind not in NEUMETA_TARGETS:
        raise ValueError(f"target kind must be one of {sorted(NEUMETA_TARGETS)}, got {kind!r}.")
    return NEUMETA_TARGETS[kind](input_shape, num_classes, width=width, **kwargs)
