"""What every NeuMeta target shares: the clique vocabulary (§2.2) and the ``NeuMetaTarget`` interface.

A clique is the set of (tensor, axis) slices that one hidden-channel permutation must move together: the output
rows of a producer (weight rows, bias, BN weight/bias/running_mean/running_var while BN is unfolded), the input
columns of every consumer and, through a residual add, every producer/consumer of the same stream.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from torch import nn
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


def bn_members(prefix: str, present: bool) -> tuple[Member, ...]:
    """The per-channel entries of an unfolded BatchNorm (parameters and running statistics)."""
    if not present:
        return ()
    return tuple(Member(f"{prefix}.{key}", 0) for key in ("weight", "bias", "running_mean", "running_var"))


def check_width(width: int) -> int:
    if isinstance(width, bool) or int(width) != width or width < 1:
        raise ValueError(f"width must be a positive integer, got {width!r}.")
    return int(width)


class TargetLayout(Protocol):
    """A target's layout: a frozen dataclass, independent of the module's weights (see the package docstring)."""

    def tensors(self, width: int) -> Mapping[str, Shape]: ...

    def cliques(self, width: int, batch_norm: bool = False) -> tuple[Clique, ...]: ...

    def bn_pairs(self) -> tuple[tuple[str, str], ...]: ...

    def relu_producers(self) -> tuple[str, ...]: ...


class NeuMetaTarget(nn.Module):
    """Common interface of the targets: ``layout``, ``width``, the generated tensors and the cliques."""

    layout: TargetLayout
    width: int

    @property
    def has_batchnorm(self) -> bool:
        """True while BatchNorm modules are present (i.e. not yet folded)."""
        return any(isinstance(m, _BatchNorm) for m in self.modules())

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
        config = self._config() | {"width": check_width(width), "batch_norm": self.has_batchnorm}
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
