"""A plain multi-layer perceptron: flatten -> [Linear -> (BatchNorm) -> act -> (Dropout)] x L -> Linear."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from torch import Tensor, nn

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU, "prelu": nn.PReLU}


def make_activation(name: str) -> nn.Module:
    """Build an activation by name; one clear error naming the allowed values otherwise."""
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {name!r}.")
    return ACTIVATIONS[name]()


def mlp_layers(
    in_features: int,
    num_classes: int,
    hidden: Sequence[int],
    make_linear: Callable[[int, int], nn.Module],
    activation: str = "relu",
    batch_norm: bool = False,
    dropout: float = 0.0,
) -> list[nn.Module]:
    """``Flatten, [make_linear -> (BatchNorm1d) -> act -> (Dropout)] per hidden width, Linear`` (output dense)."""
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"model.net.dropout must be in [0, 1), got {dropout}.")
    if any(int(w) < 1 for w in hidden):
        raise ValueError(f"model.net.hidden widths must be positive integers, got {list(hidden)}.")
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for out in hidden:
        layers.append(make_linear(width, int(out)))
        if batch_norm:
            layers.append(nn.BatchNorm1d(int(out)))
        layers.append(make_activation(activation))
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = int(out)
    layers.append(nn.Linear(width, num_classes))
    return layers


class MLP(nn.Module):
    """Fully connected classifier on flattened inputs.

    Args:
        input_shape: shape of one sample (linked from the datamodule); it is flattened.
        num_classes: number of output logits (linked from the datamodule).
        hidden: widths of the hidden layers, e.g. ``[512, 512]``.
        activation: one of relu, gelu, tanh, silu, prelu.
        dropout: dropout probability after each hidden activation (0 disables it).
        batch_norm: insert BatchNorm1d after each hidden Linear.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        hidden: Sequence[int] = (512, 512),
        activation: str = "relu",
        dropout: float = 0.0,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        layers = mlp_layers(math.prod(input_shape), num_classes, hidden, nn.Linear, activation, batch_norm, dropout)
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)
