"""Coupled channels of any network, through torch-pruning's ``DependencyGraph``.

A *group* is a set of output channels that must be removed together (a residual add, a BatchNorm, a depthwise
convolution or a concatenation couples them), with every layer that produces them and every layer that reads
them. MorphoNet's unit gates put one gate on a group (``models.masked_network``), its export removes a group's
dead channels (``models.morphonet_export``), and the torch-pruning baseline ranks groups
(``lightning_modules.structured_pruning``).
"""

import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

MASKABLE = (nn.Linear, nn.Conv2d)
GATEABLE = (nn.Linear, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d)
"""Layers whose output channel c is exactly zero once its weight row, bias (and BN affine) entries are zero."""

Channels = tuple[nn.Module, list[int], list[int]]
"""(a layer, its own indices of the group's channels, the group's root indices of the same channels)."""


class InputMarker(nn.Module):
    """An exact identity in front of the traced network (a BatchNorm with mean 0, variance 1, eps 0), so that the
    groups coupled to the network's *input* (a skip path from the input features) can be told apart: their
    channels cannot be removed, the input keeps its width. Written by hand: torch-pruning has no node for inputs."""

    def __init__(self, example_input: Any) -> None:
        super().__init__()
        norm = {2: nn.BatchNorm1d, 4: nn.BatchNorm2d}.get(example_input.dim())
        self.norm = norm(example_input.shape[1], eps=0.0).eval() if norm else None
        if self.norm is not None:
            self.norm._input_marker = True

    def forward(self, x: Any) -> Any:
        return x if self.norm is None else self.norm(x)


class _Marked(nn.Module):
    def __init__(self, net: nn.Module, example_input: Any) -> None:
        super().__init__()
        self.marker, self.net = InputMarker(example_input), net

    def forward(self, x: Any) -> Any:
        return self.net(self.marker(x))


def dependency_graph(net: nn.Module, example_input: Any, mark_input: bool = True) -> tp.DependencyGraph:
    """torch-pruning's ``DependencyGraph`` of ``net`` traced on ``example_input`` (passed as one argument, as
    ``net(example_input)``: a tensor or a dict batch). With ``mark_input`` (a float tensor input) it traces ``net``
    behind an ``InputMarker``; ``touches_input(group)`` then tells the groups coupled to the input."""
    traced = _Marked(net, example_input) if mark_input and isinstance(example_input, torch.Tensor) and example_input.is_floating_point() else net
    # torch-pruning traces the autograd graph: gradients on, and out of the inference mode Lightning tests in
    with torch.inference_mode(False), torch.enable_grad(), warnings.catch_warnings():
        # cls tokens / position embeddings / skip gates: groups holding them are never gated or pruned here
        warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
        return tp.DependencyGraph().build_dependency(traced, example_inputs=example_input,
                                                     forward_fn=lambda model, x: model(x))


def touches_input(group: Any) -> bool:
    """Whether the group's channels are coupled to the network's input features (an ``InputMarker`` in it)."""
    return any(getattr(item.dep.target.module, "_input_marker", False) for item in group)


def coupled_groups(graph: tp.DependencyGraph, net: nn.Module, output_name: str) -> Iterator[Any]:
    """The graph's groups of coupled output channels of ``net`` (the output layer's group excluded)."""
    return graph.get_all_groups(ignored_layers=[net.get_submodule(output_name)], root_module_types=MASKABLE)


def producers(group: Any) -> Iterator[Channels]:
    """Every parametric layer producing the group's channels."""
    graph = group._DG  # torch-pruning keeps the graph on the group (no public accessor)
    for item in group:
        module = item.dep.target.module
        if graph.is_out_channel_pruning_fn(item.dep.handler) and (
            isinstance(module, nn.Parameter) or any(True for _ in module.parameters(recurse=False))
        ):
            yield module, list(item.idxs), list(item.root_idxs)


def consumers(group: Any) -> Iterator[Channels]:
    """Every layer reading the group's channels through its input (columns of a Linear / Conv2d weight...)."""
    graph = group._DG
    for item in group:
        if graph.is_in_channel_pruning_fn(item.dep.handler):
            yield item.dep.target.module, list(item.idxs), list(item.root_idxs)


def exactly_gateable(group: Any) -> bool:
    """Whether zeroing a channel in every producer of ``group`` and then removing it is exact and feasible: the
    producers are Linear / Conv2d / BatchNorm, the channels are not the network's input features, a weight layer
    reads them, and they are not split into attention heads (torch-pruning's ``_UnbindOp``: q, k and v would lose different dimensions)."""
    if touches_input(group) or not all(isinstance(module, GATEABLE) for module, _, _ in producers(group)):
        return False
    read = any(isinstance(module, MASKABLE) for module, _, _ in consumers(group))
    return read and not any(type(item.dep.target.module).__name__ == "_UnbindOp" for item in group)
