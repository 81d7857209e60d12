"""MorphoNet Pro: learned connection masks ``W * sigmoid(M / T)`` (spec: shared/specs/morphreuse_morphonet.md 2.1-2.6).

Every masked layer holds dense weights W (He-normal), a bias b (zeros) and trainable mask logits M, each entry
+2 with probability ``init_density`` and -2 otherwise (so the hard sparsity at init is 1 - init_density). The
forward pass multiplies W by the soft mask sigmoid(M / T) (``mask_mode="soft"``, training) or by the hard mask
1[M > 0] (``"hard"``, evaluation; independent of T). T is a persistent buffer set from outside
(``set_temperature``). ``prune_(tau)`` pins every entry with sigmoid(M / T) < tau to M = -100 (W untouched).

The networks (``MorphoMLP``, ``MorphoCNN``, ``MorphoTransformer``) share one interface (``MorphoNetwork``):
``morpho_layers``, ``set_temperature``, ``set_mask_mode``, ``weighted_density``, ``mask_penalty``,
``prune_``, ``mask_parameters`` / ``weight_parameters``. The deployed model (hard mask folded in, dead units
removed) is built by ``models.morphonet_export.export_pruned``.

Parameter accounting (``models.accounting``): a masked layer's dense equivalent is W and b only (mask logits and
skip gates are not part of the dense architecture); its non-zero count is #(W * 1[M > 0] != 0) + #(b != 0)
(+1 for a skip gate).
"""

import math
from collections.abc import Mapping, Sequence
from typing import Annotated

import torch
import torch.nn.functional as F
from annotated_types import MinLen
from torch import Tensor, nn

from constraints import Fraction, PositiveInt, Probability
from models.flop_budget import FlopBudget
from models.masks import PRUNED_LOGIT, Budget, Mask, MaskMode, check_temperature  # noqa: F401 (re-exported)
from models.mlp import mlp_layers
from models.morpho_attention import MorphoAttention, SelfAttention  # noqa: F401 (re-exported)

MASK_PARAMETER_NAMES = ("mask_logits", "skip_gate", "head_logits")


# --------------------------------------------------------------------------------------------------------
# Layers


class MaskedLayer(Mask):
    """What MorphoLinear and MorphoConv2d share: their own weight and bias beside the mask (``models.masks.Mask``:
    logits, temperature, soft/hard mode, prune). ``expand_mask`` broadcasts the mask to the weight's shape."""

    def __init__(
        self, weight_shape: tuple[int, ...], mask_shape: tuple[int, ...], fan_in: int, init_density: float, bias: bool
    ) -> None:
        super().__init__()
        if not 0.0 <= init_density <= 1.0:
            raise ValueError(f"init_density must be in [0, 1], got {init_density}.")
        self.weight = nn.Parameter(torch.randn(weight_shape) * math.sqrt(2.0 / fan_in))
        self.bias = nn.Parameter(torch.zeros(weight_shape[0])) if bias else None
        self.init_mask(mask_shape, init_density)
        self.register_parameter("skip_gate", None)

    def expand_mask(self, mask: Tensor) -> Tensor:
        """A mask broadcast to the weight's shape."""
        return mask

    def masked_weight(self, hard: bool = False) -> Tensor:
        return self.weight * self.expand_mask(self.hard_mask() if hard else self.mask())

    @torch.no_grad()
    def count_nonzero_parameters(self) -> int:
        count = int(torch.count_nonzero(self.masked_weight(hard=True)))
        count += 0 if self.bias is None else int(torch.count_nonzero(self.bias))
        return count + (0 if self.skip_gate is None else 1)

    def count_dense_equivalent_parameters(self) -> int:
        return self.weight.numel() + (0 if self.bias is None else self.bias.numel())


class MorphoLinear(MaskedLayer):
    """``y = x (W * mask)^T + b [+ sigmoid(g) x]``; the gated skip exists only when ``skip`` and in == out."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, init_density: float = 0.4, skip: bool = False
    ) -> None:
        super().__init__((out_features, in_features), (out_features, in_features), in_features, init_density, bias)
        self.in_features, self.out_features = in_features, out_features
        if skip and in_features == out_features:
            self.skip_gate = nn.Parameter(torch.tensor(0.0))

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.masked_weight(), self.bias)
        if self.skip_gate is not None:
            y = y + torch.sigmoid(self.skip_gate) * x
        return y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, skip={self.skip_gate is not None}"


class MorphoConv2d(MaskedLayer):
    """Conv2d (padding k // 2) with one learned spatial k x k mask per output filter, shared across input
    channels. Unlike upstream, ``stride`` is honoured."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, init_density: float = 0.4
    ) -> None:
        if kernel_size < 1 or stride < 1:
            raise ValueError(f"kernel_size and stride must be >= 1, got {kernel_size} and {stride}.")
        k = kernel_size
        shape = (out_channels, in_channels, k, k)
        super().__init__(shape, (out_channels, k, k), in_channels * k * k, init_density, True)
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, k
        self.stride, self.padding = stride, k // 2
        self.weights_per_mask_entry = in_channels

    def expand_mask(self, mask: Tensor) -> Tensor:
        return mask.unsqueeze(1)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.masked_weight(), self.bias, self.stride, self.padding)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"


# --------------------------------------------------------------------------------------------------------
# Networks


class MorphoNetwork(nn.Module):
    """The interface shared by the MorphoNet networks (used by the LightningModule, callbacks and export)."""

    def morpho_layers(self) -> list[Mask]:
        """The masks (MorphoLinear, MorphoConv2d, or the ``models.masks`` parametrizations) in module order."""
        return [m for m in self.modules() if isinstance(m, Mask)]

    def attentions(self) -> list[MorphoAttention]:
        return [m for m in self.modules() if isinstance(m, MorphoAttention)]

    def set_temperature(self, t: float) -> None:
        t = check_temperature(t)
        for module in [*self.morpho_layers(), *self.attentions()]:
            module.set_temperature(t)

    def set_mask_mode(self, mode: MaskMode) -> None:
        if mode not in ("soft", "hard"):
            raise ValueError(f"mask mode must be soft or hard, got {mode!r}.")
        for layer in self.morpho_layers():
            layer.mask_mode = mode

    @torch.no_grad()
    def weighted_density(self) -> float:
        """Fraction of masked *weights* whose mask is on (a conv mask entry counts once per input channel)."""
        on = total = 0
        for layer in self.morpho_layers():
            on += int((layer.mask_logits > 0).sum()) * layer.weights_per_mask_entry
            total += layer.mask_logits.numel() * layer.weights_per_mask_entry
        return on / total if total else 1.0

    def kept_fraction(self, budget: Budget = "weights") -> Tensor:
        """The fraction of the budget the hard masks keep, with a straight-through gradient (that of the soft
        masks): masked weights (``weighted_density``) or, for unit gates, FLOPs (``models.flop_budget``)."""
        if budget == "flops":
            return self._flop_budget().kept(lambda gate: gate.straight_through())
        on, total = 0.0, 0
        for layer in self.morpho_layers():
            on = on + layer.weights_per_mask_entry * layer.straight_through().sum()
            total += layer.weights_per_mask_entry * layer.mask_logits.numel()
        return on / total if total else torch.ones(())

    def penalty_count(self, budget: Budget = "weights") -> int:
        """n of the intended penalty ``lambda n (D - d)^2``: the masked weights (budget weights), or the gate entries
        (budget flops), so that the mean push on a gate is that on one connection of an MLP's masks."""
        if budget == "flops":
            return sum(gate.mask_logits.numel() for gate in self._flop_budget().gates())
        return sum(layer.mask_logits.numel() * layer.weights_per_mask_entry for layer in self.morpho_layers())

    def _flop_budget(self) -> FlopBudget:
        budget = getattr(self, "flop_budget", None)
        if budget is None:
            raise ValueError(f"budget flops counts the FLOPs that unit gates remove; {type(self).__name__} has "
                             "connection masks, whose export keeps the dense FLOPs: use granularity unit on a plain "
                             "network, or budget weights.")
        return budget

    def mask_penalty(self) -> Tensor:
        """Sum over masked layers (and attention head gates) of mean(sigmoid(M / T)): upstream's penalty / lambda."""
        terms = [m.mask_penalty() for m in [*self.morpho_layers(), *self.attentions()]]
        return torch.stack(terms).sum() if terms else torch.zeros(())

    def prune_(self, threshold: float) -> int:
        return sum(layer.prune_(threshold) for layer in self.morpho_layers())

    @torch.no_grad()
    def prune_to_density_(self, density: float, budget: Budget = "weights") -> int:
        """Switch off the on-connections with the lowest logits (all layers ranked together) until the budget's
        density is at most ``density``; returns how many mask entries were pruned (M := -100)."""
        if budget == "flops":
            return self._flop_budget().prune_to_(density)
        layers = self.morpho_layers()
        total = sum(layer.mask_logits.numel() * layer.weights_per_mask_entry for layer in layers)
        excess = total * (self.weighted_density() - density)
        if excess <= 0:
            return 0
        logits = torch.cat([layer.mask_logits.flatten() for layer in layers])
        weights = torch.cat([torch.full((layer.mask_logits.numel(),), float(layer.weights_per_mask_entry)) for layer in layers])
        on = torch.nonzero(logits > 0).flatten()
        order = on[torch.argsort(logits[on], stable=True)]  # weakest first
        count = int(torch.searchsorted(torch.cumsum(weights[order], 0), torch.tensor(excess - 1e-9)).item()) + 1
        chosen = torch.zeros_like(logits, dtype=torch.bool)
        chosen[order[:count]] = True
        start = 0
        for layer in layers:
            size = layer.mask_logits.numel()
            layer.mask_logits[chosen[start : start + size].view_as(layer.mask_logits)] = -100.0
            start += size
        return min(count, len(order))

    def mask_parameters(self) -> list[nn.Parameter]:
        """Mask logits, skip gates and attention head logits (Adam, no weight decay, upstream)."""
        return [p for n, p in self.named_parameters() if n.rpartition(".")[2] in MASK_PARAMETER_NAMES]

    def weight_parameters(self) -> list[nn.Parameter]:
        """Every other parameter (AdamW, upstream)."""
        return [p for n, p in self.named_parameters() if n.rpartition(".")[2] not in MASK_PARAMETER_NAMES]


class MorphoMLP(MorphoNetwork):
    """Flatten -> [MorphoLinear -> (BatchNorm1d) -> ReLU -> (Dropout)] per hidden width -> dense Linear output.

    Differences from upstream (``MorphoNetMLP``): BatchNorm, when on, follows *every* hidden MorphoLinear
    (before the ReLU, as ``models.MLP``); upstream applies one BatchNorm1d after the last hidden ReLU. Dropout
    follows the ReLU (upstream: inside the layer, before the skip term). A skip gate exists only for hidden
    layers with in == out (none for the default [64, 32]).

    Args:
        input_shape: shape of one sample (flattened). num_classes: number of logits.
        hidden: hidden widths (spec default [64, 32]).
        init_density: initial probability that a mask entry is on.
        skip: gated identity path sigmoid(g) x in hidden layers with in == out.
        batch_norm: BatchNorm1d after each hidden MorphoLinear. dropout: after each hidden ReLU.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        hidden: Annotated[Sequence[PositiveInt], MinLen(1)] = (64, 32),
        init_density: Probability = 0.4,
        skip: bool = True,
        batch_norm: bool = False,
        dropout: Fraction = 0.0,
    ) -> None:
        super().__init__()
        masked = lambda i, o: MorphoLinear(i, o, init_density=init_density, skip=skip)  # noqa: E731
        layers = mlp_layers(math.prod(input_shape), num_classes, hidden, masked, "relu", batch_norm, dropout)
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class MorphoCNN(MorphoNetwork):
    """[MorphoConv2d -> ReLU -> AdaptiveAvgPool2d(4)] per channel count -> flatten -> MorphoLinear(C * 16 ->
    hidden) -> ReLU -> dense Linear output.

    As upstream (``MorphoNetCNN``), the 4 x 4 adaptive average pool follows *every* conv stage, so the second
    conv already works on a 4 x 4 map. Args: input_shape ``(C, H, W)``; channels per conv stage (default
    [32, 64]); hidden width of the masked linear layer; init_density; kernel_size of the convs.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        channels: Annotated[Sequence[PositiveInt], MinLen(1)] = (32, 64),
        hidden: PositiveInt = 64,
        init_density: Probability = 0.4,
        kernel_size: PositiveInt = 3,
    ) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"MorphoCNN needs image inputs (C, H, W); the datamodule gives {tuple(input_shape)}.")
        layers: list[nn.Module] = []
        in_ch = int(input_shape[0])
        for out_ch in channels:
            conv = MorphoConv2d(in_ch, out_ch, kernel_size, init_density=init_density)
            layers += [conv, nn.ReLU(), nn.AdaptiveAvgPool2d(4)]
            in_ch = out_ch
        fc = MorphoLinear(in_ch * 16, hidden, init_density=init_density)
        layers += [nn.Flatten(), fc, nn.ReLU(), nn.Linear(hidden, num_classes)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class MorphoBlock(nn.Module):
    """``x + Attn(LN1(x))`` then ``x + FF2(ReLU(FF1(LN2(x))))`` with dropout on both residual branches."""

    def __init__(self, d_model: int, n_heads: int, ff_dim: int, init_density: float, dropout: float) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(d_model), MorphoAttention(d_model, n_heads)
        self.norm2 = nn.LayerNorm(d_model)
        self.ff1 = MorphoLinear(d_model, ff_dim, init_density=init_density)
        self.ff2 = MorphoLinear(ff_dim, d_model, init_density=init_density)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        x = x + self.dropout(self.attn(self.norm1(x), key_padding_mask))
        return x + self.dropout(self.ff2(F.relu(self.ff1(self.norm2(x)))))


class MorphoTransformer(MorphoNetwork):
    """Embedding + learned positions -> n_layers ``MorphoBlock``s -> (masked) mean-pool -> dense Linear output.

    Inputs: a dict batch ``{"input_ids": (B, L), "attention_mask": (B, L)}`` (or a LongTensor of ids) when
    ``vocab_size`` is set, else a dense float tensor (B, L, F) with ``input_shape = (L, F)`` and a Linear F -> d
    embedding. Padding (attention_mask 0) is excluded from attention keys and from the mean-pool.

    Differences from upstream (``MorphoNetTransformer``): the width is ``d_model`` (upstream: n_heads * ff_dim / 2);
    each block has its own pre-attention LayerNorm and a pre-FF LayerNorm (upstream shares one LayerNorm across all
    blocks and has none before the FF); padding masks exist (upstream has none); dropout on the residual
    branches; FF1 has no skip gate (upstream requests one, inactive at its default sizes). ``mask_penalty``
    includes the attention head gates, as upstream's architecture loss does.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        vocab_size: PositiveInt | None = 30522,
        d_model: PositiveInt = 128,
        n_heads: PositiveInt = 4,
        ff_dim: PositiveInt = 128,
        n_layers: PositiveInt = 2,
        max_len: PositiveInt = 512,
        init_density: Probability = 0.4,
        dropout: Fraction = 0.1,
    ) -> None:
        super().__init__()
        self.input_shape, self.vocab_size, self.max_len = tuple(int(s) for s in input_shape), vocab_size, max_len
        if len(self.input_shape) != (1 if vocab_size is not None else 2):
            want = "(max_length,) for token ids" if vocab_size is not None else "(length, features) for dense sequences"
            raise ValueError(f"MorphoTransformer with vocab_size={vocab_size} needs input_shape {want}, "
                             f"got {self.input_shape}.")
        if self.input_shape[0] > max_len:
            raise ValueError(f"model.net.max_len ({max_len}) must be >= the sequence length {self.input_shape[0]}.")
        dense = vocab_size is None
        self.embedding = nn.Linear(self.input_shape[1], d_model) if dense else nn.Embedding(vocab_size, d_model)
        self.pos_embedding = nn.Parameter(torch.randn(max_len, d_model) * 0.02)
        self.blocks = nn.ModuleList(
            MorphoBlock(d_model, n_heads, ff_dim, init_density, dropout) for _ in range(n_layers)
        )
        self.output = nn.Linear(d_model, num_classes)

    def example_input(self) -> dict[str, Tensor] | Tensor:
        if self.vocab_size is None:
            return torch.zeros(1, *self.input_shape)
        ids = torch.full((1, self.input_shape[0]), min(100, self.vocab_size - 1), dtype=torch.long)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def forward(self, x: Mapping[str, Tensor] | Tensor) -> Tensor:
        mask = None
        if isinstance(x, Mapping):
            x, mask = x["input_ids"], x.get("attention_mask")
        if (self.vocab_size is None) == (not x.is_floating_point()):
            want = "a float tensor (B, L, F)" if self.vocab_size is None else "token ids (a dict batch or a LongTensor)"
            raise ValueError(f"MorphoTransformer with vocab_size={self.vocab_size} expects {want}, got {x.dtype}.")
        h = self.embedding(x)
        if h.shape[1] > self.max_len:
            raise ValueError(f"sequence length {h.shape[1]} exceeds model.net.max_len ({self.max_len}).")
        h = h + self.pos_embedding[: h.shape[1]]
        keep = None if mask is None else mask.bool()
        for block in self.blocks:
            h = block(h, keep)
        if keep is None:
            return self.output(h.mean(1))
        weights = keep.unsqueeze(-1).to(h.dtype)
        return self.output((h * weights).sum(1) / weights.sum(1).clamp(min=1.0))
