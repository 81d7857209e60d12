"""MorphoNet on any network: masks on its target layers, and an export that hands back a smaller dense network.

``MaskedNetwork(net, example_input, target_modules, exclude_modules, granularity, init_density)`` puts
``models.masks`` parametrizations on the ``nn.Linear`` / ``nn.Conv2d`` layers that ``target_modules`` selects
(peft semantics, ``models.targets``; grouped and depthwise convolutions included) and otherwise leaves ``net``
as it is. It is what MorphoNet's LightningModule and callbacks drive; the spec's networks (``models.MorphoMLP``,
``MorphoCNN``, ``MorphoTransformer``) are presets of it on plain networks.

* ``granularity="connection"``: ``W' = W * sigmoid(M / T)`` per connection (``ConnectionMask``);
* ``granularity="unit"``: one gate per output channel. Channels that torch-pruning's ``DependencyGraph`` couples
  (a residual add, a BatchNorm, a depthwise convolution, a concatenation) share one gate (``UnitGate``), which
  scales every coupled weight row, bias and BatchNorm affine (``GatedRows``): a closed gate makes the channel
  exactly zero wherever it is produced. A group that also holds a layer no gate can scale exactly (a LayerNorm,
  an attention's packed projection, a free parameter) gets no gate, and so does the output layer's.

``export()`` folds the hard mask into plain parameters and removes every channel that cannot change the output
*physically*, with torch-pruning (``models.morphonet_export``): the result is a plain, smaller ``nn.Module`` (no
mask logits, no parametrizations) that predicts what the hard-masked network predicts (checked on a random batch).
"""

import copy
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from models.channel_groups import MASKABLE, consumers, coupled_groups, dependency_graph, exactly_gateable, producers
from models.flop_budget import FlopBudget
from models.masks import PRUNED_LOGIT, Budget, ConnectionMask, GatedRows, Mask, MaskMode, UnitGate, check_temperature
from models.morpho_attention import HeadGate
from models.morphonet_export import check_export, fold_parametrizations, remove_dead_channels
from models.targets import TargetModules, match_modules, network_name, output_layer

Granularity = Literal["connection", "unit"]
MASK_PARAMETER_NAMES = ("mask_logits", "skip_gate", "head_logits")


def has_connection_mask(module: nn.Module) -> bool:
    return parametrize.is_parametrized(module, "weight") and any(
        isinstance(p, ConnectionMask) for p in module.parametrizations.weight)


class MaskedNetwork(nn.Module):
    """``net`` with MorphoNet masks on its target layers; see the module docstring.

    Args:
        net: any ``nn.Module`` (torchvision, timm, the lab's networks).
        example_input: one batch the network accepts (traced by torch-pruning; checks ``export``).
        target_modules, exclude_modules: which Linear / Conv2d layers get masks (``models.targets``). A target
            that already carries a connection mask keeps it (the presets draw theirs layer by layer, in the order
            that makes a seed reproduce the spec's networks).
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
                if not has_connection_mask(module):
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
            makers = list(producers(group))
            if not any(id(module) in wanted for module, _, _ in makers) or not exactly_gateable(group):
                continue  # not targeted, or a LayerNorm / attention heads / free parameter in the group
            channels = len(group[0].idxs)
            per_channel = sum(m.weight.numel() // m.weight.shape[0] for m, _, _ in makers if isinstance(m, MASKABLE))
            gate = UnitGate(channels, init_density, per_channel)
            for module, idxs, roots in consumers(group):  # readers lose input columns when a gate closes
                self.flop_budget.gate_inputs(module, gate, idxs, roots)
            for module, rows, roots in makers:
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

    # --- the masks, as the LightningModule and the callbacks drive them ----------------------------------------
    def morpho_layers(self) -> list[Mask]:
        """The masks (connection masks or unit gates) in module order."""
        return [m for m in self.modules() if isinstance(m, Mask)]

    def attentions(self) -> list[HeadGate]:
        return [m for m in self.modules() if isinstance(m, HeadGate)]

    def set_temperature(self, t: float) -> None:
        t = check_temperature(t)
        for module in [*self.morpho_layers(), *self.attentions()]:
            module.set_temperature(t)

    def set_mask_mode(self, mode: MaskMode) -> None:
        if mode not in ("soft", "hard"):
            raise ValueError(f"mask mode must be soft or hard, got {mode!r}.")
        for layer in self.morpho_layers():
            layer.mask_mode = mode

    def _masked_weights(self, on: Callable[[Mask], Tensor]) -> tuple[Tensor | int, int]:
        """(sum over masks of weights_per_mask_entry * on(mask), the masked weights in all)."""
        kept: Tensor | int = 0
        total = 0
        for layer in self.morpho_layers():
            kept = kept + layer.weights_per_mask_entry * on(layer)
            total += layer.weights_per_mask_entry * layer.mask_logits.numel()
        return kept, total

    @torch.no_grad()
    def weighted_density(self) -> float:
        """Fraction of masked *weights* whose mask is on (a conv mask entry counts once per input channel); exact
        integer counts, unlike the straight-through ``kept_fraction``."""
        kept, total = self._masked_weights(lambda layer: (layer.mask_logits > 0).sum())
        return int(kept) / total if total else 1.0

    def kept_fraction(self, budget: Budget = "weights") -> Tensor:
        """The fraction of the budget the hard masks keep, with a straight-through gradient (that of the soft
        masks): masked weights or, for unit gates, FLOPs (``models.flop_budget``)."""
        if budget == "flops":
            return self._flop_budget().kept(lambda gate: gate.straight_through())
        kept, total = self._masked_weights(lambda layer: layer.straight_through().sum())
        return kept / total if total else torch.ones(())

    def penalty_count(self, budget: Budget = "weights") -> int:
        """n of the intended penalty ``lambda n (D - d)^2``: the masked weights (budget weights), or the gate entries
        (budget flops), so that the mean push on a gate is that on one connection of an MLP's masks."""
        if budget == "flops":
            return sum(gate.mask_logits.numel() for gate in self._flop_budget().gates())
        return self._masked_weights(lambda layer: 0)[1]

    def _flop_budget(self) -> FlopBudget:
        budget = getattr(self, "flop_budget", None)
        if budget is None:
            raise ValueError(f"budget flops counts the FLOPs that unit gates remove; {network_name(self.net)} has "
                             "connection masks, whose export keeps the dense FLOPs: use granularity unit on a plain "
                             "network, or budget weights.")
        return budget

    def mask_penalty(self) -> Tensor:
        """Sum over masks (and attention head gates) of mean(sigmoid(M / T)): upstream's penalty / lambda."""
        terms = [m.mask_penalty() for m in [*self.morpho_layers(), *self.attentions()]]
        return torch.stack(terms).sum() if terms else torch.zeros(())

    def prune_(self, threshold: float) -> int:
        return sum(layer.prune_(threshold) for layer in self.morpho_layers())

    @torch.no_grad()
    def prune_to_density_(self, density: float, budget: Budget = "weights") -> int:
        """Switch off the on-entries with the lowest logits (all layers ranked together) until the budget's
        density is at most ``density``; returns how many mask entries were pruned (M := -100)."""
        if budget == "flops":
            return self._flop_budget().prune_to_(density)
        layers = self.morpho_layers()
        total = self._masked_weights(lambda layer: 0)[1]
        excess = total * (self.weighted_density() - density)
        if excess <= 0:
            return 0
        logits = torch.cat([layer.mask_logits.flatten() for layer in layers])
        weights = torch.cat([torch.full((layer.mask_logits.numel(),), float(layer.weights_per_mask_entry)) for layer in layers])
        on = torch.nonzero(logits > 0).flatten()
        order = on[torch.argsort(logits[on], stable=True)]  # weakest first
        count = int(torch.searchsorted(torch.cumsum(weights[order], 0), torch.tensor(excess - 1e-9)).item()) + 1
        chosen = torch.zeros_like(logits, dtype=torch.bool)
        chosen[order[:count]] = True
        start = 0
        for layer in layers:
            size = layer.mask_logits.numel()
            layer.mask_logits[chosen[start : start + size].view_as(layer.mask_logits)] = PRUNED_LOGIT
            start += size
        return min(count, len(order))

    def mask_parameters(self) -> list[nn.Parameter]:
        """Mask logits, skip gates and attention head logits (Adam, no weight decay, upstream)."""
        return [p for n, p in self.named_parameters() if n.rpartition(".")[2] in MASK_PARAMETER_NAMES]

    def weight_parameters(self) -> list[nn.Parameter]:
        """Every other parameter (AdamW, upstream)."""
        return [p for n, p in self.named_parameters() if n.rpartition(".")[2] not in MASK_PARAMETER_NAMES]

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
                fold_parametrizations(module)
        return masked.net.eval()

    @torch.inference_mode(False)  # Lightning's test loop runs in inference mode; its tensors cannot be traced
    @torch.no_grad()
    def export(self, prune_threshold: float | None = None) -> nn.Module:
        """The deployed network: hard mask folded in, channels that cannot change the output removed."""
        reference = self.hard_plain(prune_threshold)
        plain = remove_dead_channels(copy.deepcopy(reference), self.trace_input, self.output_name)
        check_export(reference, plain, self.trace_input, network_name(self.net))
        return plain


def apply_masks(net: nn.Module, example_input: Any, **kwargs: Any) -> MaskedNetwork:
    """Python API (as peft's ``get_peft_model``): ``masked = apply_masks(model, x, granularity="unit")``; train
    ``masked`` (mask logits: ``masked.mask_parameters()``), then ``masked.export()`` is the plain network."""
    return MaskedNetwork(net, example_input, **kwargs)
