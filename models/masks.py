"""Learned masks ``sigmoid(M / T)`` (spec: shared/specs/morphreuse_morphonet.md 2.1-2.6), on their own.

``Mask`` holds the mask logits M, the temperature T (a persistent buffer set from outside), the mode (``soft``:
sigmoid(M / T), training; ``hard``: 1[M > 0], evaluation) and pruning (``prune_(tau)``: entries with
sigmoid(M / T) < tau are pinned to M = -100). Everything MorphoNet's callbacks read from a masked layer
(``mask_logits``, ``density``, ``weights_per_mask_entry``, ``temperature``, ...) lives here.

The masks are ``torch.nn.utils.parametrize`` parametrizations of a layer's parameters (``models.masked_network``
puts them on any network; the spec's networks, ``models.morphonet``, are presets of it):

* ``ConnectionMask`` (granularity ``connection``): one logit per weight of a Linear, one per kernel position of
  each output filter of a Conv2d, shared across its input channels (as upstream's conv): ``W' = W * mask``;
* ``UnitGate`` (granularity ``unit``): one logit per output unit / channel, shared by every layer whose outputs
  are coupled to that channel (a residual add, a BatchNorm, a depthwise convolution: one torch-pruning group);
  each coupled parameter gets a ``GatedRows`` parametrization ``p'[i] = p[i] * mask[root(i)]``, the bias and
  the BatchNorm affine included, so a closed gate makes the channel exactly zero and removable.
"""

import math
from typing import Literal

import torch
from torch import Tensor, nn

PRUNED_LOGIT = -100.0
MaskMode = Literal["soft", "hard"]
Budget = Literal["weights", "flops"]
"""What a target density counts: the masked weights, or (unit gates) the FLOPs of the exported network."""


def check_temperature(t: float) -> float:
    t = float(t)
    if not (math.isfinite(t) and t > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {t}.")
    return t


def initial_logits(shape: tuple[int, ...], init_density: float) -> Tensor:
    """+2 with probability ``init_density``, else -2 (so the hard density at init is about ``init_density``)."""
    if not 0.0 <= init_density <= 1.0:
        raise ValueError(f"init_density must be in [0, 1], got {init_density}.")
    return torch.where(torch.rand(shape) < init_density, 2.0, -2.0)


class Mask(nn.Module):
    """Mask logits M (set by ``init_mask``), temperature T, soft/hard mode and pruning; see the module docstring.

    ``weights_per_mask_entry`` is how many weights one mask entry gates (a conv connection entry gates its input
    channels; a unit gate a whole row of every coupled layer); density targets and ranks count weights.
    """

    weights_per_mask_entry = 1

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("temperature", torch.tensor(1.0))
        self._mask_mode: MaskMode = "soft"

    def init_mask(self, shape: tuple[int, ...], init_density: float) -> None:
        self.mask_logits = nn.Parameter(initial_logits(shape, init_density))

    @property
    def mask_mode(self) -> MaskMode:
        return self._mask_mode

    @mask_mode.setter
    def mask_mode(self, mode: MaskMode) -> None:
        if mode not in ("soft", "hard"):
            raise ValueError(f"mask_mode must be soft or hard, got {mode!r}.")
        self._mask_mode = mode

    def set_temperature(self, t: float) -> None:
        self.temperature.fill_(check_temperature(t))

    def soft_mask(self) -> Tensor:
        return torch.sigmoid(self.mask_logits / self.temperature)

    def hard_mask(self) -> Tensor:
        return (self.mask_logits > 0).to(self.mask_logits.dtype)

    def straight_through(self) -> Tensor:
        """The hard mask's value with the soft mask's gradient."""
        soft = self.soft_mask()
        return soft + (self.hard_mask() - soft).detach()

    def mask(self) -> Tensor:
        """The mask of the current ``mask_mode``, shaped like ``mask_logits``."""
        return self.soft_mask() if self._mask_mode == "soft" else self.hard_mask()

    def density(self) -> float:
        """Fraction of mask entries that are on (M > 0)."""
        return float((self.mask_logits > 0).float().mean())

    def mask_penalty(self) -> Tensor:
        """mean(sigmoid(M / T)), differentiable (the parity L1 penalty before lambda)."""
        return self.soft_mask().mean()

    @torch.no_grad()
    def prune_(self, threshold: float) -> int:
        """Set M := -100 where sigmoid(M / T) < threshold; return how many entries changed."""
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"prune threshold must be in [0, 1], got {threshold}.")
        selected = self.soft_mask() < threshold
        newly = int((selected & (self.mask_logits != PRUNED_LOGIT)).sum())
        self.mask_logits[selected] = PRUNED_LOGIT
        return newly


class ConnectionMask(Mask):
    """Parametrization ``W -> W * mask`` of a Linear weight (out, in) or a Conv2d weight (out, in / groups, kh, kw);
    a conv's mask is (out, 1, kh, kw), one entry per kernel position of each filter."""

    def __init__(self, weight: Tensor, init_density: float) -> None:
        super().__init__()
        shape = tuple(weight.shape) if weight.dim() == 2 else (weight.shape[0], 1, *weight.shape[2:])
        self.init_mask(shape, init_density)
        self.weights_per_mask_entry = 1 if weight.dim() == 2 else int(weight.shape[1])

    def forward(self, weight: Tensor) -> Tensor:
        return weight * self.mask()


class UnitGate(Mask):
    """One logit per channel of a coupled group (``channels`` entries); applied through ``GatedRows``.

    In ``soft`` mode the gate is straight-through: its value is the hard gate 1[m > 0], its gradient that of
    sigmoid(m / T). A soft gate would scale whole units by sigmoid(m / T) during training only, and the network
    evaluated with hard gates would see every unit at another scale (measured on the FashionMNIST MLP: 96 % train,
    65 % validation accuracy); a connection mask spreads that error over many connections per unit.
    """

    def __init__(self, channels: int, init_density: float, weights_per_channel: int) -> None:
        super().__init__()
        self.init_mask((channels,), init_density)
        self.weights_per_mask_entry = max(int(weights_per_channel), 1)

    def mask(self) -> Tensor:
        return self.hard_mask() if self.mask_mode == "hard" else self.straight_through()


class GatedRows(nn.Module):
    """Parametrization ``p[rows[k]] -> p[rows[k]] * gate.mask()[channels[k]]`` along dim 0 (other rows unchanged).

    The gate is shared by every coupled parameter; ``rows`` / ``channels`` come from the torch-pruning group
    (a layer's own indices and the group's root indices, which differ after a concatenation).
    """

    def __init__(self, gate: UnitGate, rows: list[int], channels: list[int], size: int) -> None:
        super().__init__()
        self.gate = gate
        self.register_buffer("rows", torch.tensor(rows, dtype=torch.long), persistent=False)
        self.register_buffer("channels", torch.tensor(channels, dtype=torch.long), persistent=False)
        self.size = size

    def forward(self, p: Tensor) -> Tensor:
        scale = torch.ones(self.size, dtype=p.dtype, device=p.device)
        scale = scale.index_put((self.rows,), self.gate.mask()[self.channels].to(p.dtype))
        return p * scale.view(-1, *[1] * (p.dim() - 1))
