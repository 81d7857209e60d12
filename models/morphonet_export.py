"""MorphoNet's export: the hard-masked network as the plain, physically smaller network it amounts to (spec 2.5).

``remove_dead_channels(net, example_input, output_name)`` removes, with torch-pruning, every channel of a coupled
group (``models.channel_groups``) that cannot change the output, and leaves a plain ``nn.Module`` that predicts
what ``net`` predicts. A channel is removed when, at every layer that reads it,

* the layer's weights on it are zero (*unread*: nothing leaves the channel), or
* the channel is a constant c (*unfed*: every Linear / Conv2d producing it has a zero weight row, so it is
  ``act(b)``, BatchNorm and skip paths included) and the reader is a Linear, whose bias absorbs ``W[:, j] c``,
  or c = 0. c is read at the layer's input on a random batch, and a channel counts as constant only when the
  weights say so *and* the batch agrees (a skip path from the network's input makes it vary). A non-zero
  constant before a convolution stays: zero padding makes its contribution position dependent.

Passes repeat until nothing changes (removing a reader can leave its producers unread). The output layer's
classes and the network's inputs are never removed; a layer keeps at least one channel. This holds for any
network; ``check_export`` compares the result with the hard-masked network on a random batch and refuses, in one
sentence, a network where removing a channel was not exact.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from models.accounting import count_dense_equivalent, count_nonzero
from models.channel_groups import MASKABLE, consumers, coupled_groups, dependency_graph, exactly_gateable, producers

EXPORT_TOLERANCE = 1e-4
MAX_PASSES = 10


def fold_parametrizations(module: nn.Module) -> None:
    """Replace every parametrized tensor of ``module`` by a plain parameter holding its current value.

    Written by hand because ``parametrize.remove_parametrizations`` deletes the property from the subclass that
    parametrize injected, and a deep copy shares that class with the original: the original would lose its weight.
    """
    values = {name: getattr(module, name).detach().clone() for name in module.parametrizations}
    module.__class__ = module.__class__.__bases__[0]  # the class before parametrize injected its subclass
    del module.parametrizations
    for name, value in values.items():
        module.register_parameter(name, nn.Parameter(value))


def check_input(example_input: Any) -> Any:
    """A random batch of at least 4 shaped like ``example_input`` (token dicts are used as they are)."""
    if isinstance(example_input, Tensor) and example_input.is_floating_point():
        generator = torch.Generator().manual_seed(0)
        return torch.randn(max(4, example_input.shape[0]), *example_input.shape[1:], generator=generator)
    return example_input


def _reads(module: nn.Module, idxs: list[int], roots: list[int], row_roots: Tensor | None) -> Tensor:
    """Per index of ``idxs``: whether a weight of ``module`` carries that input channel into a *different* channel
    (a read by the channel's own row, the diagonal of a skip-connected layer or a depthwise filter, does not
    count: ``row_roots`` are the group's roots of ``module``'s output rows, -1 outside the group). Unknown reads
    (a grouped, non-depthwise convolution) count."""
    w = module.weight
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        if module.groups == module.in_channels == module.out_channels:  # depthwise: channel j is read by filter j
            own = row_roots is not None and bool((row_roots[idxs] == torch.tensor(roots)).all())
            return torch.zeros(len(idxs), dtype=torch.bool) if own else w[idxs].flatten(1).ne(0).any(1)
        return torch.ones(len(idxs), dtype=torch.bool)
    nonzero = w[:, idxs].flatten(2).ne(0).any(2) if w.dim() > 2 else w[:, idxs].ne(0)  # (out, len(idxs))
    if row_roots is not None:
        nonzero &= row_roots[:, None] != torch.tensor(roots)[None, :]
    return nonzero.any(0)


def _fed(module: nn.Module, rows: list[int], roots: list[int], reads: tuple[list[int], list[int]] | None) -> Tensor:
    """Per row of ``rows``: whether a non-zero weight feeds it from outside its own channel (a Linear's diagonal
    read of its own channel, ``reads`` = (idxs, roots) of its input in the group, keeps a constant constant)."""
    w = module.weight[rows].flatten(2).ne(0).any(2) if module.weight.dim() > 2 else module.weight[rows].ne(0)
    if reads is not None and isinstance(module, nn.Linear):
        idxs, in_roots = reads
        own = torch.tensor(roots)[:, None] == torch.tensor(in_roots)[None, :]
        w[:, idxs] &= ~own
    return w.any(1)


def _input_values(net: nn.Module, x: Any, modules: list[nn.Module]) -> dict[int, Tensor]:
    """The input each of ``modules`` receives on the batch ``x`` (one forward pass)."""
    seen: dict[int, Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda m, args: seen.setdefault(id(m), args[0].detach())) for m in modules]
    try:
        net(x)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def _constants(values: Tensor, module: nn.Module, idxs: list[int]) -> tuple[Tensor, Tensor]:
    """(is constant, the constant) of the input of ``module`` at each of its channels ``idxs`` on the batch."""
    v = values.movedim(1 if isinstance(module, nn.Conv2d) else -1, 0)[idxs].flatten(1)  # (channels, batch x positions)
    return (v == v[:, :1]).all(1), v[:, 0]


@torch.no_grad()
def _removable(group: Any, net: nn.Module, x: Any) -> list[int]:
    """Root indices of the group's channels that can be removed exactly (see the module docstring); the biases
    of the Linear readers of removed constant channels absorb them."""
    if not exactly_gateable(group):
        return []
    size = len(group[0].idxs)
    makers = [(m, rows, roots) for m, rows, roots in producers(group) if isinstance(m, MASKABLE)]
    readers = [(m, idxs, roots) for m, idxs, roots in consumers(group) if isinstance(m, MASKABLE)]
    row_roots = {}
    for module, rows, roots in makers:
        row_roots[id(module)] = torch.full((module.weight.shape[0],), -1, dtype=torch.long)
        row_roots[id(module)][rows] = torch.tensor(roots)
    reads_of = {id(m): (idxs, roots) for m, idxs, roots in readers}
    unfed = torch.ones(size, dtype=torch.bool)
    for module, rows, roots in makers:
        unfed[roots] &= ~_fed(module, rows, roots, reads_of.get(id(module)))
    read = torch.zeros(size, dtype=torch.bool)
    reads = [_reads(m, idxs, roots, row_roots.get(id(m))) for m, idxs, roots in readers]
    for (_, _, roots), nonzero in zip(readers, reads):
        read[torch.tensor(roots)[nonzero]] = True
    removable = ~read
    folds = []
    if bool((unfed & read).any()):  # constant channels: removable where every reader can take the constant
        values = _input_values(net, x, [m for m, _, _ in readers])
        removable |= unfed
        for (module, idxs, roots), nonzero in zip(readers, reads):
            if id(module) not in values:  # not called on this input: nothing to fold, the read decides
                removable[torch.tensor(roots)[nonzero]] = False
                continue
            constant, c = _constants(values[id(module)], module, idxs)
            absorbs = isinstance(module, nn.Linear) and module.bias is not None
            ok = ~nonzero | (constant & ((c == 0) | absorbs))
            removable[torch.tensor(roots)[~ok]] = False
            folds.append((module, idxs, torch.tensor(roots), torch.where(nonzero & constant, c, 0.0)))
    dead = torch.nonzero(removable).flatten()[: size - 1]
    chosen = torch.zeros(size, dtype=torch.bool)
    chosen[dead] = True
    for module, idxs, roots, c in folds:  # the readers' biases absorb the constants of the removed channels
        fold = chosen[roots] & c.ne(0)
        if fold.any():
            module.bias += module.weight[:, torch.tensor(idxs)[fold]] @ c[fold].to(module.weight.dtype)
    return dead.tolist()


@torch.no_grad()
def remove_dead_channels(net: nn.Module, example_input: Any, output_name: str) -> nn.Module:
    """Remove, in place, every channel of ``net`` that cannot change its output (module docstring); returns ``net``."""
    x = check_input(example_input)
    for _ in range(MAX_PASSES):
        graph = dependency_graph(net, example_input)
        removed = 0
        for group in coupled_groups(graph, net, output_name):
            dead = _removable(group, net, x)
            if dead:
                graph.get_pruning_group(group[0].dep.target.module, group[0].dep.handler, dead).prune()
                removed += len(dead)
        if not removed:
            break
    return net.eval()


def check_export(reference: nn.Module, exported: nn.Module, example_input: Any, network: str) -> None:
    """Refuse, in one sentence, an export that does not predict what ``reference`` predicts."""
    x = check_input(example_input)
    want, got = reference(x), exported(x)
    error = float((want - got).abs().max())
    scale = max(float(want.abs().max()), 1.0)
    if error > EXPORT_TOLERANCE * scale:
        raise RuntimeError(f"MorphoNet export of {network}: removing its dead channels changed the output by "
                           f"{error:.3g}; a layer after a removed channel does not map its constant through (use "
                           "exclude_modules for those layers or granularity: connection).")


def _weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MASKABLE)]


def _widths(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Conv2d):
        return module.in_channels, module.out_channels
    return module.in_features, module.out_features


def export_summary(model: nn.Module, exported: nn.Module) -> dict[str, Any]:
    """Per weight layer: in/out widths before and after export and the exported layer's parameter counts; plus
    totals (exported parameters, their non-zero count, the model's dense equivalent and hard-mask non-zero)."""
    hard = model.hard_plain()
    before, after = _weight_layers(hard), _weight_layers(exported)
    if len(before) != len(after):
        raise ValueError(f"export_summary: {len(before)} weight layers in the model but {len(after)} in the export.")
    masked_names = {n.removeprefix("net.") for n, m in model.named_modules() if parametrize.is_parametrized(m)}
    layers = []
    for (name, old), (_, new) in zip(before, after):
        (in_before, out_before), (in_after, out_after) = _widths(old), _widths(new)
        layers.append({
            "name": name,
            "kind": "conv" if isinstance(new, nn.Conv2d) else "linear",
            "masked": name in masked_names,
            "in_before": in_before, "out_before": out_before, "in_after": in_after, "out_after": out_after,
            "params": sum(p.numel() for p in new.parameters()),
            "nonzero": sum(int(torch.count_nonzero(p)) for p in new.parameters()),
        })
    return {
        "layers": layers,
        "units_removed": sum(layer["out_before"] - layer["out_after"] for layer in layers),
        "params_exported": sum(p.numel() for p in exported.parameters()),
        "nonzero_exported": count_nonzero(exported),
        "nonzero_hard_masked": count_nonzero(hard),
        "dense_equivalent": count_dense_equivalent(model),
    }
