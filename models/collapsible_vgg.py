"""The custom CIFAR VGG of LayerCollapse (spec A7), trained from scratch.

Features: VGG11/13/16/19 stacks of ``Conv3x3 (no bias) -> BatchNorm2d -> PReLU(one slope, a0 = 0)`` (exactly ReLU
at the start), each max-pool followed by Dropout 0.2, 0.3, 0.4, 0.5, 0.5. Head: one ``CollapsibleBlock``
``512 * (H/32)^2 -> hidden -> classes`` with BatchNorm1d inside and PReLU(a0 = 0.01); collapsed it is a single
``Linear(512 (H/32)^2, classes)``. The conv PReLUs can be regularised toward 1 too ("LC as a regulariser",
``LayerCollapse.regularize_prelus``) but are never collapsed: no conv merging exists.
"""

from collections.abc import Sequence
from typing import Literal

from torch import Tensor, nn

from constraints import Fraction, PositiveInt
from models.layercollapse import CollapsibleBlock

VggDepth = Literal[11, 13, 16, 19]
VGG_STACKS: dict[int, list[int | str]] = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


class CollapsibleVGG(nn.Module):
    """VGG body + collapsible head; see the module docstring.

    Args:
        input_shape, num_classes: from the datamodule; H and W must be multiples of 32 (5 max-pools).
        depth: 11, 13, 16 or 19.
        hidden: width of the head's hidden layer (spec: 4096).
        conv_slope_init, head_slope_init: a0 of the conv and head PReLUs (spec: 0 and 0.01).
        dropout: dropout after each of the five max-pools (five values).
        head_batch_norm: BatchNorm1d inside the head block (spec: yes).
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        depth: VggDepth = 11,
        hidden: PositiveInt = 4096,
        conv_slope_init: float = 0.0,
        head_slope_init: float = 0.01,
        dropout: tuple[Fraction, Fraction, Fraction, Fraction, Fraction] = (0.2, 0.3, 0.4, 0.5, 0.5),
        head_batch_norm: bool = True,
    ) -> None:
        super().__init__()
        if len(input_shape) != 3 or input_shape[1] % 32 or input_shape[2] % 32:
            raise ValueError(f"CollapsibleVGG needs (C, H, W) inputs with H and W multiples of 32 (five max-pools); got {tuple(input_shape)}.")
        layers: list[nn.Module] = []
        in_ch, pools = input_shape[0], 0
        for item in VGG_STACKS[depth]:
            if item == "M":
                layers += [nn.MaxPool2d(2), nn.Dropout(dropout[pools])]
                pools += 1
            else:
                layers += [nn.Conv2d(in_ch, item, 3, padding=1, bias=False), nn.BatchNorm2d(item), nn.PReLU(1, init=conv_slope_init)]
                in_ch = item
        self.features = nn.Sequential(*layers)
        features = in_ch * (input_shape[1] // 32) * (input_shape[2] // 32)
        self.classifier = CollapsibleBlock(features, hidden, num_classes, head_slope_init, 0.0, head_batch_norm)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).flatten(1))
