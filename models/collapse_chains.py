"""LayerCollapse on any network: find the collapsible chains, give them single-slope PReLUs, fold them.

A *chain* is ``Linear -> activation -> [Dropout | Identity | BatchNorm1d]* -> Linear`` where the modules are
children of one module (the chain's *owner*: a ``Sequential``, timm's ``Mlp``, torchvision's ``MLPBlock``, a
``CollapsibleBlock``, a VGG classifier) and each output in the chain is read only by the next module. The owner's
forward is traced with ``torch.fx`` (its children as leaves), which is what proves the second condition; owners
fx cannot trace are skipped. With its activation a PReLU of slope ``a``, a chain computes
``L2(D(PReLU_a(L1 x)))``; at ``a = 1`` (eval mode) that is affine, and ``collapse_chains_`` replaces it by one
``nn.Linear`` (``models.layercollapse.collapse_chain``: ``W = W2 diag(s) W1``, BatchNorm folded, dropout
dropped).

``to_prelu_`` swaps a chain's activation for ``PReLU(num_parameters=1)``: ReLU -> slope 0 and LeakyReLU(s) ->
slope s keep the function exactly; any other activation (GELU, Hardswish, SiLU, ...) gets ``slope_init`` and
the function changes (fine-tune; ``lightning_modules.LayerCollapse`` reports the change).

Chains that share a Linear (``L1 a1 L2 a2 L3``, a VGG classifier) form *runs*; a collapsed run is one Linear at
the first Linear's place, every other module of the run becomes ``nn.Identity`` (the owner's forward is left as
it is), and a run that is its owner's whole forward replaces the owner itself. The result depends only on the
*set* of collapsed chains, so ``rebuild_collapsed_chains_`` rebuilds it for a checkpoint from the names alone.
"""

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import fx, nn

from models.layercollapse import collapse_chain

_ACTIVATION_MODULES = ("torch.nn.modules.activation", "timm.layers.activations", "transformers.activations")
_NOT_ELEMENTWISE = (nn.Softmax, nn.LogSoftmax, nn.Softmin, nn.Softmax2d, nn.GLU, nn.MultiheadAttention)


@dataclass(frozen=True)
class Chain:
    """One collapsible chain, by module paths in the network (``name`` is how configs and logs call it)."""

    name: str  # the owner's path when the owner holds one chain, else the activation's path
    owner: str
    first: str  # the first Linear
    act: str
    middle: tuple[str, ...]  # Dropout / Identity / BatchNorm1d between them, in order
    norm: str | None  # the BatchNorm1d among them, if any
    last: str  # the second Linear
    in_features: int  # of the first Linear
    out_features: int  # of the second
    owner_sequence: tuple[str, ...] | None  # the owner's forward as a path of children, when it is one

    def modules(self) -> tuple[str, ...]:
        return (self.first, self.act, *self.middle, self.last)


def is_activation(m: nn.Module) -> bool:
    """An elementwise activation layer: a single-slope PReLU or a parameter-free torch / timm / HF activation."""
    if isinstance(m, nn.PReLU):
        return m.weight.numel() == 1
    return (type(m).__module__ in _ACTIVATION_MODULES and not isinstance(m, _NOT_ELEMENTWISE)
            and next(m.parameters(), None) is None)


class _ChildrenAsLeaves(fx.Tracer):
    """Traces one module's own forward; every submodule it calls is a leaf (``call_module``)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


def _owner_chains(owner_path: str, owner: nn.Module) -> list[Chain]:
    try:
        graph = _ChildrenAsLeaves().trace(owner)
    except Exception:  # noqa: BLE001 - data-dependent control flow and the like: not an owner we can prove
        return []
    children = dict(owner.named_modules())
    calls = [n for n in graph.nodes if n.op == "call_module"]
    called_once = {t for t in (n.target for n in calls) if sum(c.target == t for c in calls) == 1}
    full = lambda target: f"{owner_path}.{target}" if owner_path else target  # noqa: E731

    def feeds_only(node: fx.Node) -> fx.Node | None:
        """The single module call that reads ``node`` (and nothing else), or None."""
        users = list(node.users)
        if len(users) != 1 or users[0].op != "call_module" or users[0].target not in called_once:
            return None
        user = users[0]
        return user if user.args == (node,) and not user.kwargs else None

    found = []
    for node in calls:
        if node.target not in called_once or not isinstance(children[node.target], nn.Linear):
            continue
        act, middle, norm, cur = None, [], None, node
        while (nxt := feeds_only(cur)) is not None:
            m = children[nxt.target]
            if isinstance(m, nn.Linear):
                if act is not None:
                    found.append((node.target, act, tuple(middle), norm, nxt.target))
                break
            if act is None and is_activation(m):
                act = nxt.target
            elif isinstance(m, (nn.Dropout, nn.Identity)) or (
                    isinstance(m, nn.BatchNorm1d) and norm is None and m.track_running_stats
                    and m.num_features == children[node.target].out_features):
                middle.append(nxt.target)
                norm = nxt.target if isinstance(m, nn.BatchNorm1d) else norm
            else:
                break
            cur = nxt
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    path_like = len(placeholders) == 1 and all(
        n.op in ("placeholder", "call_module", "output") for n in graph.nodes) and all(
        n.args == (prev,) and not n.kwargs for prev, n in zip(list(graph.nodes)[:-1], list(graph.nodes)[1:]))
    sequence = tuple(full(n.target) for n in calls) if path_like else None
    return [
        Chain(name=owner_path if len(found) == 1 and owner_path else full(act), owner=owner_path, first=full(first), act=full(act),
              middle=tuple(full(m) for m in middle), norm=full(norm) if norm else None, last=full(last),
              in_features=children[first].in_features, out_features=children[last].out_features, owner_sequence=sequence)
        for first, act, middle, norm, last in found
    ]


def find_chains(net: nn.Module) -> list[Chain]:
    """Every collapsible chain of ``net``, in module order (see the module docstring for what qualifies).

    Only modules with at least two ``nn.Linear`` children are traced, and a module that appears under two paths
    (shared) is never part of a chain: swapping it would change the other place too.
    """
    counts: dict[int, int] = {}
    for _, m in net.named_modules(remove_duplicate=False):
        counts[id(m)] = counts.get(id(m), 0) + 1
    chains = []
    for path, owner in net.named_modules():
        if sum(isinstance(c, nn.Linear) for c in owner.children()) >= 2:
            chains += [c for c in _owner_chains(path, owner)
                       if all(counts[id(net.get_submodule(p))] == 1 for p in c.modules())]
    return chains


def keeps_function(act: nn.Module) -> bool:
    """Whether ``to_prelu_`` replaces ``act`` without changing the function (PReLU, ReLU, LeakyReLU)."""
    return isinstance(act, (nn.PReLU, nn.ReLU, nn.LeakyReLU))


@torch.no_grad()
def to_prelu_(net: nn.Module, chains: Iterable[Chain], slope_init: float = 0.01) -> list[str]:
    """Give each chain a single-slope PReLU in place of its activation; returns the names of the chains whose
    function changed (activations other than ReLU, LeakyReLU and single-slope PReLU)."""
    changed = []
    for chain in chains:
        act = net.get_submodule(chain.act)
        if isinstance(act, nn.PReLU):
            continue
        slope = 0.0 if isinstance(act, nn.ReLU) else act.negative_slope if isinstance(act, nn.LeakyReLU) else slope_init
        if not keeps_function(act):
            changed.append(chain.name)
        ref = net.get_submodule(chain.first).weight
        net.set_submodule(chain.act, nn.PReLU(num_parameters=1, init=slope).to(ref.device, ref.dtype))
    return changed


def slope(net: nn.Module, chain: Chain) -> float:
    return float(net.get_submodule(chain.act).weight.detach().reshape(()))


def _runs(chains: Sequence[Chain]) -> list[list[Chain]]:
    """Chains joined where one's last Linear is the next one's first, in order (``chains`` in module order)."""
    runs: list[list[Chain]] = []
    for chain in chains:
        if runs and runs[-1][-1].last == chain.first:
            runs[-1].append(chain)
        else:
            runs.append([chain])
    return runs


def _place_run(net: nn.Module, run: list[Chain], merged: nn.Linear) -> None:
    """Put ``merged`` where the run was: in the owner's place if the run is the owner's whole forward."""
    members = [run[0].first] + [p for c in run for p in c.modules()[1:]]
    if run[0].owner and run[0].owner_sequence is not None and set(run[0].owner_sequence) == set(members):
        net.set_submodule(run[0].owner, merged)
        return
    net.set_submodule(run[0].first, merged)
    for path in members[1:]:
        net.set_submodule(path, nn.Identity())


@torch.no_grad()
def collapse_chains_(net: nn.Module, chains: Sequence[Chain], names: Iterable[str], before: Iterable[str] = ()) -> None:
    """Collapse the chains ``names`` in place (their slopes are taken as 1, whatever they are: check first);
    ``before`` names the chains collapsed earlier, whose modules now hold their fold (a Linear) or Identity."""
    names, before = set(names), set(before)
    _check_names(chains, names, before)
    for run in _runs([c for c in chains if c.name in names | before]):
        if not any(c.name in names for c in run):
            continue
        # a chain collapsed earlier left its fold in its first Linear and Identity in its last: skip it
        linears, norms = [net.get_submodule(run[0].first)], []
        for chain in run:
            following = net.get_submodule(chain.last)
            if isinstance(following, nn.Linear):
                norms.append(net.get_submodule(chain.norm) if chain.norm else None)
                linears.append(following)
        _place_run(net, run, collapse_chain(linears, norms))


def _check_names(chains: Sequence[Chain], names: set[str], before: set[str]) -> None:
    if names & before:
        raise ValueError(f"chains {sorted(names & before)} are collapsed already.")
    unknown = (names | before) - {c.name for c in chains}
    if unknown:
        raise ValueError(f"no collapsible chain is named {sorted(unknown)}; the chains are {[c.name for c in chains]}.")


def rebuild_collapsed_chains_(net: nn.Module, chains: Sequence[Chain], names: Iterable[str], before: Iterable[str] = ()) -> None:
    """Give ``net`` (with the chains ``before`` collapsed) the structure ``collapse_chains_`` leaves after
    collapsing ``names`` too, with zero weights, ready for ``load_state_dict``: checkpoints store only names."""
    names, before = set(names), set(before)
    _check_names(chains, names, before)
    for run in _runs([c for c in chains if c.name in names | before]):
        if any(c.name in names for c in run):
            ref = net.get_submodule(run[0].first).weight
            merged = nn.Linear(run[0].in_features, run[-1].out_features, device=ref.device, dtype=ref.dtype)
            nn.init.zeros_(merged.weight), nn.init.zeros_(merged.bias)
            _place_run(net, run, merged)
