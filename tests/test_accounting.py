"""Parameter accounting of DESIGN.md on toy models whose counts are known by hand."""

import torch
from torch import nn
from torch.nn.utils import prune

from models import MLP
from models.accounting import count_dense_equivalent, count_nonzero, flops_per_sample, model_bytes


def parameter_counts(root: nn.Module) -> dict[str, int]:
    """The four counts of the DESIGN.md contract, as ``lightning_modules.summary`` reports them."""
    params = list(root.parameters())  # de-duplicated by torch
    return {"total": sum(p.numel() for p in params), "trainable": sum(p.numel() for p in params if p.requires_grad),
            "nonzero": count_nonzero(root), "dense_equivalent": count_dense_equivalent(root)}


def test_plain_mlp_counts_every_parameter_once():
    torch.manual_seed(0)  # an unseeded init draws an exact 0.0 among 669k weights about 4% of the time
    net = MLP((1, 28, 28), 10, hidden=[512, 512])
    expected = 784 * 512 + 512 + 512 * 512 + 512 + 512 * 10 + 10
    assert expected == 669_706  # the MorphReuse baseline of spec 1.8
    assert parameter_counts(net) == {k: expected for k in ("total", "trainable", "nonzero", "dense_equivalent")}


def test_shared_tensor_counts_once_in_total_and_per_use_in_dense_equivalent():
    a, b = nn.Linear(8, 8), nn.Linear(8, 8)
    b.weight = a.weight  # shared weight tensor, separate biases
    reused = nn.Linear(8, 8)
    model = nn.Sequential(a, b, reused, reused)  # one module used twice
    counts = parameter_counts(model)
    assert counts["total"] == 64 + 8 + 8 + (64 + 8)
    assert counts["trainable"] == counts["total"]
    assert counts["dense_equivalent"] == 4 * (64 + 8)
    assert counts["nonzero"] == counts["total"]


def test_frozen_tensors_count_in_total_not_in_trainable():
    model = nn.Sequential(nn.Linear(10, 4), nn.Linear(4, 2))
    model[0].requires_grad_(False)
    counts = parameter_counts(model)
    assert counts["total"] == 44 + 10
    assert counts["trainable"] == 10
    assert counts["dense_equivalent"] == 54


def test_pruned_entries_are_not_nonzero():
    layer = nn.Linear(10, 10)
    prune.l1_unstructured(layer, "weight", amount=0.3)  # weight_orig parameter + weight_mask buffer
    counts = parameter_counts(layer)
    assert counts["total"] == 110  # weight_orig still stored
    assert counts["nonzero"] == 70 + 10
    assert counts["dense_equivalent"] == 110
    # masks are buffers: they are not parameters but they cost bytes
    assert model_bytes(layer) == (110 + 100) * 4


def test_modules_with_their_own_rule_account_for_their_subtree():
    class Masked(nn.Module):
        """weight * (logits > 0); the logits are not part of the dense architecture."""

        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(4, 4))
            self.logits = nn.Parameter(torch.tensor([[1.0, -1.0, 1.0, -1.0]] * 4))

        def count_nonzero_parameters(self):
            return int(((self.weight != 0) & (self.logits > 0)).sum())

        def count_dense_equivalent_parameters(self):
            return self.weight.numel()

    model = nn.Sequential(Masked(), nn.Linear(4, 2))
    counts = parameter_counts(model)
    assert counts == {"total": 32 + 10, "trainable": 42, "nonzero": 8 + 10, "dense_equivalent": 16 + 10}


def test_zero_entries_are_not_nonzero_and_buffers_count_in_bytes():
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    with torch.no_grad():
        model[0].weight[0].zero_()
    # Linear: 12 entries, a zeroed row of 3; BatchNorm: weight ones (3), bias zeros (0)
    assert parameter_counts(model)["nonzero"] == 12 - 3 + 3
    # BN: weight, bias (params) + running_mean, running_var (float) + num_batches_tracked (int64)
    assert model_bytes(model) == (12 + 6 + 6) * 4 + 8


def test_flops_are_two_per_multiply_accumulate_per_sample():
    net = MLP((784,), 10, hidden=[512])
    x = torch.zeros(4, 784)
    assert flops_per_sample(lambda: net(x), batch_size=4) == 2 * (784 * 512 + 512 * 10)
