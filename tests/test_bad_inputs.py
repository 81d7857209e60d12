"""The catalogue of bad inputs: each one stops ``train.py`` with exit status 2, one sentence on stderr naming the
field (or file) and what is allowed, and no half-written run directory left behind.

Cases are run through ``train.cli`` in this process (the function ``python train.py`` runs), so the exit status
and stderr are the command line's own. Cases of data contents (empty splits, labels out of range) are tested on
the datamodule in tests/test_datamodules.py; a NaN loss in tests/test_reliability.py.
"""

from __future__ import annotations

import io
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train
from conftest import ROOT, quiet, run_cli

MOONS = ["--config", str(ROOT / "configs/moons/baseline.yaml")]
MORPHONET = ["--config", str(ROOT / "configs/moons/morphonet_intended.yaml")]
MORPHONET_PARITY = ["--config", str(ROOT / "configs/moons/morphonet.yaml")]
DIGITS_LC = ["--config", str(ROOT / "configs/digits/layercollapse.yaml")]
DIGITS_NM = ["--config", str(ROOT / "configs/digits/neumeta_head.yaml")]
FMNIST_LORA = ["--config", str(ROOT / "configs/fashion_mnist/lora.yaml")]
FMNIST_LRU = ["--config", str(ROOT / "configs/fashion_mnist/lrunet.yaml")]
FMNIST_REUSE = ["--config", str(ROOT / "configs/fashion_mnist/morphreuse.yaml")]

CASES = {  # name: (arguments after "fit", a fragment the one-line error must contain)
    # refused by the argument parser (cli_errors.OneLineParser: the innermost reason, with the full key)
    "unknown technique class": ([*MOONS, "--model.class_path=lightning_modules.Nope"], "lightning_modules' has no attribute 'Nope'"),
    "unknown datamodule class": ([*MOONS, "--data.class_path=datamodules.Nope"], "datamodules' has no attribute 'Nope'"),
    "unknown network class": ([*MOONS, "--model.init_args.net.class_path=models.Nope"], "model.init_args.net: module 'models' has no attribute 'Nope'"),
    "unknown callback class": ([*MOONS, "--trainer.callbacks+=callbacks.Nope"], "callbacks.Nope"),
    "unknown argument": ([*MOONS, "--model.init_args.learning_rate=0.1"], "model: Option 'learning_rate' is not accepted"),
    "wrong type: epochs": ([*MOONS, "--trainer.max_epochs=many"], "trainer.max_epochs: Expected a <class 'int'>"),
    "wrong type: hidden sizes": ([*MOONS, "--model.init_args.net.init_args.hidden=[a, b]"], "model.init_args.net.init_args.hidden: Input should be a valid integer"),
    "wrong type: test_after_fit": ([*MOONS, "--test_after_fit=maybe"], "test_after_fit: Expected a <class 'bool'>. Got value: maybe"),
    "wrong choice: test_ckpt": ([*MOONS, "--test_ckpt=middle"], "test_ckpt: Expected a typing.Literal['best', 'last']. Got value: middle"),
    "wrong choice: precision": ([*MOONS, "--trainer.precision=bogus"], "trainer.precision"),
    "missing config file": (["--config", "configs/moons/nope.yaml"], "nope.yaml"),
    "unknown table": ([*MOONS, "--data.init_args.dataset=titanic"], "data.init_args.dataset: Expected a typing.Literal"),
    "temperature <= 0": ([*MOONS, "--trainer.callbacks+=callbacks.TemperatureAnnealing", "--trainer.callbacks.start=0"],
                         "start: Input should be greater than 0 (got 0)"),
    "temperature schedule end beyond the run": ([*MORPHONET, "--trainer.callbacks+=callbacks.TemperatureAnnealing",
                                                 "--trainer.callbacks.until=1.5"], "until: Input should be less than or equal to 1"),
    "temperature interval": ([*MORPHONET, "--trainer.callbacks+=callbacks.TemperatureAnnealing", "--trainer.callbacks.interval=batch"], "interval"),
    "sparsity outside [0, 1)": ([*MOONS, "--trainer.callbacks+=callbacks.SparsityScheduler", "--trainer.callbacks.target=1.0"],
                                "target: Input should be less than 1 (got 1.0)"),
    "sparsity schedule shape": ([*MOONS, "--trainer.callbacks+=callbacks.SparsityScheduler", "--trainer.callbacks.schedule=step"], "schedule"),
    "pruning every 0 epochs": ([*MORPHONET, "--trainer.callbacks+=callbacks.ProgressivePruning", "--trainer.callbacks.every=0"],
                               "every: Input should be greater than 0"),
    "pruning threshold 1": ([*MORPHONET, "--trainer.callbacks+=callbacks.ProgressivePruning", "--trainer.callbacks.threshold=1"],
                            "threshold: Input should be less than 1"),
    "connectivity images every 0 epochs": ([*MORPHONET, "--trainer.callbacks+=callbacks.ConnectivityImages",
                                            "--trainer.callbacks.every_n_epochs=0"], "every_n_epochs: Input should be greater than 0"),
    "collapse every 0 epochs": ([*DIGITS_LC, "--trainer.callbacks+=callbacks.CollapseBlocks", "--trainer.callbacks.every_n_epochs=0"],
                                "every_n_epochs"),
    "MorphoNet lambda < 0": ([*MORPHONET, "--model.init_args.sparsity_weight=-0.1"], "model.init_args.sparsity_weight: Input should be greater than or equal to 0"),
    "MorphoNet mode": ([*MORPHONET, "--model.init_args.mode=both"], "model.init_args.mode: Expected a typing.Literal['parity', 'intended']"),
    "MorphoNet learning rate 0": ([*MORPHONET, "--model.init_args.weight_lr=0"], "model.init_args.weight_lr: Input should be greater than 0"),
    "MorphoNet prune threshold 1": ([*MORPHONET, "--model.init_args.final_prune_threshold=1"], "final_prune_threshold: Input should be less than 1"),
    "MorphoNet evaluation mask": ([*MORPHONET, "--model.init_args.eval_mask=dense"], "eval_mask"),
    "LayerCollapse lambda < 0": ([*DIGITS_LC, "--model.init_args.lc_weight=-1"], "model.init_args.lc_weight: Input should be greater than or equal to 0"),
    "LayerCollapse threshold": ([*DIGITS_LC, "--model.init_args.collapse_threshold=2"], "model.init_args.collapse_threshold: Input should be less than 1"),
    "LayerCollapse last k blocks 0": ([*DIGITS_LC, "--model.init_args.last_k_blocks=0"], "last_k_blocks: Input should be greater than 0"),
    "LayerCollapse slope learning rate 0": ([*DIGITS_LC, "--model.init_args.slope_lr=0"], "slope_lr: Input should be greater than 0"),
    "LoRA rank <= 0": ([*FMNIST_LORA, "--model.init_args.r=0"], "model.init_args.r: Input should be greater than 0 (got 0)"),
    "LoRA alpha <= 0": ([*FMNIST_LORA, "--model.init_args.alpha=0"], "model.init_args.alpha: Input should be greater than 0"),
    "LoRA dropout 1": ([*FMNIST_LORA, "--model.init_args.dropout=1"], "model.init_args.dropout: Input should be less than 1"),
    "LruNet reuse N < 1": ([*FMNIST_LRU, "--model.init_args.net.init_args.reuse=0"], "reuse"),
    "MorphReuse core_dim < 1": ([*FMNIST_REUSE, "--model.init_args.net.init_args.core_dim=0"], "core_dim"),
    "batch size 0": ([*MOONS, "--data.init_args.batch_size=0"], "data.init_args.batch_size: Input should be greater than 0"),
    "evaluation batch size 0": ([*MOONS, "--data.init_args.eval_batch_size=0"], "data.init_args.eval_batch_size: Input should be greater than 0"),
    "validation fraction": ([*MOONS, "--data.init_args.val_fraction=1.5"], "data.init_args.val_fraction: Input should be less than 1"),
    # refused by a technique, callback or datamodule while it is built or set up (one sentence naming the field)
    "NeuMeta widths beyond the target": ([*DIGITS_NM, "--model.init_args.train_widths=[32, 128]"],
                                         "model.train_widths must be [lo, hi] with 1 <= lo <= hi <= 64"),
    "NeuMeta deploy width beyond the target": ([*DIGITS_NM, "--model.init_args.deploy_width=65"], "model.deploy_width must be"),
    "NeuMeta pretrained file missing": ([*DIGITS_NM, "--model.init_args.pretrained=nope.ckpt"], "model.pretrained: no file"),
    "NeuMeta noise < 0": ([*DIGITS_NM, "--model.init_args.sigma=-1"], "sigma"),
    "input shape the network cannot take": ([*MOONS, "--model.init_args.net=models.ConvNet"], "ConvNet needs image inputs"),
    "unit gates on a network with its own masks": ([*MORPHONET, "--model.init_args.granularity=unit"],
                                                   "model.net MorphoMLP holds its own connection masks: drop model.init_args.granularity"),
    "MorphoNet targets that match nothing": ([*MORPHONET, "--model.init_args.net=models.MLP",
                                              "--model.init_args.target_modules=[conv]"],
                                             "MorphoNet: target_modules ['conv'] (exclude_modules None) selects no Linear / Conv2d layer of MLP"),
    "MorphoNet intended without its scheduler": ([*MORPHONET, "--trainer.callbacks=[]"],
                                                 "model.mode intended pulls the masks toward a scheduled target density: add callbacks.SparsityScheduler"),
    "pruning to a target nobody schedules": ([*MORPHONET_PARITY, "--trainer.callbacks+=callbacks.ProgressivePruning",
                                              "--trainer.callbacks.to_target=true"], "to_target: true prunes to the target of a callbacks.SparsityScheduler"),
    "a MorphoNet callback on a Baseline": ([*MOONS, "--trainer.callbacks+=callbacks.SparsityScheduler"],
                                           "callbacks.SparsityScheduler drives lightning_modules.MorphoNet (model.class_path), not Baseline"),
    "a LayerCollapse callback on a Baseline": ([*MOONS, "--trainer.callbacks+=callbacks.CollapseBlocks"],
                                               "callbacks.CollapseBlocks drives lightning_modules.LayerCollapse (model.class_path), not Baseline"),
    "LayerCollapse selects no chain": ([*DIGITS_LC, "--model.init_args.target_modules=[nothing]"], "has no collapsible chain"),
    "cosine without T_max on a step-limited run": ([*MOONS, "--model.init_args.lr_scheduler=lightning_modules.schedules.CosineAnnealingLR",
                                                    "--trainer.max_epochs=-1", "--trainer.max_steps=5"],
                                                   "CosineAnnealingLR without T_max follows trainer.max_epochs"),
    "resume without a run": ([*MOONS, "--ckpt_path=last"], "no checkpoints/last.ckpt under"),
    "missing checkpoint file": ([*MOONS, "--ckpt_path=nope.ckpt"], "--ckpt_path nope.ckpt: no such file."),
    # refused by Lightning or torch (their one sentence)
    "no such accelerator here": ([*MOONS, "--trainer.accelerator=gpu"], "No supported gpu backend found"),
    "zero devices": ([*MOONS, "--trainer.devices=0"], "is not a valid input using cpu accelerator"),
    "negative batch limit": ([*MOONS, "--trainer.limit_train_batches=-1"], "limit_train_batches"),
    "LoRA layers picked under a target regex": ([*FMNIST_LORA, "--model.init_args.layers_to_transform=[-1]"],
                                                "`layers_to_transform` cannot be used when `target_modules` is a str"),
    "negative learning rate": ([*MOONS, "--model.init_args.optimizer.init_args.lr=-1"], "Invalid learning rate: -1.0"),
}


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
    # one line, the last one, and no traceback or usage
    assert err.splitlines()[-1].startswith("train.py: error: ") and fragment in err.splitlines()[-1], err
    assert "Traceback" not in err and "usage:" not in err
    assert not list(in_tmp.glob("run/*")), "a failed run left a run directory behind"


def test_the_catalogue_is_large():
    assert len(CASES) >= 50


def test_constrained_types_are_not_postponed():
    """jsonargparse reads postponed (string) annotations with typing.get_type_hints, which drops Annotated: a module
    that uses constraints.py types must not say ``from __future__ import annotations``, or nothing is checked."""
    offenders = []
    for path in ROOT.glob("**/*.py"):
        lines = path.read_text().splitlines() if ".venv" not in path.parts else []
        if any(line.startswith("from constraints import") for line in lines) and "from __future__ import annotations" in lines:
            offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, offenders


@pytest.mark.slow  # a real run in a subprocess, up to minutes on a loaded machine (make test-reliability)
def test_ctrl_c_ends_with_status_130(in_tmp):
    """A run interrupted by SIGINT (Ctrl-C) exits with 130, as a shell reports it, not as a finished run."""
    run = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "fit", *MOONS, "--trainer.max_epochs=2000",
                            *quiet(in_tmp)], cwd=in_tmp, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 600  # a loaded machine can take minutes to import and train an epoch
        while not list(in_tmp.glob("run/version_0/checkpoints/last.ckpt")) and time.monotonic() < deadline:
            time.sleep(0.2)  # training is under way once the first checkpoint is written
        assert run.poll() is None, "the run ended before it could be interrupted"
        run.send_signal(signal.SIGINT)
        _, err = run.communicate(timeout=300)
    finally:
        run.kill()  # never leave a run behind, whatever failed
    assert run.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1] == "train.py: interrupted"


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

