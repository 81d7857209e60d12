"""MorphReuse on any network (``models.reuse_network.ReusedNetwork``): the target layers really share one tensor
(stored once, gradient = the sum over its uses), the shared weight starts as the mean of those it replaces, the
core variant routes every layer through one core, and layers whose weight their parent reads are left alone."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from models.accounting import count_dense_equivalent
from models.morphreuse import CoreAdapter, ShapeSharedLinear
from models.reuse_network import ReusedNetwork


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


def test_shape_shared_layers_hold_one_tensor_initialised_as_the_mean_with_summed_gradients():
    original = mlp()
    shared = ReusedNetwork(copy.deepcopy(original), "shape_shared", target_modules="all-linear")
    assert shared.targets == ["0", "2", "4"] and shared.uses() == {"6x8": 1, "8x8": 2}
    w = shared.shared["8x8"].weight
    assert shared.net[2].shared is shared.net[4].shared
    torch.testing.assert_close(w, (original[2].weight + original[4].weight) / 2)
    torch.testing.assert_close(shared.shared["6x8"].weight, original[0].weight)  # one use: its own weight
    assert isinstance(shared.net[6], nn.Linear)  # all-linear leaves the output layer out
    stored = sum(p.numel() for p in shared.parameters())
    assert stored == 6 * 8 + 8 + 8 * 8 + 8 + 3 + 8 * 3 + 3  # shared tensors once, a scale per target layer
    assert count_dense_equivalent(shared) == sum(p.numel() for p in original.parameters())

    x = torch.randn(5, 6)
    shared(x).square().sum().backward()
    grads = []
    for index in (2, 4):  # the gradient each use contributes, from a copy with private weights
        private = copy.deepcopy(shared)
        layer = private.net[index]
        own = nn.Linear(8, 8)
        own.load_state_dict(layer.shared.state_dict())
        object.__setattr__(layer, "shared", own)
        private.zero_grad()
        private(x).square().sum().backward()
        grads.append(own.weight.grad)
    torch.testing.assert_close(w.grad, grads[0] + grads[1])


def test_shared_core_routes_every_target_through_one_core():
    net = ReusedNetwork(mlp(), "shared_core", target_modules=["2", "4", "6"], core_dim=4, scale="vector")
    assert all(isinstance(net.net[i], CoreAdapter) and net.net[i].core is net.core for i in (2, 4, 6))
    assert net.uses() == {"core": 3} and net(torch.randn(2, 6)).shape == (2, 3)
    assert [n for n, _ in net.named_parameters() if n.startswith("core.")]  # registered once, on the wrapper
    assert sum(1 for n, _ in net.named_parameters() if ".core." in n) == 0


def test_refusals_and_what_is_never_replaced():
    with pytest.raises(ValueError, match="no two target layers of Sequential have the same shape"):
        ReusedNetwork(mlp(), "shape_shared", target_modules=["0", "2"])
    with pytest.raises(ValueError, match="selects one Linear layer"):
        ReusedNetwork(mlp(), "shared_core", target_modules=["2"])
    torchvision = pytest.importorskip("torchvision")
    vit = torchvision.models.VisionTransformer(image_size=16, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16,
                                               mlp_dim=32, num_classes=5)
    reused = ReusedNetwork(vit, "shape_shared", target_modules="all-linear")
    assert not any(isinstance(m, ShapeSharedLinear) for n, m in reused.named_modules() if n.endswith("out_proj"))
    assert reused.uses() == {"16x32": 2, "32x16": 2} and reused(torch.randn(1, 3, 16, 16)).shape == (1, 5)
