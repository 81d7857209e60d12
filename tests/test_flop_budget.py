"""models.flop_budget: the FLOPs that unit gates keep, against torch.utils.flop_counter on the exported network,
and the FLOP-budget pruning and penalty of MorphoNet (``budget: flops``)."""

import functools

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lightning_modules import MorphoNet
from models import MLP, TorchvisionNet
from models.masked_network import MaskedNetwork

NETS = {
    "mlp": (lambda: MLP((1, 28, 28), 10, hidden=[64, 32]), (1, 28, 28)),
    "resnet18": (lambda: TorchvisionNet((1, 28, 28), 10, name="resnet18"), (1, 28, 28)),
    "mobilenet_v3_small": (lambda: TorchvisionNet((3, 32, 32), 10, name="mobilenet_v3_small"), (3, 32, 32)),
}


def flops(net: nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net.eval()(x)
    return counter.get_total_flops()


def gated(name: str) -> tuple[MaskedNetwork, torch.Tensor]:
    torch.manual_seed(0)
    make, shape = NETS[name]
    x = torch.zeros(1, *shape)
    return MaskedNetwork(make(), x, target_modules="all", granularity="unit"), x


@pytest.mark.parametrize("name", NETS)
def test_kept_flops_are_the_exported_networks_flops(name):
    """Close a random 40 % of every gate (never a whole gate): kept() is flop_counter(export) / flop_counter(dense)
    for the convolutions and matrix products, residual stages, depthwise convolutions and SE blocks included."""
    net, x = gated(name)
    dense = flops(net.hard_plain(), x)
    assert float(net.flop_budget.kept().detach()) == pytest.approx(1.0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for gate in net.flop_budget.gates():
            closed = torch.rand(gate.mask_logits.shape, generator=generator) < 0.4
            closed[0] = False
            gate.mask_logits[closed] = -3.0
    net.set_mask_mode("hard")
    kept = float(net.flop_budget.kept().detach())
    assert kept < 0.8
    assert kept == pytest.approx(flops(net.export(), x) / dense, rel=1e-5)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_prune_to_a_flop_density_meets_it_and_keeps_a_channel_per_gate(name):
    net, x = gated(name)
    dense = flops(net.hard_plain(), x)
    closed = net.prune_to_density_(0.4, "flops")
    assert closed > 0 and all(int((g.mask_logits > 0).sum()) >= 1 for g in net.flop_budget.gates())
    kept = float(net.kept_fraction("flops"))
    assert 0.3 < kept <= 0.4  # not far below: rounds close what the excess needs
    assert flops(net.export(), x) / dense == pytest.approx(kept, rel=1e-5)
    assert net.prune_to_density_(0.4, "flops") == 0


def test_the_flop_penalty_reaches_every_gate_weighted_by_its_flops():
    """R = lambda * gates * (D - d)^2 with a straight-through D: every open gate gets a gradient, and a gate of
    the 28x28 stem stage (64 channels) gets more than one of the 4x4 last stage, which holds more weights."""
    torch.manual_seed(0)
    module = MorphoNet(functools.partial(TorchvisionNet, name="resnet18"), (1, 28, 28), 10, mode="intended",
                       target_modules="all", granularity="unit", budget="flops", sparsity_weight=0.05)
    module.controls.target_density = 0.5
    module.regularization().backward()
    gates = module.net.flop_budget.gates()
    grads = {len(g.mask_logits): g.mask_logits.grad.abs().mean() for g in gates}
    assert all(g.mask_logits.grad is not None and (g.mask_logits.grad > 0).all() for g in gates)
    assert grads[64] > grads[512]
    assert module.net.penalty_count("flops") == sum(len(g.mask_logits) for g in gates)


def test_flop_budget_needs_unit_gates():
    with pytest.raises(ValueError, match="granularity unit"):
        MorphoNet(functools.partial(MLP, hidden=[64, 32]), (1, 28, 28), 10, mode="intended", budget="flops")
