"""The catalogue of bad inputs: each one stops ``train.py`` with exit status 2, one sentence on stderr naming the
field (or file) and what is allowed, and no half-written run directory left behind.

Cases are run through ``train.cli`` in this process (the function ``python train.py`` runs), so the exit status
and stderr are the command line's own. Cases of data contents (empty splits, labels out of range) are tested on
the datamodule in tests/test_datamodules.py; a NaN loss in tests/test_reliability.py.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

import train
from conftest import ROOT, quiet, run_cli

MOONS = ["--config", str(ROOT / "configs/moons/baseline.yaml")]
MORPHONET = ["--config", str(ROOT / "configs/moons/morphonet_intended.yaml")]
DIGITS_LC = ["--config", str(ROOT / "configs/digits/layercollapse.yaml")]
DIGITS_NM = ["--config", str(ROOT / "configs/digits/neumeta_head.yaml")]
FMNIST_LORA = ["--config", str(ROOT / "configs/fashion_mnist/lora.yaml")]
FMNIST_LRU = ["--config", str(ROOT / "configs/fashion_mnist/lrunet.yaml")]
FMNIST_REUSE = ["--config", str(ROOT / "configs/fashion_mnist/morphreuse.yaml")]

CASES = {  # name: (arguments after "fit", a fragment the one-line error must contain)
    "unknown technique class": ([*MOONS, "--model.class_path=lightning_modules.Nope"], "lightning_modules.Nope"),
    "unknown datamodule class": ([*MOONS, "--data.class_path=datamodules.Nope"], "datamodules.Nope"),
    "unknown network class": ([*MOONS, "--model.init_args.net.class_path=models.Nope"], "models.Nope"),
    "unknown argument": ([*MOONS, "--model.init_args.learning_rate=0.1"], "learning_rate"),
    "wrong type: epochs": ([*MOONS, "--trainer.max_epochs=many"], "max_epochs"),
    "wrong type: hidden sizes": ([*MOONS, "--model.init_args.net.init_args.hidden=[a, b]"], "hidden"),
    "wrong choice: test_ckpt": ([*MOONS, "--test_ckpt=middle"], "test_ckpt"),
    "missing config file": (["--config", "configs/moons/nope.yaml"], "nope.yaml"),
    "temperature <= 0": ([*MOONS, "--trainer.callbacks+=callbacks.TemperatureAnnealing", "--trainer.callbacks.start=0"],
                         "TemperatureAnnealing.start and .end must be > 0"),
    "sparsity outside [0, 1)": ([*MOONS, "--trainer.callbacks+=callbacks.SparsityScheduler", "--trainer.callbacks.target=1.0"],
                                "SparsityScheduler.target (a sparsity) must be in [0, 1)"),
    "MorphoNet lambda < 0": ([*MORPHONET, "--model.init_args.sparsity_weight=-0.1"], "model.sparsity_weight (lambda) must be >= 0"),
    "MorphoNet mode": ([*MORPHONET, "--model.init_args.mode=both"], "mode"),
    "LayerCollapse lambda < 0": ([*DIGITS_LC, "--model.init_args.lc_weight=-1"], "model.lc_weight (lambda) must be >= 0"),
    "LayerCollapse threshold": ([*DIGITS_LC, "--model.init_args.collapse_threshold=2"], "model.collapse_threshold must be in (0, 1)"),
    "LoRA rank <= 0": ([*FMNIST_LORA, "--model.init_args.r=0"], "model.r (LoRA rank) must be >= 1"),
    "LoRA alpha <= 0": ([*FMNIST_LORA, "--model.init_args.alpha=0"], "model.alpha must be > 0"),
    "LruNet reuse N < 1": ([*FMNIST_LRU, "--model.init_args.net.init_args.reuse=0"], "model.net.reuse (LruNet) must be an integer >= 1"),
    "MorphReuse core_dim < 1": ([*FMNIST_REUSE, "--model.init_args.net.init_args.core_dim=0"], "core_dim"),
    "NeuMeta widths beyond the target": ([*DIGITS_NM, "--model.init_args.train_widths=[32, 128]"],
                                         "model.train_widths must be [lo, hi] with 1 <= lo <= hi <= 64"),
    "NeuMeta deploy width beyond the target": ([*DIGITS_NM, "--model.init_args.deploy_width=65"], "model.deploy_width must be"),
    "NeuMeta pretrained file missing": ([*DIGITS_NM, "--model.init_args.pretrained=nope.ckpt"], "model.pretrained: no file"),
    "input shape the network cannot take": ([*MOONS, "--model.init_args.net=models.ConvNet"], "ConvNet needs image inputs"),
    "batch size 0": ([*MOONS, "--data.init_args.batch_size=0"], "data.batch_size and data.eval_batch_size must be >= 1"),
    "unknown table": ([*MOONS, "--data.init_args.dataset=titanic"], "titanic"),
    "validation fraction": ([*MOONS, "--data.init_args.val_fraction=1.5"], "data.val_fraction must be in (0, 1)"),
    "resume without a run": ([*MOONS, "--ckpt_path=last"], "no checkpoints/last.ckpt under"),
    "missing checkpoint file": ([*MOONS, "--ckpt_path=nope.ckpt"], "--ckpt_path nope.ckpt: no such file."),
}


# Rejected by the argument parser (jsonargparse), whose message names the key ("Parser key "model": ...") over a
# few lines with the types it accepts; every other case is refused by morphlab's own checks in one line.
PARSER_CASES = {"unknown technique class", "unknown datamodule class", "unknown network class", "unknown argument",
                "wrong type: epochs", "wrong type: hidden sizes", "wrong choice: test_ckpt", "missing config file",
                "MorphoNet mode", "unknown table"}


def run_expecting_error(capsys, *args: str) -> str:
    """stderr of ``python train.py ARGS``, which must exit with status 2."""
    with pytest.raises(SystemExit) as exit_info:
        train.cli(list(args))
    assert exit_info.value.code == 2
    return capsys.readouterr().err.strip()


@pytest.mark.parametrize("name", CASES)
def test_bad_input_stops_with_one_sentence(name, in_tmp, capsys):
    args, fragment = CASES[name]
    err = run_expecting_error(capsys, "fit", *args, *quiet(in_tmp))
    if name in PARSER_CASES:
        assert "error: " in err and fragment in err, err
    else:  # one line, the last one, and no traceback
        assert err.splitlines()[-1].startswith("train.py: error: ") and fragment in err.splitlines()[-1], err
        assert "Traceback" not in err
    assert not list(in_tmp.glob("run/*")), "a failed run left a run directory behind"


@pytest.fixture(scope="module")
def baseline_checkpoint(tmp_path_factory) -> Path:
    save_dir = tmp_path_factory.mktemp("ckpt")
    cli = run_cli("fit", *MOONS, "--trainer.max_epochs=1", "--test_after_fit=false", *quiet(save_dir))
    return Path(cli.trainer.checkpoint_callback.last_model_path)


class Payload:  # not a tensor or plain container: weights_only loading refuses to build it
    pass


def bad_checkpoint(kind: str, source: Path, target: Path) -> Path:
    data = source.read_bytes()
    if kind == "truncated":
        target.write_bytes(data[: len(data) // 2])
    elif kind == "corrupt":
        target.write_bytes(bytes(range(256)) * 64)
    elif kind == "carries code":
        state = torch.load(source, weights_only=True)
        state["payload"] = Payload()
        buffer = io.BytesIO()
        torch.save(state, buffer)
        target.write_bytes(buffer.getvalue())
    return target


@pytest.mark.parametrize(
    "kind, fragment",
    [("truncated", "is not a readable checkpoint (truncated or corrupt"),
     ("corrupt", "is not a readable checkpoint (truncated or corrupt"),
     ("carries code", "holds objects other than tensors and plain containers")],
)
def test_a_bad_checkpoint_file_is_refused(kind, fragment, baseline_checkpoint, in_tmp, capsys):
    path = bad_checkpoint(kind, baseline_checkpoint, in_tmp / f"{kind.replace(' ', '_')}.ckpt")
    line = run_expecting_error(capsys, "test", *MOONS, f"--ckpt_path={path}", *quiet(in_tmp)).splitlines()[-1]
    assert line.startswith("train.py: error: ") and fragment in line and str(path) in line, line
    assert not list(in_tmp.glob("run/*"))


def test_a_checkpoint_of_another_technique_is_refused(baseline_checkpoint, in_tmp, capsys):
    morphonet = ["--config", str(ROOT / "configs/moons/morphonet.yaml")]
    line = run_expecting_error(capsys, "test", *morphonet, f"--ckpt_path={baseline_checkpoint}", *quiet(in_tmp)).splitlines()[-1]
    assert "holds a lightning_modules.Baseline but the config's model is lightning_modules.MorphoNet" in line, line
    assert "pass the config it was trained with" in line
    assert not list(in_tmp.glob("run/*"))

