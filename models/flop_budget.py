"""The FLOPs a network with unit gates keeps, as a differentiable function of the gates.

A Linear / Conv2d layer L costs ``F_L = weight.numel() x positions`` multiply-adds per sample (positions: the
output's spatial size, or its tokens), measured once on the example input. Unit gates remove L's output rows
(its own channels) and L's input columns (the channels a gated layer before it produced), so the exported network
keeps

    F(g) = sum_L F_L * out_L(g) * in_L(g),    out_L = 1 - (|rows| - sum_rows g) / out_size,  in_L likewise,

where g are the gate values (a depthwise convolution's input is its output: ``F_L * out_L``). ``kept(gates)``
is F(g) / F(1), with the straight-through gates of ``models.masks`` (value 1[m > 0], gradient of sigmoid(m / T))
in training. Unlike a weight count, this weighs a channel of a 28x28 feature map 49 times a channel of a 4x4 one,
and it counts the consumer's columns that a closed channel removes too.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from models.masks import PRUNED_LOGIT, UnitGate


@dataclass
class Gating:
    """Entries ``idxs`` of one side (rows or input columns) of a layer, gated by ``gate`` at ``roots``."""

    gate: UnitGate
    idxs: list[int]
    roots: Tensor


@dataclass
class LayerCost:
    module: nn.Module
    flops: int
    out_size: int
    in_size: int
    depthwise: bool
    outputs: list[Gating] = field(default_factory=list)
    inputs: list[Gating] = field(default_factory=list)


def _positions(net: nn.Module, example_input: Any, layers: tuple[type, ...]) -> dict[int, int]:
    """Output positions per sample of every ``layers`` module that the forward pass on ``example_input`` runs."""
    seen: dict[int, int] = {}

    def record(module: nn.Module, args: Any, out: Tensor) -> None:
        channels = out.shape[1] if isinstance(module, nn.Conv2d) else out.shape[-1]
        seen[id(module)] = out.numel() // (out.shape[0] * channels)

    hooks = [m.register_forward_hook(record) for m in net.modules() if isinstance(m, layers)]
    was_training = net.training
    try:
        with torch.no_grad():
            net.eval()(example_input)
    finally:
        net.train(was_training)
        for hook in hooks:
            hook.remove()
    return seen


class FlopBudget:
    """``F(g) / F(1)`` over the Linear / Conv2d layers of ``net`` (see the module docstring)."""

    def __init__(self, net: nn.Module, example_input: Any) -> None:
        positions = _positions(net, example_input, (nn.Linear, nn.Conv2d))
        self.layers: dict[int, LayerCost] = {}
        for module in net.modules():
            if id(module) in positions:
                conv = isinstance(module, nn.Conv2d)
                out_size = module.out_channels if conv else module.out_features
                in_size = module.in_channels if conv else module.in_features
                depthwise = conv and module.groups > 1 and module.groups == in_size == out_size
                self.layers[id(module)] = LayerCost(module, module.weight.numel() * positions[id(module)],
                                                    out_size, in_size, depthwise)
        self.dense = sum(layer.flops for layer in self.layers.values())

    def gate_outputs(self, module: nn.Module, gate: UnitGate, rows: list[int], roots: list[int]) -> None:
        if id(module) in self.layers:
            self.layers[id(module)].outputs.append(Gating(gate, rows, torch.tensor(roots, dtype=torch.long)))

    def gate_inputs(self, module: nn.Module, gate: UnitGate, idxs: list[int], roots: list[int]) -> None:
        layer = self.layers.get(id(module))
        if layer is not None and not layer.depthwise:  # a depthwise layer's input channels are its outputs
            layer.inputs.append(Gating(gate, idxs, torch.tensor(roots, dtype=torch.long)))

    @staticmethod
    def _side(size: int, gatings: list[Gating], value: Callable[[UnitGate], Tensor]) -> Tensor | float:
        if not gatings:
            return 1.0
        closed = sum(len(g.idxs) - value(g.gate)[g.roots].sum() for g in gatings)
        return 1.0 - closed / size

    def kept(self, value: Callable[[UnitGate], Tensor] | None = None) -> Tensor:
        """F(g) / F(1) with gate values ``value(gate)`` (default: straight-through in soft mode, else hard)."""
        value = value or (lambda gate: gate.mask())
        total = sum(layer.flops * self._side(layer.out_size, layer.outputs, value)
                    * self._side(layer.in_size, layer.inputs, value) for layer in self.layers.values())
        return torch.as_tensor(total / self.dense, dtype=torch.float32)

    def gates(self) -> list[UnitGate]:
        unique = {id(g.gate): g.gate for layer in self.layers.values() for g in [*layer.outputs, *layer.inputs]}
        return list(unique.values())

    @torch.no_grad()
    def prune_to_(self, density: float) -> int:
        """Close the open gate entries with the lowest logits until ``kept() <= density``; returns how many.

        Each round ranks the open entries (each gate keeps its strongest one: a layer keeps a channel) and closes
        the weakest whose FLOP shares, d kept / d g at the current gates, cover the excess; closing both sides of
        one layer saves less than the sum of shares, so rounds repeat until the budget holds.
        """
        gates, closed = self.gates(), 0
        for _ in range(100):
            values = {id(g): g.hard_mask().clone().requires_grad_(True) for g in gates}
            with torch.enable_grad():
                kept = self.kept(lambda gate: values[id(gate)])
                if float(kept.detach()) <= density:
                    break
                kept.backward()
            logits, shares, owners = [], [], []
            for gate in gates:
                on = torch.nonzero(gate.mask_logits > 0).flatten()
                if len(on) > 1:
                    on = on[on != on[torch.argmax(gate.mask_logits[on])]]
                    logits.append(gate.mask_logits[on])
                    shares.append(values[id(gate)].grad[on])
                    owners += [(gate, int(i)) for i in on]
            if not owners:
                break
            order = torch.argsort(torch.cat(logits), stable=True)  # weakest first
            covered = torch.cumsum(torch.cat(shares)[order], 0)
            count = min(int(torch.searchsorted(covered, torch.tensor(float(kept.detach()) - density))) + 1, len(order))
            for k in order[:count].tolist():
                gate, i = owners[k]
                gate.mask_logits[i] = PRUNED_LOGIT
            closed += count
        return closed
