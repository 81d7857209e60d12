"""The spec's MorphoNet networks (shared/specs/morphreuse_morphonet.md 2.1-2.7) as presets of ``MaskedNetwork``.

Each preset builds a *plain* network (``nn.Linear`` / ``nn.Conv2d`` / ``SelfAttention``) and puts MorphoNet's
connection masks on it as parametrizations (``models.masks.ConnectionMask``), the one mechanism every network
uses (``models.masked_network``): training, the callbacks and the export are those of any masked network.

The spec's initialisation: a masked layer's W is He-normal, its bias zero, its mask logits +2 with probability
``init_density`` and -2 otherwise; a layer's W and logits are drawn together, layer after layer, so that a seed
gives the networks it always gave. A conv mask is one k x k mask per output filter, shared across its input
channels. Parameter accounting (``models.accounting``): mask logits and skip gates are not part of the dense
architecture; a skip gate counts as one non-zero entry.
"""

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Annotated

import torch
import torch.nn.functional as F
from annotated_types import MinLen
from torch import Tensor, nn
from torch.nn.utils import parametrize

from constraints import Fraction, PositiveInt, Probability
from models.accounting import count_dense_equivalent, count_nonzero
from models.masked_network import MaskedNetwork, has_connection_mask
from models.masks import ConnectionMask
from models.mlp import mlp_layers
from models.morpho_attention import SelfAttention, gate_heads


def _masked(layer: nn.Linear | nn.Conv2d, init_density: float) -> nn.Module:
    """``layer`` (built without initialisation) with W He-normal, b = 0 and a ``ConnectionMask``, drawn in that order."""
    with torch.no_grad():
        fan_in = layer.weight[0].numel()
        layer.weight.copy_(torch.randn(layer.weight.shape) * math.sqrt(2.0 / fan_in))
        if layer.bias is not None:
            layer.bias.zero_()
    parametrize.register_parametrization(layer, "weight", ConnectionMask(layer.weight, init_density))
    return layer


def masked_linear(in_features: int, out_features: int, init_density: float) -> nn.Linear:
    return _masked(nn.utils.skip_init(nn.Linear, in_features, out_features), init_density)


def masked_conv(in_channels: int, out_channels: int, kernel_size: int, stride: int, init_density: float) -> nn.Conv2d:
    """A masked Conv2d with padding k // 2 (unlike upstream, ``stride`` is honoured)."""
    if kernel_size < 1 or stride < 1:
        raise ValueError(f"kernel_size and stride must be >= 1, got {kernel_size} and {stride}.")
    conv = nn.utils.skip_init(nn.Conv2d, in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2)
    return _masked(conv, init_density)


class GatedSkip(nn.Module):
    """``y = linear(x) + sigmoid(g) x`` (in == out): MorphoNet's gated identity path; g = 0 at init, a mask parameter."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        if linear.in_features != linear.out_features:
            raise ValueError(f"a gated skip needs in == out, got {linear.in_features} -> {linear.out_features}.")
        self.linear = linear
        self.skip_gate = nn.Parameter(torch.tensor(0.0))

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x) + torch.sigmoid(self.skip_gate) * x

    def count_nonzero_parameters(self) -> int:
        return count_nonzero(self.linear) + 1

    def count_dense_equivalent_parameters(self) -> int:
        return count_dense_equivalent(self.linear)


def _preset_targets(net: nn.Module) -> str:
    """The full-match regex of the layers the preset masked while building ``net``."""
    names = [name for name, m in net.named_modules() if has_connection_mask(m)]
    return "|".join(f"({n})" for n in names).replace(".", r"\.")


class MorphoMLP(MaskedNetwork):
    """Flatten -> [masked Linear (+ gated skip) -> (BatchNorm1d) -> ReLU -> (Dropout)] per hidden width -> dense
    Linear output.

    Differences from upstream (``MorphoNetMLP``): BatchNorm, when on, follows *every* hidden layer (before the
    ReLU, as ``models.MLP``); upstream applies one BatchNorm1d after the last hidden ReLU. Dropout follows the ReLU
    (upstream: inside the layer, before the skip term). A skip gate exists only for hidden layers with in == out
    (none for the default [64, 32]).

    Args:
        input_shape: shape of one sample (flattened). num_classes: number of logits.
        hidden: hidden widths (spec default [64, 32]).
        init_density: initial probability that a mask entry is on.
        skip: gated identity path sigmoid(g) x in hidden layers with in == out.
        batch_norm: BatchNorm1d after each hidden layer. dropout: after each hidden ReLU.
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
        def layer(i: int, o: int) -> nn.Module:
            linear = masked_linear(i, o, init_density)
            return GatedSkip(linear) if skip and i == o else linear

        net = nn.Sequential(*mlp_layers(math.prod(input_shape), num_classes, hidden, layer, "relu", batch_norm, dropout))
        super().__init__(net, torch.zeros(1, *input_shape), _preset_targets(net))


class MorphoCNN(MaskedNetwork):
    """[masked Conv2d -> ReLU -> AdaptiveAvgPool2d(4)] per channel count -> flatten -> masked Linear(C * 16 ->
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
        if len(input_shape) != 3:
            raise ValueError(f"MorphoCNN needs image inputs (C, H, W); the datamodule gives {tuple(input_shape)}.")
        layers: list[nn.Module] = []
        in_ch = int(input_shape[0])
        for out_ch in channels:
            layers += [masked_conv(in_ch, out_ch, kernel_size, 1, init_density), nn.ReLU(), nn.AdaptiveAvgPool2d(4)]
            in_ch = out_ch
        layers += [nn.Flatten(), masked_linear(in_ch * 16, hidden, init_density), nn.ReLU(), nn.Linear(hidden, num_classes)]
        net = nn.Sequential(*layers)
        super().__init__(net, torch.zeros(1, *input_shape), _preset_targets(net))


class TransformerBlock(nn.Module):
    """``x + Attn(LN1(x))`` then ``x + FF2(ReLU(FF1(LN2(x))))`` with dropout on both residual branches."""

    def __init__(self, attn: SelfAttention, ff1: nn.Module, ff2: nn.Module, dropout: float) -> None:
        super().__init__()
        d_model = attn.d_model
        self.norm1, self.attn, self.norm2, self.ff1, self.ff2 = nn.LayerNorm(d_model), attn, nn.LayerNorm(d_model), ff1, ff2
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        x = x + self.dropout(self.attn(self.norm1(x), key_padding_mask))
        return x + self.dropout(self.ff2(F.relu(self.ff1(self.norm2(x)))))


class SequenceTransformer(nn.Module):
    """Embedding + learned positions -> ``TransformerBlock``s -> (masked) mean-pool -> Linear output; the plain
    network of ``MorphoTransformer`` (its arguments; ``blocks`` built by the caller)."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, vocab_size: int | None, d_model: int,
                 max_len: int, make_blocks: Callable[[], list[nn.Module]]) -> None:
        super().__init__()
        self.input_shape, self.vocab_size, self.max_len = input_shape, vocab_size, max_len
        dense = vocab_size is None
        self.embedding = nn.Linear(input_shape[1], d_model) if dense else nn.Embedding(vocab_size, d_model)
        self.pos_embedding = nn.Parameter(torch.randn(max_len, d_model) * 0.02)
        self.blocks = nn.ModuleList(make_blocks())
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


class MorphoTransformer(MaskedNetwork):
    """A ``SequenceTransformer`` with masked FF layers and gated attention heads (spec 2.2).

    Inputs: a dict batch ``{"input_ids": (B, L), "attention_mask": (B, L)}`` (or a LongTensor of ids) when
    ``vocab_size`` is set, else a dense float tensor (B, L, F) with ``input_shape = (L, F)`` and a Linear F -> d
    embedding. Padding (attention_mask 0) is excluded from attention keys and from the mean-pool.

    Differences from upstream (``MorphoNetTransformer``): the width is ``d_model`` (upstream: n_heads * ff_dim / 2);
    each block has its own pre-attention LayerNorm and a pre-FF LayerNorm (upstream shares one LayerNorm across all
    blocks and has none before the FF); padding masks exist (upstream has none); dropout on the residual
    branches; FF1 has no skip gate (upstream requests one, inactive at its default sizes). Head h's scores are
    multiplied by sigmoid(m_h / T) (``models.morpho_attention.HeadGate``, a parametrization of the query rows);
    ``mask_penalty`` includes the head gates, as upstream's architecture loss does.
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
        shape = tuple(int(s) for s in input_shape)
        if len(shape) != (1 if vocab_size is not None else 2):
            want = "(max_length,) for token ids" if vocab_size is not None else "(length, features) for dense sequences"
            raise ValueError(f"MorphoTransformer with vocab_size={vocab_size} needs input_shape {want}, got {shape}.")
        if shape[0] > max_len:
            raise ValueError(f"model.net.max_len ({max_len}) must be >= the sequence length {shape[0]}.")

        def block() -> TransformerBlock:
            attn = SelfAttention(d_model, n_heads)
            gate_heads(attn)
            ff1 = masked_linear(d_model, ff_dim, init_density)
            return TransformerBlock(attn, ff1, masked_linear(ff_dim, d_model, init_density), dropout)

        net = SequenceTransformer(shape, num_classes, vocab_size, d_model, max_len, lambda: [block() for _ in range(n_layers)])
        super().__init__(net, net.example_input(), _preset_targets(net))

    def example_input(self) -> dict[str, Tensor] | Tensor:
        return self.net.example_input()
