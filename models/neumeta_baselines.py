"""Baselines NeuMeta is compared with at a width h below the pretrained N (spec §5, issue 7 deliverable 4).

``l1_prune_to_width``: structured L1 pruning without fine-tuning. In every width-dependent clique, the producer's
output channels (rows of ``fc1.weight`` / filters of ``convK.weight``) are ranked by their L1 norm with torch's
pruning utility (``torch.nn.utils.prune.ln_structured``, n = 1, dim = 0) and the top ``size_h`` are kept, in their
original order; every generated slice of the clique (producer rows and biases, the consumer's input columns) is cut
to those channels. No rescaling: a narrow network equals the wide one with the pruned channels zeroed (tested).
The other baseline, resampling the smoothed weights without training, is ``neumeta_smoothing.resample_to_width``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils import prune


def _kept_channels(weight: Tensor, keep: int) -> Tensor:
    """Indices (ascending) of the ``keep`` output channels of ``weight`` with the largest L1 norm."""
    holder = nn.Module()
    holder.weight = nn.Parameter(weight.detach().clone())
    prune.ln_structured(holder, "weight", amount=weight.shape[0] - keep, n=1, dim=0)
    alive = holder.weight_mask.flatten(1).any(dim=1)
    return torch.nonzero(alive).flatten()


@torch.no_grad()
def l1_prune_to_width(net: nn.Module, width: int) -> dict[str, Tensor]:
    """The generated tensors of ``net`` (width N, BatchNorm folded) cut to ``width`` h <= N by structured L1 pruning."""
    if width > net.width:
        raise ValueError(f"pruning can only narrow: width {width} > the pretrained width {net.width}.")
    if getattr(net, "has_batchnorm", False):
        raise ValueError("fold BatchNorm (fold_batchnorm_) before pruning: BN statistics are not generated.")
    state = net.state_dict()
    out = {name: state[name].detach().clone() for name in net.layout.tensors(net.width)}
    target = {c.name: c.size for c in net.layout.cliques(width)}
    for clique in net.layout.cliques(net.width):
        keep = target[clique.name]
        if keep == clique.size:
            continue
        producer = next(m.name for m in clique.members if m.axis == 0 and state[m.name].dim() >= 2)
        index = _kept_channels(state[producer], keep)
        for member in clique.members:
            if member.name in out:
                out[member.name] = out[member.name].index_select(member.axis, index)
    return out
