"""A small VGG-style ConvNet: [Conv3x3 -> BN -> ReLU -> MaxPool2] per stage, then an MLP head."""

from collections.abc import Sequence

from torch import Tensor, nn

from constraints import Fraction, NonNegativeInt, PositiveInt


class ConvNet(nn.Module):
    """Convolutional classifier for small images (28x28, 32x32, ...).

    Args:
        input_shape: ``(channels, height, width)`` of one sample (linked from the datamodule).
        num_classes: number of output logits (linked from the datamodule).
        channels: output channels of each stage; each stage halves the spatial size.
        hidden: width of the hidden Linear layer of the head (0 means a single Linear head).
        dropout: dropout probability before the head's last Linear.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        channels: Sequence[PositiveInt] = (32, 64),
        hidden: NonNegativeInt = 128,
        dropout: Fraction = 0.0,
    ) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"ConvNet needs image inputs (C, H, W); the datamodule gives shape {tuple(input_shape)}.")
        in_ch, height, width = input_shape
        stages: list[nn.Module] = []
        for out_ch in channels:
            stages += [nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU(), nn.MaxPool2d(2)]
            in_ch, height, width = out_ch, height // 2, width // 2
        if height < 1 or width < 1:
            raise ValueError(f"{len(channels)} stages halve {tuple(input_shape[1:])} to nothing; use fewer channels entries.")
        self.features = nn.Sequential(*stages)
        features = in_ch * height * width
        head: list[nn.Module] = [nn.Flatten()]
        if hidden:
            head += [nn.Linear(features, hidden), nn.ReLU()]
            features = hidden
        if dropout > 0:
            head.append(nn.Dropout(dropout))
        head.append(nn.Linear(features, num_classes))
        self.head = nn.Sequential(*head)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))
