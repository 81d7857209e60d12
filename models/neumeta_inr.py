"""NeuMeta INR hypernetwork: maps the coordinate of every weight of a width-h target to that weight (spec:
shared/specs/neumeta.md §3, §4.1.3, §5).

Queries (§3.1): the generated tensors, in the layout's (state-dict) order, are numbered t = 0 .. T-1. A tensor of
shape [C_out, C_in, k, k] or [C_out, C_in] gets one query per (o, c), o outer, c inner; a bias [C_out] one query
per o with c = 0 and C_in = 1. The raw coordinate of a query is (t, o, c, T, C_out, C_in).

Network input (§3.2), with N = ``norm`` (the pretrained / maximum width):

    x = (t / T, o / C_out, c / C_in, T / N, C_out / N, C_in / N)

so positions are relative to the tensor's *current* size and the current sizes themselves are inputs. Fourier
features (§3.3): ``[x, sin(2^k pi x), cos(2^k pi x) for k < F]`` -> 6 + 12F numbers. Body (§3.4): one MLP per
generated tensor, ``Linear(6 + 12F, H) -> ReLU``, then L-1 residual layers ``z <- z + s_l * ReLU(Linear_l(z))``
with a learnable scalar s_l (0.1 for ``resmlp``, 0 for ``mlp``), then ``Linear(H, output_dim)``; PyTorch's default
Linear init (Kaiming-uniform a = sqrt(5)). Each query's output vector is divided by the raw C_in of its tensor
(§3.5, 1 for biases). Conv kernels use the k*k contiguous entries from the middle of the vector
(start = output_dim // 2 - k*k // 2, §3.1); linear weights and biases use entry 0.

Coordinate noise (§4.1.3): raw coordinates + (U(0, 1) - 0.5) * sigma before normalisation. Defaults are the
clean choices; the published quirks are flags: ``noise_sizes=True`` also jitters (T, C_out, C_in) -- and with it
the divisor, U(0.5, 1.5) for biases -- and ``faithful_routing=True`` picks the MLP by truncating the noised t
towards zero (§3.6: about half of tensor t's queries then go to MLP t-1 for t >= 1).

K-sample merge (§5): sample 0 is clean, samples 1..K-1 use noise sigma, and the *weights* are averaged.

``generate(width)`` returns ``{name: tensor}`` for ``torch.func.functional_call(target_at_width, params, (x,))``;
the target's other (fixed) weights come from the module itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from torch import Tensor, nn

INR_KINDS = ("resmlp", "mlp")
_RESIDUAL_SCALE_INIT = {"resmlp": 0.1, "mlp": 0.0}


class WidthLayout(Protocol):
    """Anything that lists the generated tensors at a width (the layouts in ``models.neumeta_targets``)."""

    def tensors(self, width: int) -> Mapping[str, tuple[int, ...]]: ...


@dataclass(frozen=True)
class QueryTable:
    """The queries of one width: raw coordinates [Q, 6] and where each tensor's queries start and end."""

    raw: Tensor
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]  # len T + 1; tensor t owns rows offsets[t]:offsets[t + 1]


def coordinate_table(shapes: Mapping[str, tuple[int, ...]]) -> QueryTable:
    """Raw coordinates (t, o, c, T, C_out, C_in) of every query, tensors in the given order (§3.1)."""
    total = len(shapes)
    blocks, offsets = [], [0]
    for t, (name, shape) in enumerate(shapes.items()):
        if len(shape) == 1:
            c_out, c_in = shape[0], 1
        elif len(shape) in (2, 4):
            c_out, c_in = shape[0], shape[1]
        else:
            raise ValueError(f"generated tensor {name!r} must be 1-D, 2-D or 4-D, got shape {tuple(shape)}.")
        o, c = torch.meshgrid(torch.arange(c_out), torch.arange(c_in), indexing="ij")  # o outer, c inner
        q = o.numel()
        block = torch.stack([torch.full((q,), t), o.reshape(-1), c.reshape(-1), torch.full((q,), total),
                             torch.full((q,), c_out), torch.full((q,), c_in)], dim=1)
        blocks.append(block.float())
        offsets.append(offsets[-1] + q)
    return QueryTable(torch.cat(blocks), tuple(shapes), tuple(tuple(s) for s in shapes.values()), tuple(offsets))


def normalise_coordinates(raw: Tensor, norm: float) -> Tensor:
    """(t/T, o/C_out, c/C_in, T/N, C_out/N, C_in/N) from raw (t, o, c, T, C_out, C_in) (§3.2)."""
    index, size = raw[:, :3], raw[:, 3:]
    return torch.cat([index / size, size / norm], dim=1)


class FourierEncoding(nn.Module):
    """``[x, sin(2^k pi x), cos(2^k pi x)]`` for k = 0 .. num_freqs - 1 (§3.3): D -> D (1 + 2 num_freqs)."""

    def __init__(self, num_freqs: int) -> None:
        super().__init__()
        if num_freqs < 0:
            raise ValueError(f"num_freqs must be >= 0, got {num_freqs}.")
        self.num_freqs = num_freqs
        self.register_buffer("freqs", (2.0 ** torch.arange(num_freqs)) * math.pi, persistent=False)

    def out_features(self, in_features: int) -> int:
        return in_features * (1 + 2 * self.num_freqs)

    def forward(self, x: Tensor) -> Tensor:
        angles = (x[..., None] * self.freqs.to(x.dtype)).flatten(-2)
        return torch.cat([x, torch.sin(angles), torch.cos(angles)], dim=-1)


class ResidualMLP(nn.Module):
    """``Linear -> ReLU``, then ``layers - 1`` times ``z + s * ReLU(Linear(z))``, then ``Linear`` (§3.4)."""

    def __init__(self, in_features: int, hidden: int, layers: int, out_features: int,
                 kind: Literal["resmlp", "mlp"] = "resmlp") -> None:
        super().__init__()
        if kind not in INR_KINDS:
            raise ValueError(f"kind must be one of {INR_KINDS}, got {kind!r}.")
        if layers < 1 or hidden < 1:
            raise ValueError(f"layers and hidden must be >= 1, got layers={layers}, hidden={hidden}.")
        self.inp = nn.Linear(in_features, hidden)
        self.blocks = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(layers - 1))
        self.scales = nn.Parameter(torch.full((layers - 1,), _RESIDUAL_SCALE_INIT[kind]))
        self.out = nn.Linear(hidden, out_features)

    def forward(self, x: Tensor) -> Tensor:
        z = torch.relu(self.inp(x))
        for scale, block in zip(self.scales, self.blocks):
            z = z + scale * torch.relu(block(z))
        return self.out(z)


class NeuMetaINR(nn.Module):
    """Per-tensor residual-MLP INR that generates the tensors of ``layout`` at any width (§3).

    Args:
        layout: the target's layout (``target.layout``): ``layout.tensors(h)`` gives name -> shape at width h.
        norm: N, the pretrained / maximum width that normalises the size coordinates.
        hidden: H, width of each MLP.
        layers: L, one input layer plus L - 1 residual layers.
        num_freqs: F, Fourier frequencies per coordinate.
        output_dim: values per query; default (None) the largest k*k of the generated kernels (1 for MLP targets).
        kind: "resmlp" (residual scales start at 0.1) or "mlp" (start at 0).
        faithful_routing: route by the noised, truncated tensor id as in the release (§3.6); default clean id.
        noise_sizes: also jitter (T, C_out, C_in) and thereby the divisor, as in the release; default index only.
    """

    def __init__(self, layout: WidthLayout, norm: int, hidden: int = 256, layers: int = 4, num_freqs: int = 16,
                 output_dim: int | None = None, kind: Literal["resmlp", "mlp"] = "resmlp",
                 faithful_routing: bool = False, noise_sizes: bool = False) -> None:
        super().__init__()
        if norm < 1:
            raise ValueError(f"norm must be a positive width, got {norm}.")
        shapes = dict(layout.tensors(norm))
        if not shapes:
            raise ValueError("the layout generates no tensors.")
        kernels = {}
        for name, shape in shapes.items():
            if len(shape) == 4 and shape[2] != shape[3]:
                raise ValueError(f"{name!r}: only square kernels are generated, got shape {tuple(shape)}.")
            kernels[name] = shape[2] * shape[3] if len(shape) == 4 else 1
        needed = max(kernels.values())
        output_dim = needed if output_dim is None else int(output_dim)
        if output_dim < needed:
            raise ValueError(f"output_dim must be >= {needed} (the largest k*k generated), got {output_dim}.")
        self.layout, self.norm, self.output_dim = layout, int(norm), output_dim
        self.names = tuple(shapes)
        self.kernel_numel = kernels
        self.faithful_routing, self.noise_sizes = bool(faithful_routing), bool(noise_sizes)
        self.encoding = FourierEncoding(num_freqs)
        in_features = self.encoding.out_features(6)
        self.mlps = nn.ModuleList(ResidualMLP(in_features, hidden, layers, output_dim, kind) for _ in self.names)
        self._tables: dict[int, QueryTable] = {}

    @property
    def num_tensors(self) -> int:
        return len(self.names)

    def table(self, width: int) -> QueryTable:
        """The (cached) query table of the width-``width`` target."""
        if width not in self._tables:
            shapes = dict(self.layout.tensors(width))
            if tuple(shapes) != self.names:
                raise ValueError(f"the layout's tensors changed with the width: {tuple(shapes)} vs {self.names}.")
            self._tables[width] = coordinate_table(shapes)
        return self._tables[width]

    def _noisy(self, raw: Tensor, sigma: float, generator: torch.Generator | None) -> Tensor:
        if sigma == 0:
            return raw
        noise = (torch.rand(raw.shape, generator=generator, device=raw.device, dtype=raw.dtype) - 0.5) * sigma
        if not self.noise_sizes:
            noise[:, 3:] = 0
        return raw + noise

    def _run(self, width: int, sigma: float, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """MLP outputs [Q, output_dim] of every query (before the division by C_in) and the (noised) raw coords."""
        if sigma < 0:
            raise ValueError(f"coordinate noise sigma must be >= 0, got {sigma}.")
        ref = self.encoding.freqs  # follows .to() / .double() like the parameters (MLPs may be swapped in tests)
        table = self.table(width)
        raw = self._noisy(table.raw.to(device=ref.device, dtype=ref.dtype), sigma, generator)
        features = self.encoding(normalise_coordinates(raw, self.norm))
        if self.faithful_routing and sigma > 0:
            # Release behaviour: int(t + u) truncates toward zero, so negative u sends tensor t to MLP t-1.
            route = torch.trunc(raw[:, 0]).long().clamp(0, self.num_tensors - 1)
            out = features.new_zeros(len(features), self.output_dim)
            for r, mlp in enumerate(self.mlps):
                idx = (route == r).nonzero().squeeze(1)
                if len(idx):
                    out = out.index_copy(0, idx, mlp(features[idx]))
        else:
            o = table.offsets
            out = torch.cat([mlp(features[o[t]:o[t + 1]]) for t, mlp in enumerate(self.mlps)])
        return out, raw

    def generate(self, width: int, sigma: float = 0.0, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """All generated tensors of the width-``width`` target, ``{name: tensor}`` in layout order.

        ``sigma`` is the coordinate noise (0: the clean sample); ``generator`` seeds it.
        """
        out, raw = self._run(width, sigma, generator)
        out = out / raw[:, 5:6]  # divide by the (possibly noised) raw C_in, 1 for biases (§3.5)
        table = self.table(width)
        params = {}
        for t, (name, shape) in enumerate(zip(table.names, table.shapes)):
            rows = out[table.offsets[t]:table.offsets[t + 1]]
            if len(shape) == 4:
                kk = self.kernel_numel[name]
                start = self.output_dim // 2 - kk // 2  # the middle slice of the output vector (§3.1)
                params[name] = rows[:, start:start + kk].reshape(shape)
            else:
                params[name] = rows[:, 0].reshape(shape)
        return params

    def forward(self, width: int, sigma: float = 0.0, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Same as ``generate`` (a forward lets DDP and hooks see the INR call)."""
        return self.generate(width, sigma, generator)

    def merge(self, width: int, samples: int, sigma: float,
              generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Average of ``samples`` generated weight sets: the clean one plus ``samples - 1`` noisy ones (§5)."""
        if samples < 1:
            raise ValueError(f"samples must be >= 1, got {samples}.")
        mean = self.generate(width)
        for k in range(2, samples + 1):
            sample = self.generate(width, sigma, generator)
            # Running mean m += (x - m) / k: with identical samples (sigma = 0) it stays bit-equal to the clean
            # sample, where sum-then-divide would round.
            mean = {n: m + (sample[n] - m) / k for n, m in mean.items()}
        return mean


def relative_mse(generated: Mapping[str, Tensor], targets: Mapping[str, Tensor]) -> Tensor:
    """Mean over tensors of ``||g - w||^2 / ||w||^2``: every tensor counts alike whatever its scale (spec 9.4.1)."""
    terms = [(generated[k] - w).pow(2).sum() / w.pow(2).sum().clamp_min(1e-12) for k, w in targets.items()]
    return torch.stack(terms).mean()


def warm_start_(inr: NeuMetaINR, targets: Callable[[int], Mapping[str, Tensor]], widths: Sequence[int],
                steps: int = 600, lr: float = 1e-3, sigma: float = 0.0, seed: int = 0) -> list[float]:
    """Width-aware warm start (spec 9.4.1): regress ``inr`` onto ``targets(h)`` at a width h drawn per step from
    ``widths`` (relative MSE, Adam), with coordinate noise ``sigma``. ``targets`` is typically
    ``lambda h: resample_to_width(smoothed_net, h)`` (cache it: it is deterministic). In place; returns the loss
    of every step. Written here because it is a plain regression loop with no Lightning state to keep."""
    if steps < 1 or not widths:
        raise ValueError(f"warm start needs steps >= 1 and at least one width; got {steps} and {list(widths)}.")
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(inr.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        h = int(widths[int(torch.randint(len(widths), (1,), generator=generator))])
        loss = relative_mse(inr.generate(h, sigma, generator), targets(h))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses
