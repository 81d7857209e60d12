"""A small MLP-Mixer (Tolstikhin et al. 2021) whose last blocks can be made collapsible (LayerCollapse, spec A7).

Input ``(C, H, W)`` -> patches ``(B, P, D)`` by a ``patch x patch`` strided conv, P = (H/patch)(W/patch). Each
block is ``x <- x + MLP_tok(LN(x)^T)^T`` (token mixing, along the patch axis) then ``x <- x + MLP_ch(LN(x))``
(channel mixing), with ``MLP = Linear -> GELU -> Dropout -> Linear -> Dropout``; the head is LN, the mean over
patches and a Linear. ``convert_mixer_block_`` gives both MLPs of a block a single-slope PReLU(a0) for their
GELU (``models.collapse_chains.to_prelu_``; the function changes, fine-tune). Collapsed, ``MLP_tok`` is one P x P
Linear and ``MLP_ch`` one D x D Linear; the residuals and LayerNorms stay (LN is not affine per sample, A6.7).
"""

from collections.abc import Sequence

from torch import Tensor, nn

from constraints import Fraction, NonNegativeInt, PositiveInt
from models.collapse_chains import find_chains, to_prelu_


def feed_forward(width: int, hidden: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, width), nn.Dropout(dropout))


class MixerBlock(nn.Module):
    """Token mixing then channel mixing, each pre-norm with a residual; ``x`` is ``(B, patches, dim)``."""

    def __init__(self, patches: int, dim: int, token_hidden: int, channel_hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1, self.token_mlp = nn.LayerNorm(dim), feed_forward(patches, token_hidden, dropout)
        self.norm2, self.channel_mlp = nn.LayerNorm(dim), feed_forward(dim, channel_hidden, dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.token_mlp(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channel_mlp(self.norm2(x))


def convert_mixer_block_(block: MixerBlock, slope_init: float = 0.01) -> MixerBlock:
    """Both MLPs of ``block``: GELU -> PReLU(slope_init), weights kept. In place."""
    to_prelu_(block, find_chains(block), slope_init)
    return block


class MLPMixer(nn.Module):
    """MLP-Mixer classifier for small images.

    Args:
        input_shape, num_classes: from the datamodule; H and W must be multiples of ``patch_size``.
        patch_size, dim, depth, token_hidden, channel_hidden, dropout: the usual Mixer sizes.
        collapsible_last: convert the last k blocks (token and channel MLP) to ``CollapsibleBlock``s (0: none).
        slope_init: a0 of the converted blocks' PReLUs (spec: 0.01).
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        patch_size: PositiveInt = 4,
        dim: PositiveInt = 128,
        depth: PositiveInt = 4,
        token_hidden: PositiveInt = 64,
        channel_hidden: PositiveInt = 512,
        dropout: Fraction = 0.0,
        collapsible_last: NonNegativeInt = 0,
        slope_init: float = 0.01,
    ) -> None:
        super().__init__()
        if len(input_shape) != 3 or input_shape[1] % patch_size or input_shape[2] % patch_size:
            raise ValueError(f"MLPMixer needs (C, H, W) inputs with H and W multiples of patch_size={patch_size}; got {tuple(input_shape)}.")
        if not 0 <= collapsible_last <= depth:
            raise ValueError(f"model.net.collapsible_last (MLPMixer) must be in [0, depth = {depth}], got {collapsible_last}.")
        channels, height, width = input_shape
        patches = (height // patch_size) * (width // patch_size)
        self.stem = nn.Conv2d(channels, dim, patch_size, stride=patch_size)
        self.blocks = nn.Sequential(*(MixerBlock(patches, dim, token_hidden, channel_hidden, dropout) for _ in range(depth)))
        for block in list(self.blocks)[depth - collapsible_last :]:
            convert_mixer_block_(block, slope_init)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x).flatten(2).transpose(1, 2)  # (B, patches, dim)
        x = self.norm(self.blocks(x))
        return self.head(x.mean(dim=1))
