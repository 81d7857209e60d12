"""A plain multi-layer perceptron: flatten -> [Linear -> (BatchNorm) -> act -> (Dropout)] x L -> Linear."""

import math
from collections.abc import Callable, Sequence
from typing import Literal

from torch import Tensor, nn

from constraints import Fraction, PositiveInt

Activation = Literal["relu", "gelu", "tanh", "silu", "prelu"]
ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU,
                                           "prelu": nn.PReLU}


def mlp_layers(
    in_features: int,
    num_classes: int,
    hidden: Sequence[int],
    make_linear: Callable[[int, int], nn.Module],
    activation: Activation = "relu",
    batch_norm: bool = False,
    dropout: float = 0.0,
) -> list[nn.Module]:
    """``Flatten, [make_linear -> (BatchNorm1d) -> act -> (Dropout)] per hidden width, Linear`` (output dense)."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for out in hidden:
        layers.append(make_linear(width, int(out)))
        if batch_norm:
            layers.append(nn.BatchNorm1d(int(out)))
        layers.append(ACTIVATIONS[activation]())
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
        hidden: Sequence[PositiveInt] = (512, 512),
        activation: Activation = "relu",
        dropout: Fraction = 0.0,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        layers = mlp_layers(math.prod(input_shape), num_classes, hidden, nn.Linear, activation, batch_norm, dropout)
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)
