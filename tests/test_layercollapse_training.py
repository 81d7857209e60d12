"""LayerCollapse through the CLI on digits: the regulariser drives slopes to 1, test reports the collapsed
model, a checkpoint of a collapsed network rebuilds it, the collapse callbacks (at the end, progressive top-down)
change the network in training and a run interrupted between two collapses resumes exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from parsing import parser_refuses
from conftest import ROOT, quiet, resolved_config, run_cli, summary
from lightning_modules import LayerCollapse
from models import CollapsibleMLP
from models.deploy import load_exported

DIGITS = [
    "--config", str(ROOT / "configs/fashion_mnist/layercollapse.yaml"),
    "--data", "datamodules.TabularDataModule", "--data.init_args.dataset=digits", "--data.init_args.batch_size=64",
    "--model.init_args.net.init_args.hidden=[64, 128]", "--trainer.max_epochs=4",
    # spec E2's optimiser: with Adam the slope moves at most lr per step, too slow for 4 digits epochs
    "--model.init_args.optimizer=torch.optim.SGD", "--model.init_args.optimizer.init_args.lr=0.01",
    "--model.init_args.optimizer.init_args.momentum=0.9",
]


def test_strong_lambda_collapses_and_test_reports_the_collapsed_model(in_tmp):
    cli = run_cli("fit", *DIGITS, "--model.init_args.lc_weight=5.0", "--model.init_args.lc_warmup_epochs=0", *quiet(in_tmp),
                  "--deploy.program=true")
    result = summary(Path(cli.trainer.log_dir))
    info = result["layercollapse"]
    assert info["collapsed_at_test"] == ["layers.block0"] and all(abs(a - 1) < 0.05 for a in info["slopes"].values())
    assert info["params_after"] == 64 * 64 + 64 + 64 * 10 + 10 < info["params_before"]
    assert result["params"]["nonzero"] <= info["params_after"]
    assert 0.5 < result["metrics"]["test/acc"] and "test/acc_uncollapsed" in result["metrics"]
    exported = load_exported(Path(cli.trainer.log_dir) / "exported.json")
    assert sum(p.numel() for p in exported.parameters()) == info["params_after"]
    uncollapsed = load_exported(Path(cli.trainer.log_dir) / "uncollapsed.json")
    assert sum(p.numel() for p in uncollapsed.parameters()) > info["params_after"]


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
        module.net.layers.block0.act.weight.fill_(0.99)
    assert module.collapse_in_place() == ["layers.block0"]
    checkpoint = {"state_dict": module.state_dict(), "morphlab": {}}
    module.on_save_checkpoint(checkpoint)
    fresh = LayerCollapse(net=lambda s, c: CollapsibleMLP(s, c, hidden=[8, 16]), input_shape=(4,), num_classes=3)
    fresh.on_load_checkpoint(checkpoint)
    fresh.load_state_dict(checkpoint["state_dict"])
    x = torch.randn(5, 4)
    assert torch.equal(fresh.net.eval()(x), module.net.eval()(x))


def test_bad_lambda_is_refused():
    assert parser_refuses(LayerCollapse, lc_weight=-1.0) and not parser_refuses(LayerCollapse, lc_weight=1.0)


def progressive(tmp: Path, stop_after: int | None = None) -> list[str]:
    """configs/fashion_mnist/layercollapse_progressive.yaml on digits, small: 2 epochs per block, 5 epochs."""
    config = resolved_config(ROOT / "configs/fashion_mnist/layercollapse_progressive.yaml")
    config["trainer"]["callbacks"][0]["init_args"]["epochs_per_block"] = 2
    if stop_after:
        config["trainer"]["callbacks"].append({"class_path": "conftest.StopAfter", "init_args": {"epochs": stop_after}})
    path = tmp / f"progressive{stop_after or ''}.yaml"
    path.write_text(yaml.safe_dump(config))
    return ["--config", str(path), *PROGRESSIVE]


PROGRESSIVE = [
    "--data", "datamodules.TabularDataModule", "--data.init_args.dataset=digits", "--data.init_args.batch_size=64",
    "--model.init_args.net.init_args.hidden=[32, 64, 64]", "--model.init_args.net.init_args.dropout=0.1",
    "--model.init_args.lc_weight=10.0", "--model.init_args.optimizer=torch.optim.SGD",
    "--model.init_args.optimizer.init_args.lr=0.02", "--model.init_args.optimizer.init_args.momentum=0.5",
    "--model.init_args.lr_scheduler=null", "--trainer.max_epochs=5",
]


def last_checkpoint(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def test_progressive_collapse_goes_top_down_and_resumes_exactly(in_tmp):
    straight = run_cli("fit", *progressive(in_tmp), "--test_after_fit=false", *quiet(in_tmp / "a"))
    module = straight.model
    # block1 was regularised alone in epochs 0-1 and collapsed, then block0 in epochs 2-3; epoch 4 fine-tunes
    assert module.collapsed_blocks == ["layers.block1", "layers.block0"]
    assert isinstance(module.net.layers.block0, torch.nn.Linear) and not any(isinstance(m, torch.nn.PReLU) for m in module.net.modules())
    assert module.controls.active_blocks == [] and module.regularization() is None
    # the optimizer trains the merged Linears and nothing else
    params = {id(p) for g in straight.trainer.optimizers[0].param_groups for p in g["params"]}
    assert params == {id(p) for p in module.net.parameters()}

    # interrupted after 4 epochs (between the second collapse and the fine-tuning epoch), resumed: same weights
    run_cli("fit", *progressive(in_tmp, stop_after=4), "--test_after_fit=false", *quiet(in_tmp / "b"))
    resumed = run_cli("fit", *progressive(in_tmp), "--ckpt_path=last", "--test_after_fit=false", *quiet(in_tmp / "b"))
    a, b = last_checkpoint(Path(straight.trainer.log_dir)), last_checkpoint(Path(resumed.trainer.log_dir))
    assert a["morphlab"]["collapsed_blocks"] == b["morphlab"]["collapsed_blocks"] == ["layers.block1", "layers.block0"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])

    # test from the collapsed checkpoint rebuilds the collapsed architecture
    tested = run_cli("test", *progressive(in_tmp), f"--ckpt_path={Path(straight.trainer.log_dir) / 'checkpoints/last.ckpt'}", *quiet(in_tmp, "t"))
    assert tested.model.collapsed_blocks == ["layers.block1", "layers.block0"]
    x, _ = tested.datamodule.splits["test"]
    x = tested.datamodule.batch_transform(x, train=False)
    with torch.no_grad():
        assert torch.equal(tested.model.net.eval()(x), module.net.eval()(x))


def test_regulariser_sees_only_the_active_block():
    module = LayerCollapse(net=lambda s, c: CollapsibleMLP(s, c, hidden=[8, 16, 16], collapsible_last=2), input_shape=(4,), num_classes=3,
                           lc_weight=1.0)
    assert module.selected_block_names() == ["layers.block0", "layers.block1"]
    module.controls.active_blocks = ["layers.block1"]
    assert list(module.regularized_slopes()) == ["layers.block1"]
    assert module.regularization().item() == pytest.approx((0.01 - 1) ** 2)
    last = LayerCollapse(net=lambda s, c: CollapsibleMLP(s, c, hidden=[8, 16, 16], collapsible_last=2), input_shape=(4,),
                         num_classes=3, last_k_blocks=1)
    last.collapse_in_place(["layers.block1"])  # "last k" stays the same blocks after a collapse
    module = last
    assert module.selected_block_names() == ["layers.block1"] and module.slopes() == {}


def test_collapse_blocks_callback_collapses_in_training(in_tmp):
    cli = run_cli("fit", *DIGITS, "--model.init_args.lc_weight=5.0", "--model.init_args.lc_warmup_epochs=0",
                  "--trainer.callbacks+=callbacks.CollapseBlocks", *quiet(in_tmp))
    assert cli.model.collapsed_blocks == ["layers.block0"]
    checkpoint = last_checkpoint(Path(cli.trainer.log_dir))
    assert checkpoint["morphlab"]["collapsed_blocks"] == ["layers.block0"]
    assert "net.layers.block0.weight" in checkpoint["state_dict"]
    info = summary(Path(cli.trainer.log_dir))["layercollapse"]
    assert info["collapsed_in_training"] == ["layers.block0"] and info["params_after"] < info["params_original"]


def test_vgg_conv_prelus_are_regularised_but_not_collapsed():
    from models import CollapsibleVGG

    module = LayerCollapse(net=lambda s, c: CollapsibleVGG(s, c, hidden=16), input_shape=(3, 32, 32), num_classes=10,
                           regularize_prelus=[r"^features\."])
    assert len(module.extra_prelus) == 8 and module.selected_block_names() == ["classifier"]
    assert len(module.regularized_slopes()) == 9
    assert module.regularization().item() == pytest.approx(0.5 * (8 * 1.0 + (0.01 - 1) ** 2))
    with pytest.raises(ValueError, match="regularize_prelus"):
        LayerCollapse(net=lambda s, c: CollapsibleVGG(s, c, hidden=16), input_shape=(3, 32, 32), num_classes=10, regularize_prelus=["nope"])
