"""The pieces that make a DDP run the one-process run, checked in one process (tests/test_ddp.py runs real DDP)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_modules.distributed import GlobalBatchLayers, dropout_rows, global_batch_cross_entropy


@pytest.mark.parametrize("p", [0.2, 0.5, 1.0])
def test_dropout_rows_are_the_rows_of_one_dropout_over_the_global_batch(p):
    x = torch.randn(37, 5, 3, requires_grad=True)
    torch.manual_seed(11)
    whole = F.dropout(x, p, training=True)
    for start, stop in ((0, 19), (19, 37)):
        torch.manual_seed(11)  # every rank's RNG is in the same state: it draws the whole mask
        assert torch.equal(dropout_rows(x[start:stop], p, 37, start), whole[start:stop])


def test_global_batch_layers_keep_classes_and_restore_forward():
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.3), nn.Linear(8, 2))
    x = torch.randn(16, 4)
    torch.manual_seed(0)
    before = net(x)
    plugin = GlobalBatchLayers()
    plugin.apply(net)
    assert isinstance(net[1], nn.BatchNorm1d) and "forward" in vars(net[1]) and "forward" in vars(net[2])
    torch.manual_seed(0)
    assert torch.equal(net(x), before)  # one process: the original layers run
    plugin.revert(net)
    assert "forward" not in vars(net[1]) and "forward" not in vars(net[2])



def test_on_nccl_batchnorm_becomes_torch_syncbatchnorm_and_comes_back(monkeypatch):
    """On NCCL the plugin hands BatchNorm to torch.nn.SyncBatchNorm (still patching Dropout), and reverts it to the
    same BatchNorm class with the same state after fit; the backend is faked: NCCL needs GPUs."""
    import lightning_modules.distributed as distributed

    monkeypatch.setattr(GlobalBatchLayers, "on_nccl", staticmethod(lambda: True))
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.3))
    net[1].running_mean.normal_()
    state, weight = {k: v.clone() for k, v in net.state_dict().items()}, net[1].weight
    plugin = GlobalBatchLayers()
    net = plugin.apply(net)
    assert type(net[1]) is nn.SyncBatchNorm and "forward" not in vars(net[1])
    assert net[2].forward.__func__ is distributed._global_batch_dropout_forward
    net = plugin.revert(net)
    assert type(net[1]) is nn.BatchNorm2d and net[1].weight is weight and "forward" not in vars(net[2])
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())

def test_the_loss_of_one_process_is_the_mean_cross_entropy():
    logits, y = torch.randn(9, 4), torch.randint(0, 4, (9,))
    assert torch.equal(global_batch_cross_entropy(logits, y), F.cross_entropy(logits, y))
