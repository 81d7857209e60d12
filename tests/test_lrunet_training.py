"""LruNet through the CLI: the importer turns a checkpoint in the published format into one that
``train.py test --config configs/fashion_mnist/lrunet_n1.yaml`` evaluates exactly as the plain network does;
a short LayerReuse fit records the reuse accounting; NHWC and NCHW layouts compute the same function."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, quiet, run_cli, summary
from models.lrunet import LruNet

sys.path.insert(0, str(ROOT / "tools"))
import import_lrunet  # noqa: E402

HAS_FASHION = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz").exists() or (ROOT / "data/FashionMNIST/raw").is_dir()


def published_style_checkpoint(path: Path, reuse: int) -> LruNet:
    """A random LruNet saved the way the authors' files are: legacy pickle, 'module.' keys, no counters."""
    torch.manual_seed(reuse)
    net = LruNet((1, 28, 28), 10, reuse=reuse, channels_last=False).eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1), m.running_var.uniform_(0.5, 1.5), m.weight.normal_(1, 0.1), m.bias.normal_(0, 0.1)
    state = {f"module.{k}": v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save({"net": state, "acc": 91.17, "epoch": 74}, path, _use_new_zipfile_serialization=False)
    return net


def test_import_infers_the_architecture_and_says_it_unpickles(tmp_path, capsys):
    published_style_checkpoint(tmp_path / "n10.t7", reuse=10)
    out = import_lrunet.main([str(tmp_path / "n10.t7"), str(tmp_path / "n10.ckpt")])
    err = capsys.readouterr().err
    assert "unpickling the legacy checkpoint" in err and "weights_only=False" in err
    checkpoint = torch.load(out, map_location="cpu", weights_only=True)  # the output loads safely
    imported = checkpoint["morphlab"]["imported"]
    assert imported["config"] == {"reuse": 10, "width": 1, "num_classes": 10, "in_channels": 1}
    assert imported["published_acc"] == 91.17 and imported["published_epoch"] == 74
    assert "net.stage1.dw_bn_list.9.running_var" in checkpoint["state_dict"]
    with pytest.raises(ValueError, match="not an LruNet"):
        torch.save({"net": {"module.fc.weight": torch.zeros(2, 2)}}, tmp_path / "bad.t7")
        import_lrunet.main([str(tmp_path / "bad.t7"), str(tmp_path / "bad.ckpt")])
    assert not (tmp_path / "bad.ckpt").exists()


@pytest.mark.skipif(not HAS_FASHION, reason="needs FashionMNIST (apt-get install dataset-fashion-mnist)")
def test_imported_checkpoint_tests_with_the_parity_config_as_the_plain_network(in_tmp, capsys):
    net = published_style_checkpoint(in_tmp / "n1.t7", reuse=1)
    ckpt = import_lrunet.main([str(in_tmp / "n1.t7"), str(in_tmp / "n1.ckpt")])
    assert f"--config configs/fashion_mnist/lrunet_n1.yaml --ckpt_path {ckpt}" in capsys.readouterr().out
    cli = run_cli("test", "--config", str(ROOT / "configs/fashion_mnist/lrunet_n1.yaml"), f"--ckpt_path={ckpt}",
                  f"--data.init_args.root={ROOT / 'data'}", "--trainer.limit_test_batches=2", *quiet(in_tmp))
    x, y = cli.datamodule.splits["test"]
    x, y = x[:2000].float() / 255, y[:2000]  # parity pipeline: [0, 1] pixels, no normalisation
    with torch.no_grad():
        expected = (net(x).argmax(1) == y).float().mean().item()
    assert cli.trainer.callback_metrics["test/acc"].item() == pytest.approx(expected, abs=1e-6)
    assert cli.model.net.reuse == 1 and cli.model.net.mode == "parity"


def test_layer_reuse_fit_reports_reuse_accounting(in_tmp):
    cli = run_cli("fit", "--config", str(ROOT / "configs/cifar10/lrunet_n1.yaml"),
                  "--data.init_args.synthetic=true", "--data.init_args.synthetic_size=64", "--data.init_args.batch_size=32",
                  "--model.init_args.net.init_args.reuse=3", "--trainer.max_epochs=1", *quiet(in_tmp))
    result = summary(Path(cli.trainer.log_dir))
    assert result["technique"] == "lrunet" and result["lrunet"]["reuse"] == 3
    assert result["lrunet"]["conv_parameters"] == cli.model.net.conv_parameters()
    params = result["params"]
    net = cli.model.net
    shared = sum(b.dw.weight.numel() + b.pw.weight.numel() for b in (net.stage1, net.stage2, net.stage3, net.stage4))
    assert params["total"] == sum(p.numel() for p in net.parameters())
    assert params["dense_equivalent"] == params["total"] + 2 * shared  # the unrolled net: 3 private copies


def test_channels_last_layout_computes_the_same_function():
    torch.manual_seed(0)
    nchw = LruNet((3, 32, 32), 10, reuse=2, channels_last=False).eval()
    nhwc = LruNet((3, 32, 32), 10, reuse=2, channels_last=True).eval()
    nhwc.load_state_dict(nchw.state_dict())
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(nhwc(x), nchw(x), rtol=1e-5, atol=1e-5)
    assert nhwc.stage1.dw.weight.is_contiguous(memory_format=torch.channels_last)
