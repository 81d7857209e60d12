"""Parameter, FLOP and size accounting shared by every technique (the contract of DESIGN.md).

Definitions, for a module tree ``m``:

* ``total``: numel summed over *unique* parameter tensors (a tensor shared by several layers counts once,
  frozen tensors included). This is what ``m.parameters()`` yields, because it de-duplicates.
* ``trainable``: the subset of ``total`` with ``requires_grad``.
* ``nonzero``: entries that still multiply something in the exported model. By default an entry counts when
  it is non-zero. ``torch.nn.utils.prune`` reparametrisations (``<name>_orig`` parameter + ``<name>_mask``
  buffer) count ``orig * mask != 0``; a ``torch.nn.utils.parametrize`` tensor counts its current value (set
  hard masks first), the parametrizations' own parameters (mask logits) do not count. A module that knows
  better (learned masks, hypernetworks) defines ``count_nonzero_parameters()`` and accounts for its subtree.
* ``dense_equivalent``: what the same architecture would have without sharing/masking/collapse: every *use* of
  a parameter counts, so a tensor (or module) registered in k places counts k times. A module whose reuse is
  not visible in the module tree (a block applied N times in a loop) or whose parameters are not part of the
  dense architecture (mask logits) defines ``count_dense_equivalent_parameters()`` for its subtree; a
  parametrized tensor counts as its original.
* ``model_bytes``: bytes of unique parameter and buffer storage (BN statistics and mask buffers included).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.flop_counter import FlopCounterMode

NONZERO_HOOK = "count_nonzero_parameters"
DENSE_HOOK = "count_dense_equivalent_parameters"


def _owns_hook(module: nn.Module, hook: str, root: nn.Module) -> bool:
    return module is not root and callable(getattr(module, hook, None))


def _walk_unique(root: nn.Module, hook: str) -> Iterator[tuple[nn.Module, bool]]:
    """Yield each distinct module once with a flag telling whether it accounts for its own subtree."""
    seen: set[int] = set()
    stack = [root]
    while stack:
        module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        if _owns_hook(module, hook, root):
            yield module, True
            seen.update(id(m) for m in module.modules())
            continue
        yield module, False
        stack.extend(reversed(list(module.children())))


def count_nonzero(root: nn.Module) -> int:
    """Entries that still multiply something (see module docstring)."""
    counted: set[int] = set()
    total = 0
    for module, owns in _walk_unique(root, NONZERO_HOOK):
        if owns:
            total += int(getattr(module, NONZERO_HOOK)())
            counted.update(id(p) for p in module.parameters())
            continue
        if parametrize.is_parametrized(module):
            for name in module.parametrizations:
                total += int(torch.count_nonzero(getattr(module, name).detach()))
            counted.update(id(p) for p in module.parametrizations.parameters())
        for name, param in module.named_parameters(recurse=False):
            if id(param) in counted:
                continue
            counted.add(id(param))
            mask = getattr(module, name[: -len("_orig")] + "_mask", None) if name.endswith("_orig") else None
            effective = param.detach() * mask if isinstance(mask, torch.Tensor) else param.detach()
            total += int(torch.count_nonzero(effective))
    return total


def count_dense_equivalent(root: nn.Module) -> int:
    """Parameters of the same architecture with every use materialised (see module docstring)."""

    def visit(module: nn.Module) -> int:
        if _owns_hook(module, DENSE_HOOK, root):
            return int(getattr(module, DENSE_HOOK)())
        own = sum(p.numel() for p in module._parameters.values() if p is not None)
        children = dict(module._modules)
        if parametrize.is_parametrized(module):  # the original tensors count, the parametrizations' do not
            own += sum(p.original.numel() for p in children.pop("parametrizations").values())
        return own + sum(visit(child) for child in children.values() if child is not None)

    return visit(root)


def model_bytes(root: nn.Module) -> int:
    """Bytes of unique parameter and buffer storage."""
    seen: set[tuple[int, int]] = set()
    size = 0
    for tensor in list(root.parameters()) + list(root.buffers()):
        key = (tensor.data_ptr(), tensor.numel())
        if key in seen:
            continue
        seen.add(key)
        size += tensor.numel() * tensor.element_size()
    return size


@torch.no_grad()
def flops_per_sample(forward: Callable[[], object], batch_size: int = 1) -> int:
    """FLOPs of one forward pass divided by the batch size (``torch.utils.flop_counter``: 2 per MAC).

    Shape-based: masked zeros count as dense; techniques with an export measure the exported model.
    """
    counter = FlopCounterMode(display=False)
    with counter:
        forward()
    return int(counter.get_total_flops() // max(batch_size, 1))
