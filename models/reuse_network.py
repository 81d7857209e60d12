"""MorphReuse on any network: the target ``nn.Linear`` layers of a given network share their weights.

Two mechanisms (spec: shared/specs/morphreuse_morphonet.md section 1), the same modules the lab's own
``SharedCoreMLP`` and ``ShapeSharedBert`` are built from:

* ``shape_shared``: every target layer of shape (in, out) becomes ``y = s_l (W_k x + b_k)``
  (``ShapeSharedLinear``, optionally followed by GELU as in the BERT parity setting), one (W_k, b_k) per shape k,
  a learnable scalar s_l per layer (init 1). ``init_from_original``: W_k starts as the mean of the weights it
  replaces (a pretrained network keeps their common part); otherwise Xavier-uniform.
* ``shared_core``: every target layer becomes ``y = Q_l C(s_l * P_l x)`` (``CoreAdapter``) around one
  ``SharedResidualCore`` C in a d-dimensional space; P_l, Q_l frozen at random unless ``train_proj``.

Layers whose weight their parent reads directly (``nn.MultiheadAttention``'s ``out_proj``) cannot be replaced and
are never candidates. The sharing is in the module tree, so ``parameters()`` and ``state_dict`` hold each shared
tensor once, its gradient is the sum over its uses, and ``models.accounting`` counts each use in the dense
equivalent. The deployed network is the network itself: reuse is what makes it small.
"""

from typing import Literal

import torch
from torch import nn

from models.morphreuse import CoreAdapter, ShapeRegistry, ShapeSharedLinear, SharedResidualCore
from models.targets import TargetModules, match_modules, network_name

Variant = Literal["shape_shared", "shared_core"]
Scale = Literal["none", "scalar", "vector"]


class ReusedNetwork(nn.Module):
    """``net`` with its target Linear layers replaced by shared-weight layers (see the module docstring).

    Args:
        net: any network; modified in place (its target layers are replaced).
        variant: ``shape_shared`` or ``shared_core``.
        target_modules, exclude_modules: which ``nn.Linear`` layers, with peft's semantics (``models.targets``).
        activation: shape_shared only: GELU after each shared layer (the BERT parity setting; changes the net).
        init_from_original: shape_shared only: shared weight = mean of the weights it replaces.
        core_dim, expand, layer_norm, gate_init: shared_core only: the core (``SharedResidualCore``).
        scale: shared_core only: per-layer scale on the projected input (none, scalar or a d-vector).
        train_proj: shared_core only: train the per-layer projections P_l, Q_l.
    """

    def __init__(
        self,
        net: nn.Module,
        variant: Variant = "shape_shared",
        target_modules: TargetModules = "all-linear",
        exclude_modules: TargetModules | None = None,
        activation: bool = False,
        init_from_original: bool = True,
        core_dim: int = 128,
        expand: float = 2.5,
        layer_norm: bool = True,
        gate_init: float = -3.0,
        scale: Scale = "scalar",
        train_proj: bool = False,
    ) -> None:
        super().__init__()
        self.net, self.variant = net, variant
        unreplaceable = [f"{name}.out_proj" for name, m in net.named_modules() if isinstance(m, nn.MultiheadAttention)]
        excluded = [*unreplaceable, *([] if exclude_modules is None else
                                      [exclude_modules] if isinstance(exclude_modules, str) else exclude_modules)]
        if isinstance(exclude_modules, str) and unreplaceable:
            raise ValueError("morphreuse: give exclude_modules as a list for a network with nn.MultiheadAttention.")
        targets = match_modules(net, target_modules, excluded or None, (nn.Linear,), f"morphreuse ({variant})")
        self.targets = list(targets)
        if variant == "shape_shared":
            self._share_by_shape(targets, activation, init_from_original)
        elif len(targets) < 2:
            raise ValueError(f"morphreuse (shared_core): target_modules {target_modules!r} selects one Linear layer of "
                             f"{network_name(net)} ({self.targets[0]}), so the core would not be reused; target more layers.")
        else:
            self.core = SharedResidualCore(core_dim, expand, layer_norm, gate_init)
            for name, layer in targets.items():
                adapter = CoreAdapter(layer.in_features, layer.out_features, self.core, train_proj=train_proj, scale=scale)
                net.set_submodule(name, adapter.to(layer.weight.device, layer.weight.dtype))

    @torch.no_grad()
    def _share_by_shape(self, targets: dict[str, nn.Linear], activation: bool, init_from_original: bool) -> None:
        groups: dict[str, list[str]] = {}
        for name, layer in targets.items():
            groups.setdefault(f"{layer.in_features}x{layer.out_features}", []).append(name)
        if all(len(names) == 1 for names in groups.values()):
            raise ValueError(
                f"morphreuse (shape_shared): no two target layers of {network_name(self.net)} have the same shape "
                f"({', '.join(groups)}), so nothing can be shared; target more layers or use variant: shared_core."
            )
        self.shared = ShapeRegistry()
        for key, names in groups.items():
            layers = [targets[n] for n in names]
            shared = self.shared.get_or_create(key, layers[0].in_features, layers[0].out_features)
            shared.to(layers[0].weight.device, layers[0].weight.dtype)
            if init_from_original:
                shared.weight.copy_(torch.stack([m.weight for m in layers]).mean(0))
                biases = [m.bias if m.bias is not None else torch.zeros_like(shared.bias) for m in layers]
                shared.bias.copy_(torch.stack(biases).mean(0))
            for name in names:
                self.net.set_submodule(name, ShapeSharedLinear(shared, activation=activation))

    def forward(self, *args, **kwargs):
        return self.net(*args, **kwargs)

    def uses(self) -> dict[str, int]:
        """How many layers use each shared tensor: per shape, or the core's."""
        if self.variant == "shared_core":
            return {"core": len(self.targets)}
        by_id = {id(m): k for k, m in self.shared.items()}
        counts: dict[str, int] = {}
        for module in self.net.modules():
            if isinstance(module, ShapeSharedLinear):
                counts[by_id[id(module.shared)]] = counts.get(by_id[id(module.shared)], 0) + 1
        return counts
