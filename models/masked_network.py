"""MorphoNet on any network: masks on its target layers, and an export that hands back a smaller dense network.

``MaskedNetwork(net, example_input, target_modules, exclude_modules, granularity, init_density)`` puts
``models.masks`` parametrizations on the ``nn.Linear`` / ``nn.Conv2d`` layers that ``target_modules`` selects
(peft semantics, ``models.targets``; grouped and depthwise convolutions included) and otherwise leaves ``net``
as it is. It has the interface MorphoNet's LightningModule and callbacks drive (``models.morphonet.MorphoNetwork``):

* ``granularity="connection"``: ``W' = W * sigmoid(M / T)`` per connection (``ConnectionMask``);
* ``granularity="unit"``: one gate per output channel. Channels that torch-pruning's ``DependencyGraph`` couples
  (a residual add, a BatchNorm, a depthwise convolution, a concatenation) share one gate (``UnitGate``), which
  scales every coupled weight row, bias and BatchNorm affine (``GatedRows``): a closed gate makes the channel
  exactly zero wherever it is produced. A group that also holds a layer no gate can scale exactly (a LayerNorm,
  an attention's packed projection, a free parameter) gets no gate, and so does the output layer's.

``export()`` folds the hard mask into plain parameters (``parametrize.remove_parametrizations``) and then removes
every channel that is zero wherever it is produced (weight row, bias and BatchNorm affine all zero, in every layer
of its group) *physically*, with torch-pruning: the result is a plain, smaller ``nn.Module`` (no mask logits, no
parametrizations) that predicts what the hard-masked network predicts. This is exact when the activations
following the removed channels map 0 to 0 (ReLU, GELU, SiLU, Hardswish, Tanh, a product), so ``export`` checks
it on a random batch and refuses, in one sentence, a network where it is not.
"""

import copy
import warnings
from collections.abc import Iterator
from typing import Any, Literal

import torch
import torch_pruning as tp
from torch import Tensor, nn
from torch.nn.utils import parametrize

from models.flop_budget import FlopBudget
from models.masks import ConnectionMask, GatedRows, Mask, UnitGate
from models.morphonet import MorphoNetwork
from models.targets import TargetModules, match_modules, network_name, output_layer

Granularity = Literal["connection", "unit"]
MASKABLE = (nn.Linear, nn.Conv2d)
GATEABLE = (nn.Linear, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d)
"""Layers whose output channel c is exactly zero once its weight row, bias (and BN affine) entries are zero."""
EXPORT_TOLERANCE = 1e-4


def _producers(group: Any) -> Iterator[tuple[nn.Module, list[int], list[int]]]:
    """(module, its channel indices, the group's root indices) of every parametric layer producing the group."""
    graph = group._DG  # torch-pruning keeps the graph on the group (no public accessor)
    for item in group:
        module = item.dep.target.module
        if graph.is_out_channel_pruning_fn(item.dep.handler) and (
            isinstance(module, nn.Parameter) or any(True for _ in module.parameters(recurse=False))
        ):
            yield module, list(item.idxs), list(item.root_idxs)


def exactly_gateable(group: Any) -> bool:
    """Whether zeroing a channel in every producer of ``group`` and then removing it is exact and feasible: the
    producers are Linear / Conv2d / BatchNorm, a weight layer reads the channel, and the channel is not split
    into attention heads (torch-pruning's ``_UnbindOp``: q, k and v would lose different dimensions)."""
    graph = group._DG
    if not all(isinstance(module, GATEABLE) for module, _, _ in _producers(group)):
        return False
    read = any(graph.is_in_channel_pruning_fn(item.dep.handler) and isinstance(item.dep.target.module, MASKABLE)
               for item in group)
    return read and not any(type(item.dep.target.module).__name__ == "_UnbindOp" for item in group)


def dependency_graph(net: nn.Module, example_input: Any) -> tp.DependencyGraph:
    """torch-pruning's ``DependencyGraph`` of ``net`` traced on ``example_input``."""
    # torch-pruning traces the autograd graph: gradients on, and out of the inference mode Lightning tests in
    with torch.inference_mode(False), torch.enable_grad(), warnings.catch_warnings():
        # cls tokens / position embeddings: groups holding them are never gated or pruned here
        warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
        return tp.DependencyGraph().build_dependency(net, example_inputs=example_input)


def coupled_groups(graph: tp.DependencyGraph, net: nn.Module, output_name: str) -> Iterator[Any]:
    """The graph's groups of coupled output channels of ``net`` (the output layer's group excluded)."""
    return graph.get_all_groups(ignored_layers=[net.get_submodule(output_name)], root_module_types=MASKABLE)


def _export_check_input(example_input: Any) -> Any:
    if isinstance(example_input, Tensor) and example_input.is_floating_point():
        return torch.randn(max(4, example_input.shape[0]), *example_input.shape[1:], generator=torch.Generator().manual_seed(0))
    return example_input


class MaskedNetwork(MorphoNetwork):
    """``net`` with MorphoNet masks on its target layers; see the module docstring.

    Args:
        net: any ``nn.Module`` (torchvision, timm, the lab's networks).
        example_input: one batch the network accepts (traced by torch-pruning for ``unit``; checks ``export``).
        target_modules, exclude_modules: which Linear / Conv2d layers get masks (``models.targets``).
        granularity: ``connection`` or ``unit``.
        init_density: initial probability that a mask entry is on (default 0.4 for connections, as the spec; 1.0
            for unit gates).
    """

    def __init__(
        self,
        net: nn.Module,
        example_input: Any,
        target_modules: TargetModules = "all-linear",
        exclude_modules: TargetModules | None = None,
        granularity: Granularity = "connection",
        init_density: float | None = None,
    ) -> None:
        super().__init__()
        if init_density is None:  # the spec's 0.4 for connections; unit gates start open and are closed by training
            init_density = 0.4 if granularity == "connection" else 1.0
        if granularity not in ("connection", "unit"):
            raise ValueError(f"granularity must be connection or unit, got {granularity!r}.")
        self.net, self.granularity, self.trace_input = net, granularity, example_input
        self.output_name = output_layer(net, MASKABLE)
        targets = match_modules(net, target_modules, exclude_modules, MASKABLE, "MorphoNet")
        if granularity == "connection":
            for module in targets.values():
                parametrize.register_parametrization(module, "weight", ConnectionMask(module.weight, init_density))
        else:
            self._add_unit_gates(targets, init_density)

    def _add_unit_gates(self, targets: dict[str, nn.Module], init_density: float) -> None:
        was_training = self.net.training
        groups = list(coupled_groups(dependency_graph(self.net.eval(), self.trace_input), self.net, self.output_name))
        self.net.train(was_training)
        wanted = {id(m) for m in targets.values()}
        self.flop_budget = FlopBudget(self.net, self.trace_input)
        gated = 0
        for group in groups:
            producers = list(_producers(group))
            if not any(id(module) in wanted for module, _, _ in producers):
                continue
            if not exactly_gateable(group):
                continue  # a LayerNorm / attention heads / free parameter in the group: no exact gate
            channels = len(group[0].idxs)
            per_channel = sum(m.weight.numel() // m.weight.shape[0] for m, _, _ in producers if isinstance(m, MASKABLE))
            gate = UnitGate(channels, init_density, per_channel)
            for item in group:  # the layers reading the channels lose input columns when a gate closes
                if group._DG.is_in_channel_pruning_fn(item.dep.handler):
                    self.flop_budget.gate_inputs(item.dep.target.module, gate, list(item.idxs), list(item.root_idxs))
            for module, rows, roots in producers:
                self.flop_budget.gate_outputs(module, gate, rows, roots)
                for name in ("weight", "bias"):
                    if getattr(module, name, None) is not None:
                        size = getattr(module, name).shape[0]
                        parametrize.register_parametrization(module, name, GatedRows(gate, rows, roots, size))
            gated += 1
        if not gated:
            raise ValueError(f"MorphoNet granularity unit: no output channel of the target layers of "
                             f"{network_name(self.net)} can be gated exactly (each is coupled to a LayerNorm, an "
                             "attention projection or the output layer); choose other target_modules or use "
                             "granularity: connection.")

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.net(*args, **kwargs)

    def morpho_layers(self) -> list[Mask]:
        return [m for m in self.modules() if isinstance(m, Mask)]

    # --- export -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def hard_plain(self, prune_threshold: float | None = None) -> nn.Module:
        """A copy of ``net`` with the hard mask folded into plain parameters (same shapes), in eval mode."""
        masked = copy.deepcopy(self)
        if prune_threshold is not None:
            masked.prune_(prune_threshold)
        masked.set_mask_mode("hard")
        for module in list(masked.net.modules()):
            if parametrize.is_parametrized(module):
                _fold_parametrizations(module)
        return masked.net.eval()

    @torch.inference_mode(False)  # Lightning's test loop runs in inference mode; its tensors cannot be traced
    @torch.no_grad()
    def export(self, prune_threshold: float | None = None) -> nn.Module:
        """The deployed network: hard mask folded in, channels zero in every producer removed (torch-pruning)."""
        reference = self.hard_plain(prune_threshold)
        plain = copy.deepcopy(reference)
        graph = dependency_graph(plain, self.trace_input)
        for group in coupled_groups(graph, plain, self.output_name):
            dead = _zero_channels(group)
            if dead:
                graph.get_pruning_group(group[0].dep.target.module, group[0].dep.handler, dead).prune()
        _check_export(reference, plain, self.trace_input, network_name(self.net))
        return plain.eval()


def _fold_parametrizations(module: nn.Module) -> None:
    """Replace every parametrized tensor of ``module`` by a plain parameter holding its current value.

    Written by hand because ``parametrize.remove_parametrizations`` deletes the property from the subclass that
    parametrize injected, and a deep copy shares that class with the original: the original would lose its weight.
    """
    values = {name: getattr(module, name).detach().clone() for name in module.parametrizations}
    module.__class__ = module.__class__.__bases__[0]  # the class before parametrize injected its subclass
    del module.parametrizations
    for name, value in values.items():
        module.register_parameter(name, nn.Parameter(value))


@torch.no_grad()
def _zero_channels(group: Any) -> list[int]:
    """Root indices of the group's channels that every producing layer outputs as exactly zero (at most all but
    one: a layer keeps one channel)."""
    producers = list(_producers(group))
    if not producers or not exactly_gateable(group):
        return []
    alive = torch.zeros(len(group[0].idxs), dtype=torch.bool)
    for module, rows, roots in producers:
        rows_t, roots_t = torch.tensor(rows), torch.tensor(roots)
        for name in ("weight", "bias"):
            p = getattr(module, name, None)
            if p is not None:
                alive[roots_t] |= p[rows_t].flatten(1).ne(0).any(1) if p.dim() > 1 else p[rows_t].ne(0)
        if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d) and not module.affine:
            alive[roots_t] = True  # BN(0) = -mean / std without an affine to zero it
    dead = torch.nonzero(~alive).flatten().tolist()
    return dead[: len(alive) - 1]


def _check_export(reference: nn.Module, exported: nn.Module, example_input: Any, network: str) -> None:
    x = _export_check_input(example_input)
    want, got = reference(x), exported(x)
    error = float((want - got).abs().max())
    scale = max(float(want.abs().max()), 1.0)
    if error > EXPORT_TOLERANCE * scale:
        raise RuntimeError(f"MorphoNet export of {network}: removing its zero channels changed the output by "
                           f"{error:.3g}; an activation after a pruned channel does not map 0 to 0 (use "
                           "exclude_modules for those layers or granularity: connection).")


def apply_masks(net: nn.Module, example_input: Any, **kwargs: Any) -> MaskedNetwork:
    """Python API (as peft's ``get_peft_model``): ``masked = apply_masks(model, x, granularity="unit")``; train
    ``masked`` (mask logits: ``masked.mask_parameters()``), then ``masked.export()`` is the plain network."""
    return MaskedNetwork(net, example_input, **kwargs)
