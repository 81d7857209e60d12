"""MorphReuse: one trainable block reused by many layers (spec: shared/specs/morphreuse_morphonet.md section 1).

Variant A, vision (``SharedCoreMLP``): a residual core in a fixed d-dimensional space,

    C(z) = z + 2 sigma(a) (W2 GELU(LN(W1 z + b1)) + b2),   W1: h x d, W2: d x h, h = floor(d * expand),

reused by every layer l through its own projections, ``y = Q_l C(s_l * P_l x)``. Parity: P_l, Q_l frozen at
random (Xavier-uniform, no bias), no per-layer scale (s_l = 1), two adapters D -> 512 -> classes with nothing in
between. Options beyond parity: a learnable per-layer scale s_l (scalar or a d-vector, init 1; the "per-layer
scaling" the method's name promises), trainable projections, more adapters (e.g. a third for a like-for-like
comparison with the 3-layer baseline), an activation between adapters.

Variant B, BERT (``ShapeSharedBert``): selected ``nn.Linear`` layers become
``y = act(s_l (W_k x + b_k))`` where one (W_k, b_k) is shared by all wrapped layers of the same shape
k = (in, out), s_l is a learnable scalar per layer (init 1) and act is GELU. The shared weights live in a
per-model registry (not a class-level global), so two models in one process, DDP and checkpoints work.
"""

import math
from collections.abc import Sequence
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from annotated_types import MinLen
from torch import Tensor, nn

from constraints import NonNegativeInt, PositiveFloat, PositiveInt
from models.bert import BertClassifier

# --------------------------------------------------------------------------------------------------------
# Variant A: shared residual core + per-layer adapters


class SharedResidualCore(nn.Module):
    """``C(z) = z + 2 sigma(a) (W2 GELU(LN(W1 z + b1)) + b2)``; W ~ N(0, std^2), b = 0, a = gate_init."""

    def __init__(self, dim: int = 128, expand: float = 2.5, layer_norm: bool = True, gate_init: float = -3.0, weight_std: float = 0.02) -> None:
        super().__init__()
        hidden = int(dim * expand)
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.norm = nn.LayerNorm(hidden) if layer_norm else nn.Identity()
        self.gate = nn.Parameter(torch.tensor(float(gate_init)))
        for fc in (self.fc1, self.fc2):
            nn.init.normal_(fc.weight, std=weight_std)
            nn.init.zeros_(fc.bias)

    def forward(self, z: Tensor) -> Tensor:
        return z + 2 * torch.sigmoid(self.gate) * self.fc2(F.gelu(self.norm(self.fc1(z))))

    def count_dense_equivalent_parameters(self) -> int:
        return 0  # counted once per use by the adapters


class CoreAdapter(nn.Module):
    """``y = Q C(s * P x)`` for one layer ``in_features -> out_features`` around the shared core ``C``.

    The core is held by reference and not registered here: the parent registers it once, so it appears once in
    ``parameters()`` and ``state_dict()`` and its gradient is the sum over all adapters that use it.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        core: SharedResidualCore,
        train_proj: bool = False,
        scale: Literal["none", "scalar", "vector"] = "none",
    ) -> None:
        super().__init__()
        dim = core.fc1.in_features
        self.proj_in, self.proj_out = nn.Linear(in_features, dim, bias=False), nn.Linear(dim, out_features, bias=False)
        for proj in (self.proj_in, self.proj_out):
            nn.init.xavier_uniform_(proj.weight)
            proj.weight.requires_grad_(train_proj)
        self.scale = None if scale == "none" else nn.Parameter(torch.ones(1 if scale == "scalar" else dim))
        object.__setattr__(self, "core", core)  # deliberately unregistered (see class docstring)

    def forward(self, x: Tensor) -> Tensor:
        z = self.proj_in(x)
        if self.scale is not None:
            z = z * self.scale
        return self.proj_out(self.core(z))

    def count_dense_equivalent_parameters(self) -> int:
        """This layer with a private copy of the core."""
        own = sum(p.numel() for p in self.parameters())
        return own + sum(p.numel() for p in self.core.parameters())


class SharedCoreMLP(nn.Module):
    """Flatten, then adapters ``D -> widths... -> num_classes`` that all reuse one ``SharedResidualCore``.

    Args:
        input_shape: shape of one sample (flattened to D).
        num_classes: number of logits.
        widths: hidden widths between adapters; parity ``[512]`` (two adapters), ``[512, 512]`` adds a third.
        core_dim: the core's dimension d (128).
        expand: core hidden width factor (2.5, so h = 320).
        layer_norm: LayerNorm inside the core.
        gate_init: initial residual gate a (2 sigma(-3) ~ 0.095, a near-identity core).
        train_proj: train the per-layer projections P, Q (parity: frozen at random).
        scale: per-layer learnable scale on P's output: none (parity), scalar or vector.
        activation: optional activation between adapters (parity: none).
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        widths: Annotated[Sequence[PositiveInt], MinLen(1)] = (512,),
        core_dim: PositiveInt = 128,
        expand: PositiveFloat = 2.5,
        layer_norm: bool = True,
        gate_init: float = -3.0,
        train_proj: bool = False,
        scale: Literal["none", "scalar", "vector"] = "none",
        activation: Literal["none", "relu", "gelu"] = "none",
    ) -> None:
        super().__init__()
        self.core = SharedResidualCore(core_dim, expand, layer_norm, gate_init)
        dims = [math.prod(input_shape), *widths, num_classes]
        self.adapters = nn.ModuleList(
            CoreAdapter(i, o, self.core, train_proj=train_proj, scale=scale) for i, o in zip(dims[:-1], dims[1:])
        )
        self.activation = {"none": nn.Identity(), "relu": nn.ReLU(), "gelu": nn.GELU()}[activation]

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(1)
        for index, adapter in enumerate(self.adapters):
            x = adapter(x)
            if index < len(self.adapters) - 1:
                x = self.activation(x)
        return x


# --------------------------------------------------------------------------------------------------------
# Variant B: shape-keyed shared weights in BERT


class ShapeRegistry(nn.ModuleDict):
    """One ``nn.Linear`` per key (``"{in}x{out}"`` or ``"{role}:{in}x{out}"``), owned by the model."""

    def get_or_create(self, key: str, in_features: int, out_features: int) -> nn.Linear:
        if key not in self:
            shared = nn.Linear(in_features, out_features)
            nn.init.xavier_uniform_(shared.weight)
            nn.init.zeros_(shared.bias)
            self[key] = shared
        return self[key]

    def count_dense_equivalent_parameters(self) -> int:
        return 0  # counted once per use by the ShapeSharedLinear layers


class ShapeSharedLinear(nn.Module):
    """``y = act(s (W_k x + b_k))`` with (W_k, b_k) shared by shape (held by reference) and a scalar s."""

    def __init__(self, shared: nn.Linear, activation: bool = True, scale_init: float = 1.0) -> None:
        super().__init__()
        self.in_features, self.out_features = shared.in_features, shared.out_features
        self.scale = nn.Parameter(torch.tensor(float(scale_init)))
        self.activation = activation
        object.__setattr__(self, "shared", shared)  # registered once, in the model's ShapeRegistry

    def forward(self, x: Tensor) -> Tensor:
        y = self.scale * self.shared(x)
        return F.gelu(y) if self.activation else y

    def count_dense_equivalent_parameters(self) -> int:
        return self.shared.weight.numel() + self.shared.bias.numel()


BERT_ROLES = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
              "intermediate.dense", "output.dense")


class ShapeSharedBert(BertClassifier):
    """``BertClassifier`` whose top layers' projections and classifier share weights by shape (Variant B).

    Args:
        wrapped_top_layers: how many top encoder layers get their six projections wrapped (parity 2); those
            layers (their LayerNorms included) and the classifier train, everything else stays frozen.
        gelu_on_logits: apply GELU after the classifier too (parity True; makes logits >= -0.17).
        share_across_roles: key shared weights by shape only, so Q, K, V and the attention output of all wrapped
            layers use one weight (parity True); False keys by (role, shape), sharing across layers only.
        init_from_pretrained: initialise each shared weight as the mean of the pretrained weights it replaces
            (parity False: Xavier-uniform, the pretrained projections are discarded).
        **kwargs: see ``BertClassifier`` (``trainable_top_layers`` is set to ``wrapped_top_layers``).
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        encoder: str = "auto",
        wrapped_top_layers: NonNegativeInt = 2,
        gelu_on_logits: bool = True,
        share_across_roles: bool = True,
        init_from_pretrained: bool = False,
        cache_frozen_prefix: bool = True,
    ) -> None:
        super().__init__(input_shape, num_classes, encoder, wrapped_top_layers, cache_frozen_prefix)
        self.shared = ShapeRegistry()
        members: dict[str, list[nn.Linear]] = {}
        top = range(len(self.layers) - wrapped_top_layers, len(self.layers))
        targets = [(f"model.bert.encoder.layer.{i}.{role}", role, True) for i in top for role in BERT_ROLES]
        targets.append(("model.classifier", "classifier", gelu_on_logits))
        for name, role, activation in targets:
            parent_name, _, child = name.rpartition(".")
            parent = self.get_submodule(parent_name)
            original: nn.Linear = getattr(parent, child)
            shape = f"{original.in_features}x{original.out_features}"
            key = shape if share_across_roles else f"{role.replace('.', '_')}:{shape}"
            shared = self.shared.get_or_create(key, original.in_features, original.out_features)
            members.setdefault(key, []).append(original)
            setattr(parent, child, ShapeSharedLinear(shared, activation=activation))
        if init_from_pretrained:
            with torch.no_grad():
                for key, originals in members.items():
                    self.shared[key].weight.copy_(torch.stack([m.weight for m in originals]).mean(0))
                    self.shared[key].bias.copy_(torch.stack([m.bias for m in originals]).mean(0))
        self.shared.requires_grad_(True)

    def shape_groups(self) -> dict[str, int]:
        """How many wrapped layers use each shared weight."""
        uses: dict[str, int] = {}
        by_id = {id(m): k for k, m in self.shared.items()}
        for module in self.modules():
            if isinstance(module, ShapeSharedLinear):
                key = by_id[id(module.shared)]
                uses[key] = uses.get(key, 0) + 1
        return uses
