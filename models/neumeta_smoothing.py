"""NeuMeta weight smoothing: a function-preserving channel permutation that lowers total variation (spec:
shared/specs/neumeta.md §1.1, §2).

Total variation (§2.1): for a 1-D tensor ``TV(t) = sum_i |t[i+1] - t[i]|``; for a 2-D or 4-D tensor the absolute
differences between neighbours along the output-channel axis (0) and the input-channel axis (1), summed over all
remaining entries (no differences inside a k x k kernel). Network TV = mean over all parameter tensors.

For a clique (``models.neumeta_targets.Clique``) of C channels, stack every member parameter slice with its channel
axis first and flattened, ``F = [W_1.movedim(a_1, 0).reshape(C, -1) | ... ]`` of shape [C, D] (§2.3). Reordering
the channels by a permutation pi changes the TV along that clique's axes to
``sum_i ||F[pi(i+1)] - F[pi(i)]||_1`` and nothing else (a permutation of rows leaves the differences along the
other axis untouched), so minimising network TV is one shortest open Hamiltonian path (SHP) per clique on the L1
distances between the rows of F.

Solver (§2.4, deterministic, float64): nearest-neighbour paths from every start node (at most 64 evenly spaced
starts), the ``keep`` shortest of them plus the identity order are each improved by best-improvement 2-opt on the
open path (segment reversal, where reversing a prefix or suffix only pays its one inner edge), and the shortest
result wins. NN + 2-opt is what the spec recommends: a few percent from optimal on these sizes, no randomness
(ties break towards the lower index), and with the identity order among the candidates the result is never worse
than not permuting. The repo's ``fast_tsp`` truncates distances to uint16 and is seeded from the OS; not inherited.

Permuting every member of a clique with the same pi leaves the network function unchanged (ReLU and residual adds
commute with channel permutations; §2.5). BatchNorm is folded into its producer first (§1.1, with
``torch.nn.utils.fusion``); with ``fold_bn=False`` the BN parameters *and* running statistics are permuted instead.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from models.neumeta_targets import Clique, NeuMetaTarget


def tensor_tv(t: Tensor) -> Tensor:
    """Total variation along axis 0 (and axis 1 for tensors with >= 2 dims); 0 for scalars (§2.1)."""
    t = t.detach()
    if t.dim() == 0 or t.shape[0] == 0:
        return t.new_zeros(())
    tv = torch.diff(t, dim=0).abs().sum()
    if t.dim() >= 2:
        tv = tv + torch.diff(t, dim=1).abs().sum()
    return tv


def network_tv(net: nn.Module | Mapping[str, Tensor]) -> float:
    """Mean of ``tensor_tv`` over the parameters of ``net`` (or over the tensors of a name -> tensor map)."""
    tensors = list(net.values() if isinstance(net, Mapping) else (p for _, p in net.named_parameters()))
    if not tensors:
        raise ValueError("network_tv needs at least one tensor.")
    return sum(float(tensor_tv(t).double()) for t in tensors) / len(tensors)


@torch.no_grad()
def fold_batchnorm_(net: NeuMetaTarget) -> list[str]:
    """Fold each eval-mode BatchNorm of ``net.bn_pairs()`` into its producing Linear/Conv and replace the BN by
    ``nn.Identity`` (§1.1). In place; returns the folded BN paths. The result equals the eval-mode network."""
    pairs = net.bn_pairs()
    was_training = net.training
    net.eval()  # the torch fusion helpers refuse modules in training mode
    folded = []
    for producer_name, bn_name in pairs:
        producer, bn = net.get_submodule(producer_name), net.get_submodule(bn_name)
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError(f"{bn_name!r} has no running statistics (track_running_stats=False); cannot fold it.")
        if isinstance(producer, nn.Linear):
            fused = fuse_linear_bn_eval(producer, bn)
        elif isinstance(producer, nn.Conv2d):
            fused = fuse_conv_bn_eval(producer, bn)
        else:
            raise ValueError(f"{producer_name!r} is a {type(producer).__name__}; only Linear and Conv2d fold.")
        net.set_submodule(producer_name, fused)
        net.set_submodule(bn_name, nn.Identity())
        folded.append(bn_name)
    net.train(was_training)
    return folded


def _state(net: nn.Module) -> dict[str, Tensor]:
    return dict(net.state_dict(keep_vars=True))


def check_cliques(net: nn.Module, cliques: Sequence[Clique]) -> None:
    """Every member exists, has ``clique.size`` entries on its axis, and no (tensor, axis) is in two cliques."""
    state, seen = _state(net), {}
    for clique in cliques:
        for m in clique.members:
            if m.name not in state:
                raise ValueError(f"clique {clique.name!r}: {m.name!r} is not a parameter or buffer of the network.")
            t = state[m.name]
            if m.axis >= t.dim() or t.shape[m.axis] != clique.size:
                raise ValueError(f"clique {clique.name!r}: {m.name!r} has shape {tuple(t.shape)}, expected "
                                 f"{clique.size} entries on axis {m.axis}.")
            if (m.name, m.axis) in seen:
                raise ValueError(f"{m.name!r} axis {m.axis} is in cliques {seen[m.name, m.axis]!r} and "
                                 f"{clique.name!r}.")
            seen[m.name, m.axis] = clique.name


def clique_features(net: nn.Module, clique: Clique) -> Tensor:
    """The [C, D] city matrix of §2.3 (float64): member *parameters* with the clique axis first, flattened.

    Buffers (BN running statistics) are permuted with the clique but are not part of the TV, so not of the cost.
    """
    params = dict(net.named_parameters())
    rows = [params[m.name].detach().movedim(m.axis, 0).reshape(clique.size, -1).double()
            for m in clique.members if m.name in params]
    if not rows:
        raise ValueError(f"clique {clique.name!r} has no parameter members.")
    return torch.cat(rows, dim=1)


def path_cost(dist: Tensor | np.ndarray, order: Sequence[int] | Tensor) -> float:
    """Length of the open path visiting the cities in ``order``."""
    d = dist.cpu().numpy() if isinstance(dist, Tensor) else np.asarray(dist)
    o = np.asarray(order.cpu() if isinstance(order, Tensor) else order, dtype=np.int64)
    return float(d[o[:-1], o[1:]].sum())


def _nearest_neighbour(d: np.ndarray, start: int) -> np.ndarray:
    n = len(d)
    visited = np.zeros(n, dtype=bool)
    path = np.empty(n, dtype=np.int64)
    path[0], visited[start] = start, True
    for i in range(1, n):
        row = np.where(visited, np.inf, d[path[i - 1]])
        path[i] = int(np.argmin(row))  # ties -> lowest index: deterministic
        visited[path[i]] = True
    return path


def _two_opt(d: np.ndarray, path: np.ndarray, max_moves: int) -> np.ndarray:
    """Best-improvement 2-opt on an open path until no reversal shortens it."""
    n = len(path)
    if n < 3:
        return path
    path = path.copy()
    # Positions 1..n of the padded matrix are the path; 0 and n+1 are free virtual ends (distance 0 to all),
    # so reversing a prefix or a suffix is an ordinary move that only pays one inner edge.
    i = np.arange(1, n + 1)[:, None]
    j = np.arange(1, n + 1)[None, :]
    upper = j > i
    tol = 1e-12 * max(1.0, float(d.max(initial=0.0)) * n)
    for _ in range(max_moves):
        dp = np.zeros((n + 2, n + 2))
        dp[1:-1, 1:-1] = d[np.ix_(path, path)]
        # reversing positions i..j replaces edges (i-1, i), (j, j+1) by (i-1, j), (i, j+1)
        delta = dp[i - 1, j] + dp[i, j + 1] - dp[i - 1, i] - dp[j, j + 1]
        delta = np.where(upper, delta, np.inf)
        best = int(np.argmin(delta))
        if delta.flat[best] >= -tol:
            break
        a, b = divmod(best, n)  # 0-based positions of i and j
        path[a:b + 1] = path[a:b + 1][::-1]
    return path


def shortest_open_path(features: Tensor, keep: int = 4, max_starts: int = 64, max_moves: int = 100_000) -> Tensor:
    """A short open Hamiltonian path through the rows of ``features`` [C, D] under the L1 distance (§2.3-2.4).

    Deterministic (no random numbers; ties go to the lower index). Returns the order as a LongTensor: position i
    of the smoothed tensor holds old channel ``order[i]``.
    """
    if features.dim() != 2:
        raise ValueError(f"features must be a [C, D] matrix, got shape {tuple(features.shape)}.")
    if keep < 1 or max_starts < 1:
        raise ValueError(f"keep and max_starts must be >= 1, got keep={keep}, max_starts={max_starts}.")
    n = features.shape[0]
    if n <= 2:
        return torch.arange(n)
    f = features.detach().double().cpu()
    d = torch.cdist(f[None], f[None], p=1)[0].numpy()
    starts = np.unique(np.linspace(0, n - 1, num=min(n, max_starts)).round().astype(np.int64))
    nn_paths = sorted((_nearest_neighbour(d, int(s)) for s in starts), key=lambda p: path_cost(d, p))
    candidates = [np.arange(n), *nn_paths[:keep]]
    best, best_cost = None, np.inf
    for cand in candidates:
        improved = _two_opt(d, cand, max_moves)
        cost = path_cost(d, improved)
        if cost < best_cost:  # strict: the earlier candidate wins ties
            best, best_cost = improved, cost
    return torch.from_numpy(best.copy())


@torch.no_grad()
def permute_clique_(net: nn.Module, clique: Clique, order: Tensor) -> None:
    """Reorder axis ``m.axis`` of every member of ``clique`` by ``order`` (new[i] = old[order[i]]), in place."""
    order = torch.as_tensor(order, dtype=torch.long)
    if sorted(order.tolist()) != list(range(clique.size)):
        raise ValueError(f"order must be a permutation of 0..{clique.size - 1} for clique {clique.name!r}.")
    state = _state(net)
    for m in clique.members:
        t = state[m.name]
        t.copy_(t.index_select(m.axis, order.to(t.device)))


@dataclass
class SmoothingResult:
    """What ``smooth_`` did: per-clique orders, network TV before/after, per-clique path cost before/after."""

    permutations: dict[str, Tensor]
    tv_before: float
    tv_after: float
    clique_tv_before: dict[str, float] = field(default_factory=dict)
    clique_tv_after: dict[str, float] = field(default_factory=dict)
    folded: list[str] = field(default_factory=list)


@torch.no_grad()
def smooth_(net: NeuMetaTarget, fold_bn: bool = True) -> SmoothingResult:
    """Fold BN (if ``fold_bn``), then permute every clique of ``net`` (``net.cliques()``, read after folding) along
    its SHP order, in place. TV before is measured after folding, so before/after compare the same parameter set.
    Apply once to the pretrained full-width model (§2.6).
    """
    folded = fold_batchnorm_(net) if fold_bn else []
    cliques = net.cliques()
    check_cliques(net, cliques)
    tv_before = network_tv(net)
    perms, before, after = {}, {}, {}
    for clique in cliques:
        features = clique_features(net, clique)
        order = shortest_open_path(features)
        d = torch.cdist(features[None], features[None], p=1)[0]
        before[clique.name] = path_cost(d, torch.arange(clique.size))
        after[clique.name] = path_cost(d, order)
        permute_clique_(net, clique, order)
        perms[clique.name] = order
    return SmoothingResult(perms, tv_before, network_tv(net), before, after, folded)


# --------------------------------------------------------------------------------------------------------
# Resampling to another width (spec 9.4.1: warm-start targets; the "resample-only" baseline of 9.5)


def _interpolate_axis(t: Tensor, axis: int, size: int) -> Tensor:
    """Linear interpolation of ``t`` along ``axis`` at the relative positions o/size, o = 0..size-1, of its
    current length N (source coordinate o * N / size, clamped to N - 1); size == N returns ``t`` unchanged."""
    n = t.shape[axis]
    if size == n:
        return t.clone()
    pos = torch.arange(size, dtype=torch.float64) * n / size
    lo = pos.floor().long().clamp(max=n - 1)
    hi = (lo + 1).clamp(max=n - 1)
    frac = (pos - lo).to(t.dtype)
    shape = [1] * t.dim()
    shape[axis] = size
    frac = frac.view(shape)
    return t.index_select(axis, lo) * (1 - frac) + t.index_select(axis, hi) * frac


@torch.no_grad()
def resample_to_width(net: nn.Module, width: int) -> dict[str, Tensor]:
    """The generated tensors of ``net`` (a target at width N, BatchNorm folded) resampled to ``width`` h.

    Every clique whose size depends on the width is interpolated along its axis in each generated member
    (``_interpolate_axis``); on the consumer side (axis 1: the input channels of the next layer) the slice is
    multiplied by N_c / h_c so that the sum over input channels, and with it the next layer's pre-activation for
    channels that vary smoothly, is preserved. At h = N the result is the pretrained tensors themselves. These are
    the warm-start regression targets of spec 9.4.1 and, used directly, the "resample-only" baseline.
    """
    if getattr(net, "has_batchnorm", False):
        raise ValueError("fold BatchNorm (fold_batchnorm_) before resampling: BN statistics are not generated.")
    source = {c.name: c for c in net.layout.cliques(net.width)}
    target = {c.name: c for c in net.layout.cliques(width)}
    state = net.state_dict()
    out = {name: state[name].detach().clone() for name in net.layout.tensors(net.width)}
    for name, clique in source.items():
        new_size = target[name].size
        if new_size == clique.size:
            continue
        for member in clique.members:
            if member.name not in out:  # a fixed (not generated) tensor of the clique keeps its size
                continue
            t = _interpolate_axis(out[member.name], member.axis, new_size)
            out[member.name] = t * (clique.size / new_size) if member.axis == 1 else t
    expected = net.layout.tensors(width)
    wrong = {k: tuple(v.shape) for k, v in out.items() if tuple(v.shape) != tuple(expected[k])}
    if wrong:
        raise ValueError(f"resampling gave shapes {wrong}, expected {expected}: a fixed tensor couples a width-dependent clique.")
    return out
