"""LayerCollapse through the CLI on digits: the regulariser drives slopes to 1, test reports the collapsed
model, and a checkpoint of a collapsed network rebuilds it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import ROOT, quiet, run_cli, summary
from lightning_modules import LayerCollapse
from models import CollapsibleMLP
from models.plain_export import load_exported

DIGITS = [
    "--config", str(ROOT / "configs/fashion_mnist/layercollapse.yaml"),
    "--data", "datamodules.TabularDataModule", "--data.init_args.dataset=digits", "--data.init_args.batch_size=64",
    "--model.init_args.net.init_args.hidden=[64, 128]", "--trainer.max_epochs=4",
    # spec E2's optimiser: with Adam the slope moves at most lr per step, too slow for 4 digits epochs
    "--model.init_args.optimizer=torch.optim.SGD", "--model.init_args.optimizer.init_args.lr=0.01",
    "--model.init_args.optimizer.init_args.momentum=0.9",
]


def test_strong_lambda_collapses_and_test_reports_the_collapsed_model(in_tmp):
    cli = run_cli("fit", *DIGITS, "--model.init_args.lc_weight=5.0", "--model.init_args.lc_warmup_epochs=0", *quiet(in_tmp))
    result = summary(Path(cli.trainer.log_dir))
    info = result["layercollapse"]
    assert info["collapsed_at_test"] == ["block0"] and all(abs(a - 1) < 0.05 for a in info["slopes"].values())
    assert info["params_after"] == 64 * 64 + 64 + 64 * 10 + 10 < info["params_before"]
    assert result["params"]["nonzero"] <= info["params_after"]
    assert 0.5 < result["metrics"]["test/acc"] and "test/acc_uncollapsed" in result["metrics"]
    exported = load_exported(Path(cli.trainer.log_dir) / "exported.pt")
    assert sum(p.numel() for p in exported.parameters()) == info["params_after"]


def test_without_the_regulariser_the_block_stays_nonlinear(in_tmp):
    cli = run_cli("fit", *DIGITS, "--model.init_args.lc_weight=0.0", *quiet(in_tmp))
    assert summary(Path(cli.trainer.log_dir))["layercollapse"]["collapsed_at_test"] == []


def test_slopes_get_no_weight_decay():
    module = LayerCollapse(net=lambda s, c: CollapsibleMLP(s, c, hidden=[8, 16]), input_shape=(4,), num_classes=3,
                           optimizer=lambda groups: torch.optim.AdamW(groups, weight_decay=0.1))
    optimizer = module.configure_optimizers()
    slope_group = optimizer.param_groups[1]
    assert slope_group["weight_decay"] == 0.0 and len(slope_group["params"]) == 1
    assert optimizer.param_groups[0]["weight_decay"] == 0.1


def test_collapsed_structure_is_rebuilt_from_the_checkpoint():
    torch.manual_seed(0)
    module = LayerCollapse(net=lambda s, c: CollapsibleMLP(s, c, hidden=[8, 16]), input_shape=(4,), num_classes=3)
    with torch.no_grad():
        dict(module.net.blocks())["block0"].act.weight.fill_(0.99)
    assert module.net.collapse_(0.05) == ["block0"]
    checkpoint = {"state_dict": module.state_dict(), "morphlab": {}}
    module.on_save_checkpoint(checkpoint)
    fresh = LayerCollapse(net=lambda s, c: CollapsibleMLP(s, c, hidden=[8, 16]), input_shape=(4,), num_classes=3)
    fresh.on_load_checkpoint(checkpoint)
    fresh.load_state_dict(checkpoint["state_dict"])
    x = torch.randn(5, 4)
    assert torch.equal(fresh.net.eval()(x), module.net.eval()(x))


def test_bad_lambda_is_refused():
    with pytest.raises(ValueError, match="lc_weight"):
        LayerCollapse(net=lambda s, c: CollapsibleMLP(s, c), input_shape=(4,), num_classes=3, lc_weight=-1.0)
