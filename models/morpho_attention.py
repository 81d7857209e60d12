"""Self-attention for ``models.MorphoTransformer``, and MorphoNet's head gates as a parametrization of it
(spec: shared/specs/morphreuse_morphonet.md 2.2)."""

import math

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from models.masks import check_temperature


class SelfAttention(nn.Module):
    """Multi-head self-attention (fused qkv Linear(d, 3d), output Linear(d, d)), plain torch.

    ``key_padding_mask`` (B x L, True = real token) sets padded keys' scores to -inf; a sequence with no real
    token at all attends uniformly instead of producing NaN.
    """

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        if n_heads < 1 or d_model % n_heads:
            raise ValueError(f"model.net.d_model ({d_model}) must be a positive multiple of model.net.n_heads ({n_heads}).")
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, d_model // n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        batch, length, _ = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
        if key_padding_mask is not None:
            keep = key_padding_mask.bool()
            keep = keep | ~keep.any(-1, keepdim=True)
            scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
        out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, length, self.d_model)
        return self.proj(out)


class HeadGate(nn.Module):
    """MorphoNet's per-head score scale sigmoid(m_h / T) (spec 2.2 parity): ``head_logits`` m ~ N(0, 0.1^2) are
    mask parameters; the scale is the same in soft and hard mask mode (it rescales a head's softmax temperature,
    it cannot switch the head off) and nothing prunes it."""

    def __init__(self, n_heads: int) -> None:
        super().__init__()
        self.head_logits = nn.Parameter(torch.randn(n_heads) * 0.1)
        self.register_buffer("temperature", torch.tensor(1.0))

    def set_temperature(self, t: float) -> None:
        self.temperature.fill_(check_temperature(t))

    def head_scale(self) -> Tensor:
        return torch.sigmoid(self.head_logits / self.temperature)

    def mask_penalty(self) -> Tensor:
        return self.head_scale().mean()


class QueryScale(nn.Module):
    """Parametrization of a fused qkv projection's weight (3d, d) or bias (3d,): the query rows of head h times
    the gate's scale s_h. Since ``q_h . k = s_h (q_h . k)`` for the scaled query, this multiplies head h's
    scores by s_h; folding the parametrization (export) leaves a plain ``SelfAttention``."""

    def __init__(self, gate: HeadGate, d_model: int, head_dim: int) -> None:
        super().__init__()
        self.gate, self.d_model, self.head_dim = gate, d_model, head_dim

    def forward(self, p: Tensor) -> Tensor:
        scale = self.gate.head_scale().repeat_interleave(self.head_dim).to(p.dtype)  # one per query row
        ones = torch.ones(p.shape[0] - self.d_model, dtype=p.dtype, device=p.device)
        return p * torch.cat([scale, ones]).view(-1, *[1] * (p.dim() - 1))


def gate_heads(attention: SelfAttention) -> HeadGate:
    """Put one ``HeadGate`` on ``attention``'s heads (``QueryScale`` on its qkv weight and bias); returns it."""
    gate = HeadGate(attention.n_heads)
    for name in ("weight", "bias"):
        parametrize.register_parametrization(attention.qkv, name, QueryScale(gate, attention.d_model, attention.head_dim))
    return gate
