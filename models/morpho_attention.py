"""Self-attention for ``models.MorphoTransformer``: plain multi-head attention and MorphoNet's head-gated variant
(spec: shared/specs/morphreuse_morphonet.md 2.2)."""

import math

import torch
from torch import Tensor, nn

from models.masks import check_temperature


class SelfAttention(nn.Module):
    """Multi-head self-attention (fused qkv Linear(d, 3d), output Linear(d, d)), plain torch.

    ``key_padding_mask`` (B x L, True = real token) sets padded keys' scores to -inf; a sequence with no real
    token at all attends uniformly instead of producing NaN. Subclasses may scale each head's scores
    (``head_scale``).
    """

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        if n_heads < 1 or d_model % n_heads:
            raise ValueError(f"model.net.d_model ({d_model}) must be a positive multiple of model.net.n_heads ({n_heads}).")
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, d_model // n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def head_scale(self) -> Tensor | None:
        return None

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        batch, length, _ = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
        scale = self.head_scale()
        if scale is not None:
            scores = scores * scale.view(1, -1, 1, 1)
        if key_padding_mask is not None:
            keep = key_padding_mask.bool()
            keep = keep | ~keep.any(-1, keepdim=True)
            scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
        out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, length, self.d_model)
        return self.proj(out)


class MorphoAttention(SelfAttention):
    """Self-attention whose head h's scores are multiplied by sigmoid(m_h / T) before the softmax (spec 2.2
    parity: this rescales the head's softmax temperature, it cannot switch the head off). ``head_logits``
    m ~ N(0, 0.1^2) are mask parameters; the head scale is the same in soft and hard mask mode, and export
    folds it into the query projection. No prune."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__(d_model, n_heads)
        self.head_logits = nn.Parameter(torch.randn(n_heads) * 0.1)
        self.register_buffer("temperature", torch.tensor(1.0))

    def set_temperature(self, t: float) -> None:
        self.temperature.fill_(check_temperature(t))

    def head_scale(self) -> Tensor:
        return torch.sigmoid(self.head_logits / self.temperature)

    def mask_penalty(self) -> Tensor:
        return self.head_scale().mean()

    def count_dense_equivalent_parameters(self) -> int:
        return sum(p.numel() for m in (self.qkv, self.proj) for p in m.parameters())

    @torch.no_grad()
    def count_nonzero_parameters(self) -> int:
        return sum(int(torch.count_nonzero(p)) for m in (self.qkv, self.proj) for p in m.parameters())
