"""LayerCollapse: single-slope PReLU blocks that can be folded into one Linear (spec: shared/specs/layercollapse_lrunet.md A).

A ``CollapsibleBlock`` is ``fc1 -> PReLU(one slope a) -> Dropout -> (BatchNorm1d) -> fc2``. Training adds
``lambda * sum (a - 1)^2`` (``lightning_modules.LayerCollapse``) to pull the slopes towards 1; a block with
``|a - 1| < tau`` is then replaced by one ``nn.Linear``. Collapse uses eval semantics and treats the slope as
exactly 1, so the collapsed model equals the *linearised* model (slope forced to 1) up to rounding, and differs
from the trained PReLU model by at most ``|a - 1| * ||W2|| * |min(z, 0)|`` (spec A5/A6).

Algebra (A6), with the optional eval-mode BatchNorm written as the affine map ``z -> s * z + t``,
``s = gamma / sqrt(running_var + eps)``, ``t = beta - s * running_mean``: a chain ``L_1, BN_1, L_2, ..., L_k``
collapses to ``W = W_k diag(s_{k-1}) W_{k-1} ... W_1`` and the matching bias (each BN folded into the Linear
before it by torch's ``fuse_linear_bn_weights``, then the products); dropout (identity in eval) is dropped.
Missing biases count as zero. Not handled (rejected): per-channel PReLU, 1x1-conv MLPs, BN without running
statistics.

Conversions (A7): ``convert_vgg_classifier`` turns the two ReLUs of a torchvision VGG classifier into
single-slope PReLUs with a0 = 0 (function preserving); ``collapse_vgg_classifier`` folds the runs of linear
layers whose activations are within tau of 1 (both -> one ``Linear(25088, 1000)``). ``convert_vit_mlps_``
(``collapsible_from_mlp``) turns the MLPs of the last k blocks of a torchvision ViT (or any
``Linear, GELU, Dropout, Linear`` MLP, timm's ``Mlp`` included) into ``CollapsibleBlock``s with PReLU(a0 = 0.01);
this *changes* the function and needs fine-tuning before the slope is near 1. ``models.mixer`` does the same for
MLP-Mixer blocks and ``models.collapsible_vgg`` is the custom CIFAR VGG.
"""

import math
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_linear_bn_weights

from constraints import Fraction, PositiveInt


def _is_single_prelu(m: nn.Module) -> bool:
    return isinstance(m, nn.PReLU) and m.weight.numel() == 1


def _fold_bn(linear: nn.Linear, bn: nn.BatchNorm1d | None) -> tuple[Tensor, Tensor | None]:
    """``linear`` followed by ``bn`` in eval mode as one (weight, bias): torch's Linear-BatchNorm fusion
    (``fuse_linear_bn_weights``, the math of ``fuse_linear_bn_eval`` without its eval-mode assertion: collapse
    always uses eval semantics, also while the network trains). No affine parameters count as gamma 1, beta 0."""
    if bn is None:
        return linear.weight, linear.bias
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("collapse needs BatchNorm1d with running statistics (track_running_stats=True).")
    gamma = bn.weight if bn.weight is not None else torch.ones_like(bn.running_var)
    beta = bn.bias if bn.bias is not None else torch.zeros_like(bn.running_mean)
    return fuse_linear_bn_weights(linear.weight, linear.bias, bn.running_mean, bn.running_var, bn.eps, gamma, beta)


@torch.no_grad()
def collapse_chain(linears: Sequence[nn.Linear], batchnorms: Sequence[nn.BatchNorm1d | None] | None = None) -> nn.Linear:
    """One ``nn.Linear`` equal to ``L_k(BN_{k-1}(... BN_1(L_1 x)))`` in eval mode (``batchnorms[i]`` sits after
    ``linears[i]``; ``None`` entries mean no norm). Each BatchNorm is first folded into the Linear before it
    (``_fold_bn``); the products are then formed from the output side, in the layers' dtype, so the large
    input-side matrix is multiplied once (e.g. VGG: (1000x4096 @ 4096x4096) @ 4096x25088)."""
    linears = list(linears)
    if not linears:
        raise ValueError("collapse_chain needs at least one Linear.")
    norms = list(batchnorms) if batchnorms is not None else [None] * (len(linears) - 1)
    if len(norms) != len(linears) - 1:
        raise ValueError(f"expected {len(linears) - 1} batchnorm entries, got {len(norms)}.")
    for a, b in zip(linears[:-1], linears[1:]):
        if a.out_features != b.in_features:
            raise ValueError(f"chain shape mismatch: {a.out_features} -> {b.in_features}.")
    folded = [_fold_bn(lin, bn) for lin, bn in zip(linears[:-1], norms)]
    last = linears[-1]
    weight = last.weight.detach().clone()
    bias = last.bias.detach().clone() if last.bias is not None else weight.new_zeros(last.out_features)
    for lin_weight, lin_bias in reversed(folded):
        if lin_bias is not None:
            bias = bias + weight @ lin_bias.to(weight)
        weight = weight @ lin_weight.to(weight)
    out = nn.Linear(linears[0].in_features, last.out_features, device=weight.device, dtype=weight.dtype)
    out.weight.copy_(weight)
    out.bias.copy_(bias)
    return out


class CollapsibleBlock(nn.Module):
    """``fc1 -> PReLU(num_parameters=1, init=slope_init) -> Dropout -> (BatchNorm1d(hidden)) -> fc2``."""

    def __init__(self, in_features: int, hidden: int, out_features: int, slope_init: float = 0.01, dropout: float = 0.0, batch_norm: bool = False) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}.")
        self.fc1 = nn.Linear(in_features, hidden)
        self.act = nn.PReLU(num_parameters=1, init=slope_init)
        self.drop = nn.Dropout(dropout)
        self.norm = nn.BatchNorm1d(hidden) if batch_norm else nn.Identity()
        self.fc2 = nn.Linear(hidden, out_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.norm(self.drop(self.act(self.fc1(x)))))

    def slope(self) -> float:
        return float(self.act.weight.detach().reshape(()))

    def collapsible(self, tau: float = 0.05) -> bool:
        return abs(self.slope() - 1.0) < tau

    def collapse(self) -> nn.Linear:
        """The eval-mode, slope-treated-as-1 map as one ``nn.Linear`` (does not check ``collapsible``)."""
        bn = self.norm if isinstance(self.norm, nn.BatchNorm1d) else None
        return collapse_chain([self.fc1, self.fc2], [bn])


class CollapsibleMLP(nn.Module):
    """VGG-head-like classifier on flattened inputs with the last ``collapsible_last`` hidden layers collapsible.

    With ``n = len(hidden)`` and ``c = collapsible_last`` (1 <= c <= n) the structure (``self.layers``) is::

        flatten
        fc{i} = Linear(w_i, hidden[i]) -> act{i} = ReLU -> drop{i} = Dropout        for i < n - c  (never collapsed)
        block{j} = CollapsibleBlock(w, hidden[n-c+j], out_j)                       for j < c
        (between blocks: bact{j} = ReLU -> bdrop{j} = Dropout)

    where ``out_j = num_classes`` for the last block and ``hidden[n-c+j]`` otherwise. ``hidden=(512, 512), c=1``:
    Flatten -> Linear(D, 512) -> ReLU -> Dropout -> CollapsibleBlock(512, 512, classes). Dropout modules are only
    present for ``dropout > 0``. A collapsed ``block{j}`` becomes an ``nn.Linear`` under the same name, so
    ``rebuild_collapsed_(mlp, ["layers.block{j}"])`` rebuilds the architecture for ``load_state_dict``.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        hidden: Sequence[PositiveInt] = (512, 512),
        slope_init: float = 0.01,
        dropout: Fraction = 0.0,
        batch_norm: bool = False,
        collapsible_last: PositiveInt = 1,
    ) -> None:
        super().__init__()
        hidden = [int(h) for h in hidden]
        n, c = len(hidden), int(collapsible_last)
        if not 1 <= c <= n:
            raise ValueError(f"model.net.collapsible_last (CollapsibleMLP) must be in [1, len(hidden) = {n}], got {c}.")
        layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
        width = math.prod(input_shape)
        for i, h in enumerate(hidden[: n - c]):
            layers[f"fc{i}"], layers[f"act{i}"] = nn.Linear(width, h), nn.ReLU()
            if dropout > 0:
                layers[f"drop{i}"] = nn.Dropout(dropout)
            width = h
        for j, h in enumerate(hidden[n - c:]):
            out = num_classes if j == c - 1 else h
            layers[f"block{j}"] = CollapsibleBlock(width, h, out, slope_init, dropout, batch_norm)
            if j < c - 1:
                layers[f"bact{j}"] = nn.ReLU()
                if dropout > 0:
                    layers[f"bdrop{j}"] = nn.Dropout(dropout)
            width = out
        self.layers = nn.Sequential(layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)

    def blocks(self) -> list[tuple[str, CollapsibleBlock]]:
        """The not-yet-collapsed blocks, in order, with their names in ``self.layers``."""
        return [(n, m) for n, m in self.layers.named_children() if isinstance(m, CollapsibleBlock)]


# --------------------------------------------------------------------------------------------------------
# Collapse by module path (any network that contains CollapsibleBlocks: MLPs, Mixers, VGG heads)


def collapsible_blocks(root: nn.Module) -> dict[str, CollapsibleBlock]:
    """Every not-yet-collapsed ``CollapsibleBlock`` of ``root`` by module path, in registration order."""
    return {name: m for name, m in root.named_modules() if isinstance(m, CollapsibleBlock)}


@torch.no_grad()
def collapse_blocks_(root: nn.Module, names: Sequence[str]) -> list[str]:
    """Replace the ``CollapsibleBlock`` at each module path by its collapsed ``nn.Linear`` (slope taken as 1,
    whatever it is: check ``collapsible(tau)`` first). In place; returns ``names``."""
    for name in names:
        block = root.get_submodule(name)
        if not isinstance(block, CollapsibleBlock):
            raise ValueError(f"{name!r} is a {type(block).__name__}, not a CollapsibleBlock; cannot collapse it.")
        root.set_submodule(name, block.collapse())
    return list(names)


def rebuild_collapsed_(root: nn.Module, names: Sequence[str]) -> None:
    """Give ``root`` the architecture it had after ``collapse_blocks_(root, names)``: each named block becomes a
    zero-initialised ``nn.Linear`` of the collapsed shape, ready for ``load_state_dict`` (checkpoints store only
    the names). Already-collapsed names are skipped; unknown names are refused."""
    for name in names:
        try:
            block = root.get_submodule(name)
        except AttributeError:
            raise ValueError(f"the checkpoint collapsed block {name!r}, which this network does not have.") from None
        if isinstance(block, nn.Linear):
            continue
        if not isinstance(block, CollapsibleBlock):
            raise ValueError(f"the checkpoint collapsed {name!r}, but here it is a {type(block).__name__}.")
        ref = block.fc1.weight
        lin = nn.Linear(block.fc1.in_features, block.fc2.out_features, device=ref.device, dtype=ref.dtype)
        nn.init.zeros_(lin.weight)
        nn.init.zeros_(lin.bias)
        root.set_submodule(name, lin)


def collapsible_from_mlp(mlp: nn.Module, slope_init: float = 0.01) -> nn.Module:
    """A ``CollapsibleBlock`` with the weights of a transformer/Mixer MLP, its activation (GELU) replaced by a
    single-slope PReLU(slope_init) (spec A7: this CHANGES the function; fine-tune with the regulariser next).

    Accepts torchvision's ``MLPBlock`` / any ``Sequential(Linear, act, Dropout, Linear[, Dropout])`` and timm's
    ``Mlp`` (attributes ``fc1, act, drop1, norm, fc2, drop2``; its norm must be Identity). A dropout after the
    second Linear is kept: the result is then ``Sequential(block, Dropout)``.
    """
    if isinstance(mlp, nn.Sequential):
        linears = [m for m in mlp if isinstance(m, nn.Linear)]
        drops = [m for m in mlp if isinstance(m, nn.Dropout)]
        others = [m for m in mlp if not isinstance(m, (nn.Linear, nn.Dropout))]
        if len(linears) != 2 or len(others) != 1 or not 1 <= len(drops) <= 2 or not isinstance(mlp[0], nn.Linear):
            raise ValueError("expected Sequential(Linear, activation, Dropout, Linear[, Dropout]).")
        fc1, fc2, drop1 = linears[0], linears[1], drops[0]
        drop2 = mlp[-1] if isinstance(mlp[-1], nn.Dropout) and len(drops) == 2 else None
    elif all(hasattr(mlp, a) for a in ("fc1", "fc2")):
        fc1, fc2, drop1, drop2 = mlp.fc1, mlp.fc2, getattr(mlp, "drop1", None), getattr(mlp, "drop2", None)
        if not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity):
            raise ValueError("an MLP with a norm between fc1 and fc2 is not supported (only Identity).")
    else:
        raise ValueError(f"cannot convert a {type(mlp).__name__}: need fc1/fc2 attributes or a Linear-act-Linear Sequential.")
    if not isinstance(fc1, nn.Linear) or not isinstance(fc2, nn.Linear):
        raise ValueError("fc1 and fc2 must be nn.Linear (1x1-conv MLPs are not supported, spec A6.6).")
    p1 = drop1.p if isinstance(drop1, nn.Dropout) else 0.0
    ref = fc1.weight
    block = CollapsibleBlock(fc1.in_features, fc1.out_features, fc2.out_features, slope_init, p1).to(ref.device, ref.dtype)
    with torch.no_grad():
        for dst, src in ((block.fc1, fc1), (block.fc2, fc2)):
            dst.weight.copy_(src.weight)
            if src.bias is not None:
                dst.bias.copy_(src.bias)
            else:  # missing biases count as zero (A6.6)
                dst.bias.zero_()
    if isinstance(drop2, nn.Dropout) and drop2.p > 0:
        return nn.Sequential(block, nn.Dropout(drop2.p))
    return block


# --------------------------------------------------------------------------------------------------------
# Conversions of torchvision models


def _linear_in_eval(m: nn.Module, tau: float) -> bool:
    """True for modules that are affine (or identity) in eval mode once a near-1 slope is treated as 1."""
    if _is_single_prelu(m):
        return abs(float(m.weight.detach().reshape(())) - 1.0) < tau
    return isinstance(m, (nn.Dropout, nn.Identity, nn.BatchNorm1d))


@torch.no_grad()
def collapse_sequential(seq: nn.Sequential, tau: float = 0.05) -> tuple[nn.Sequential, int]:
    """Fold every run ``Linear, (collapsible PReLU | Dropout | BatchNorm1d | Identity)*, Linear, ...`` of ``seq``
    into one Linear (at most one BatchNorm1d between two Linears). Returns the new Sequential and the number of
    Linear layers removed. Modules not inside a folded run are kept (same objects)."""
    out: list[nn.Module] = []
    chain: list[nn.Linear] = []
    norms: list[nn.BatchNorm1d | None] = []
    tail: list[nn.Module] = []
    removed = 0

    def flush() -> None:
        nonlocal removed
        if chain:
            out.append(chain[0] if len(chain) == 1 else collapse_chain(chain, norms))
            removed += len(chain) - 1
        out.extend(tail)
        chain.clear(), norms.clear(), tail.clear()

    for m in seq:
        if isinstance(m, nn.Linear):
            bns = [t for t in tail if isinstance(t, nn.BatchNorm1d)]
            if chain and len(bns) <= 1 and all(_linear_in_eval(t, tau) for t in tail):
                chain.append(m)
                norms.append(bns[0] if bns else None)
                tail.clear()
                continue
            flush()
            chain.append(m)
        elif chain:
            tail.append(m)
        else:
            out.append(m)
    flush()
    return nn.Sequential(*out), removed


def _replace_with_prelu(seq: nn.Sequential, kind: type[nn.Module], slope_init: float) -> int:
    """Swap every ``kind`` activation of ``seq`` for a single-slope PReLU(slope_init); returns how many."""
    ref = next(seq.parameters())
    hits = 0
    for i, m in enumerate(seq):
        if isinstance(m, kind):
            seq[i] = nn.PReLU(num_parameters=1, init=slope_init).to(device=ref.device, dtype=ref.dtype)
            hits += 1
    return hits


def convert_vgg_classifier(vgg: nn.Module, slope_init: float = 0.0) -> nn.Module:
    """Replace the ReLUs of ``vgg.classifier`` (torchvision VGG: indices 1 and 4) by single-slope PReLU(a0).
    With a0 = 0 the function is unchanged. Modifies ``vgg`` in place and returns it."""
    if _replace_with_prelu(vgg.classifier, nn.ReLU, slope_init) == 0:
        raise ValueError("vgg.classifier has no ReLU to convert.")
    return vgg


def collapse_vgg_classifier(vgg: nn.Module, tau: float = 0.05) -> int:
    """Collapse the (converted) classifier in place: activations with ``|a - 1| < tau`` are treated as identity and
    the Linear layers around them folded (both -> one ``Linear(25088, 1000)``). Returns the number of Linear layers
    removed (0 if nothing was collapsible)."""
    vgg.classifier, removed = collapse_sequential(vgg.classifier, tau)
    return removed


def convert_vit_mlps_(vit: nn.Module, last_k: int, slope_init: float = 0.01) -> list[str]:
    """Turn the MLPs of the last ``last_k`` encoder blocks of a torchvision ``VisionTransformer`` into
    ``CollapsibleBlock``s (``collapsible_from_mlp``: GELU -> PReLU(a0), which changes the function; fine-tune).
    In place; returns the converted module paths. The residual around each MLP is untouched (A6.7)."""
    layers = list(vit.encoder.layers.named_children())
    if not 1 <= last_k <= len(layers):
        raise ValueError(f"last_k must be in [1, {len(layers)}], got {last_k}.")
    names = []
    for name, layer in layers[-last_k:]:
        layer.mlp = collapsible_from_mlp(layer.mlp, slope_init)
        names.append(f"encoder.layers.{name}.mlp")
    return names
