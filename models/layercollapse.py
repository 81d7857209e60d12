"""LayerCollapse's algebra and the lab's collapsible architectures (spec: shared/specs/layercollapse_lrunet.md A).

A chain ``fc1 -> PReLU(one slope a) -> Dropout -> (BatchNorm1d) -> fc2`` (``models.collapse_chains`` finds them in
any network; ``CollapsibleBlock`` is one built so) is trained with ``lambda * sum (a - 1)^2``
(``lightning_modules.LayerCollapse``) to pull the slopes towards 1; a chain with ``|a - 1| < tau`` is then
replaced by one ``nn.Linear``. Collapse uses eval semantics and treats the slope as exactly 1, so the collapsed
model equals the *linearised* model (slope forced to 1) up to rounding, and differs from the trained PReLU model
by at most ``|a - 1| * ||W2|| * |min(z, 0)|`` (spec A5/A6).

Algebra (A6), with the optional eval-mode BatchNorm written as the affine map ``z -> s * z + t``,
``s = gamma / sqrt(running_var + eps)``, ``t = beta - s * running_mean``: a chain ``L_1, BN_1, L_2, ..., L_k``
collapses to ``W = W_k diag(s_{k-1}) W_{k-1} ... W_1`` and the matching bias (each BN folded into the Linear
before it by torch's ``fuse_linear_bn_weights``, then the products); dropout (identity in eval) is dropped.
Missing biases count as zero. Not handled: per-channel PReLU, 1x1-conv MLPs, BN without running statistics.
``models.mixer`` and ``models.collapsible_vgg`` are the lab's own Mixer and CIFAR VGG.
"""

import math
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_linear_bn_weights

from constraints import Fraction, PositiveInt


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
    ``models.collapse_chains.rebuild_collapsed_chains_`` rebuilds the architecture for ``load_state_dict``.
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
