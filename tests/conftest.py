"""Shared test helpers: run the real CLI in-process on tiny data, find a run's files."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from unittest import mock

import pytest
import yaml
from lightning.pytorch import Callback

import train
from callbacks.deploy import DeployExport

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str) -> train.MorphLabCLI:
    """Run ``python train.py ARGS`` in this process (one interpreter start for the whole test session)."""
    with mock.patch("sys.argv", ["train.py"]):  # pytest's own argv must not reach the parser
        return train.main(list(args))


@pytest.fixture(autouse=True)
def no_deployable_by_default(monkeypatch):
    """Runs in this process skip the deployable (``callbacks.DeployExport``: a torch.export trace and an ONNX export,
    seconds per run); the tests of the deployable turn it on with ``--deploy.program=true --deploy.onnx=true``."""
    monkeypatch.setattr(DeployExport.__init__, "__defaults__", (False, False, 64))


def quiet(save_dir: Path, name: str = "run") -> list[str]:
    """CLI overrides that keep a test run small, silent and inside ``save_dir``."""
    return [
        f"--trainer.logger.init_args.save_dir={save_dir}",
        f"--trainer.logger.init_args.name={name}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
    ]


class StopAfter(Callback):
    """Stop training after ``epochs`` epochs, like a crash right after a checkpoint (max_epochs unchanged)."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True


def resolved_config(config: str | Path, *args: str) -> dict:
    """The experiment as LightningCLI resolves it (``fit --config CONFIG ARGS --print_config``), every key spelled
    out: a test that edits a config edits this, since experiments compose from other files."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), pytest.raises(SystemExit):
        run_cli("fit", "--config", str(config), *args, "--print_config")
    resolved = yaml.safe_load(printed.getvalue())
    resolved.pop("config", None)
    return resolved


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run inside an empty directory so relative paths (data/, runs/) land in tmp."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


# --- the experiments, and small runs of every technique (shared by the fast and the slow per-technique tests) -----
NOT_EXPERIMENTS = ("suites", "presets", "recipes", "data")  # suites and the fragments experiments compose from
EXPERIMENTS = sorted(
    p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").glob("*/*.yaml") if p.parent.name not in NOT_EXPERIMENTS
)
"""Every experiment config, ``configs/<dir>/<name>.yaml`` (tests/test_experiments.py runs each)."""


DIGITS = ["--data", "datamodules.TabularDataModule", "--data.init_args.dataset=digits", "--data.init_args.batch_size=64"]
VARIANTS = {"morphonet_unit": "morphonet"}  # TECHNIQUES entries that run a technique in a second mode
TECHNIQUES = {  # small multi-epoch runs of every technique (crash/resume and DDP tests, slow)
    "baseline": ["--config", "configs/moons/baseline.yaml", "--model.init_args.net.init_args.dropout=0.2",
                 "--trainer.max_epochs=4"],
    "morphreuse": ["--config", "configs/fashion_mnist/morphreuse.yaml", *DIGITS, "--trainer.max_epochs=4",
                   "--model.init_args.net.init_args.widths=[64]", "--model.init_args.net.init_args.core_dim=32"],
    "lora": ["--config", "configs/fashion_mnist/lora.yaml", *DIGITS, "--trainer.max_epochs=4",
             "--model.init_args.net.init_args.hidden=[64, 64]"],
    # moons, 6 epochs: warm-up 1, temperature and sparsity ramps, pruning after epochs 2, 4 and 6
    "morphonet": ["--config", "configs/moons/morphonet_intended.yaml", "--trainer.max_epochs=6", "--trainer.callbacks=["
                  "{class_path: callbacks.TemperatureAnnealing, init_args: {start: 2.0, end: 0.5, interval: step, "
                  "warmup_epochs: 1, until: 0.75}}, {class_path: callbacks.SparsityScheduler, init_args: {target: 0.7, "
                  "schedule: cosine, warmup_epochs: 1, until: 0.75}}, {class_path: callbacks.ProgressivePruning, "
                  "init_args: {start: 0.3, every: 2, threshold: 0.45, to_target: true}}, "
                  "{class_path: callbacks.ConnectivityImages, init_args: {every_n_epochs: 2}}]"],
    # unit gates on a plain MLP (models.masked_network): the intended schedule of the morphonet entry, gates open
    "morphonet_unit": ["--config", "configs/fashion_mnist/mlp_morphonet_unit.yaml", *DIGITS, "--trainer.max_epochs=6",
                       "--trainer.log_every_n_steps=1",
                       "--model.init_args.net.init_args.hidden=[64, 64]", "--trainer.callbacks=["
                       "{class_path: callbacks.TemperatureAnnealing, init_args: {start: 2.0, end: 0.5, interval: step, "
                       "warmup_epochs: 1, until: 0.75}}, {class_path: callbacks.SparsityScheduler, init_args: {target: 0.5, "
                       "schedule: cosine, warmup_epochs: 1, until: 0.75}}, {class_path: callbacks.ProgressivePruning, "
                       "init_args: {start: 0.3, every: 2, threshold: 0.45, to_target: true}}]"],
    # pruned at the start of epoch 1: the checkpoints after it hold the pruned structure, replayed on resume
    "structured_pruning": ["--config", "configs/fashion_mnist/mlp_structured_pruning.yaml", *DIGITS,
                           "--trainer.max_epochs=4", "--model.init_args.prune_epoch=1",
                           "--model.init_args.net.init_args.hidden=[64, 64]"],
    "layercollapse": ["--config", "configs/fashion_mnist/layercollapse_progressive.yaml", *DIGITS, "--trainer.max_epochs=4",
                      "--model.init_args.net.init_args.hidden=[32, 64, 64]", "--model.init_args.lc_weight=10.0",
                      "--model.init_args.optimizer=torch.optim.SGD", "--model.init_args.optimizer.init_args.lr=0.02",
                      "--model.init_args.lr_scheduler=null"],
    "lrunet": ["--config", "configs/cifar10/lrunet.yaml", "--data.init_args.synthetic=true",
               "--data.init_args.synthetic_size=128", "--data.init_args.batch_size=16", "--data.init_args.eval_batch_size=64",
               "--model.init_args.net.init_args.reuse=3", "--trainer.max_epochs=4"],
    "neumeta": ["--config", "configs/digits/neumeta_head.yaml", "--trainer.max_steps=-1", "--trainer.max_epochs=4",
                "--trainer.check_val_every_n_epoch=1",
                "--model.init_args.pretrain_epochs=2", "--model.init_args.warm_start_steps=20",
                "--model.init_args.warmup_steps=5", "--model.init_args.inr_hidden=32", "--model.init_args.inr_freqs=4",
                "--model.init_args.val_samples=2", "--model.init_args.test_samples=2",
                "--model.init_args.test_widths=[32, 64]"],
}
"""Technique -> the arguments after ``fit`` of its small run (config paths relative to ROOT). Every technique an
experiment uses has one (tests/test_experiments.py checks)."""


def technique_args(technique: str) -> list[str]:
    """``TECHNIQUES[technique]`` with its config paths made absolute."""
    return [a.replace("configs/", str(ROOT / "configs") + "/", 1) if a.startswith("configs/") else a
            for a in TECHNIQUES[technique]]


# Two training steps of any experiment. Limits are 2, not 1: through LightningCLI an integer 1 for
# limit_{train,val,test}_batches arrives as the float 1.0, which Lightning reads as 100 % of the batches.
SMOKE = [
    "--trainer.max_epochs=1", "--trainer.max_steps=-1", "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=2", "--trainer.limit_test_batches=2", "--trainer.num_sanity_val_steps=0",
    "--trainer.check_val_every_n_epoch=1", "--data.init_args.batch_size=8", "--data.init_args.eval_batch_size=16",
    f"--data.init_args.root={ROOT / 'data'}",  # FashionMNIST, mnist5k, rt-snippets: prepared once, kept there
]
SMOKE_DATA = {  # by datamodule class: real data offline, else a stand-in named as such
    "datamodules.CIFAR10DataModule": ["--data.init_args.synthetic=true", "--data.init_args.synthetic_size=64"],
    # 6 images per class, so that every class puts one into the validation split
    "datamodules.CIFAR100DataModule": ["--data.init_args.synthetic=true", "--data.init_args.synthetic_size=600"],
    "datamodules.MNISTDataModule": ["--data.init_args.source=mnist5k"],  # auto would try to download full MNIST
    "datamodules.SST2DataModule": ["--data.init_args.source=rt-snippets", "--data.init_args.encoder=minilm",
                                   "--data.init_args.train_size=40", "--data.init_args.max_length=32"],
}
SMOKE_NET = {  # by network class
    # the packaged MiniLM (what auto gives offline); no frozen-prefix cache, which would run the frozen layers over
    # all 1,097 sentences of the splits (the cache is tested in tests/test_bert.py)
    "models.BertClassifier": ["--model.init_args.net.init_args.encoder=minilm",
                              "--model.init_args.net.init_args.cache_frozen_prefix=false"],
    "models.ShapeSharedBert": ["--model.init_args.net.init_args.encoder=minilm",
                               "--model.init_args.net.init_args.cache_frozen_prefix=false"],
    # the *_conv_frozen configs load the backbone of a baseline_conv run; here it stays at its initialisation.
    # Empty, not null: a null given on the command line inside net.init_args arrives as the string 'None'
    "models.BackboneClassifier": ["--model.init_args.net.init_args.backbone_checkpoint="],
}
SMOKE_TECHNIQUE = {  # by LightningModule class
    # about 10 ms per image and thread
    "lightning_modules.LayerReuse": ["--data.init_args.batch_size=4", "--data.init_args.eval_batch_size=8"],
    "lightning_modules.NeuMeta": [
        "--model.init_args.pretrained=null",  # the CIFAR ResNet-20's pretrained checkpoint is a run of its own
        "--model.init_args.pretrain_epochs=1", "--model.init_args.warm_start_steps=2",
        "--model.init_args.val_widths=[32]", "--model.init_args.test_widths=[32]",  # in every target's trained range
        "--model.init_args.val_samples=2", "--model.init_args.test_samples=2",
    ],
}
SMOKE_PAIR = {  # by (LightningModule, datamodule): NeuMeta pretrains its target on the whole training split first
    ("lightning_modules.NeuMeta", data): ["--data.init_args.batch_size=256"]
    for data in ("datamodules.FashionMNISTDataModule", "datamodules.MNISTDataModule", "datamodules.TabularDataModule")
}


PNG_FOLDER = ROOT / "data" / "fashion_mnist_png_smoke"  # 20 real FashionMNIST images per class and split


def png_folder() -> Path:
    """``PNG_FOLDER``, written on first use (tools/write_image_folder.py)."""
    from tools.write_image_folder import write_image_folder

    write_image_folder(str(ROOT / "data"), PNG_FOLDER, per_class=20)
    return PNG_FOLDER


def smoke_overrides(model: str | None, net: str | None, data: str | None) -> list[str]:
    """The arguments that shrink an experiment of these classes to two training steps (after its ``--config``)."""
    if data == "datamodules.ImageFolderDataModule":
        return [*SMOKE, f"--data.init_args.root={png_folder()}", *SMOKE_NET.get(net, []),
                *SMOKE_TECHNIQUE.get(model, [])]
    if data in ("datamodules.HFImageDataModule", "datamodules.HFTextDataModule"):
        from tools.write_hf_datasets import write_fashion, write_sentences

        small = ROOT / "data" / "hf_smoke"
        path = write_fashion(str(ROOT / "data"), small / "fashion_mnist", 200) if "Image" in data else \
            write_sentences(str(ROOT / "data"), small / "rt_snippets", 200)
        return [*SMOKE, f"--data.init_args.dataset={path}", *SMOKE_NET.get(net, []), *SMOKE_TECHNIQUE.get(model, []),
                *(["--data.init_args.encoder=minilm", "--data.init_args.train_size=40", "--data.init_args.max_length=32"]
                  if "Text" in data else [])]
    if data == "datamodules.TableDataModule":
        from tools.write_table import write_tables

        csv, _ = write_tables(ROOT / "data" / "tables")
        return [*SMOKE, f"--data.init_args.path={csv}", *SMOKE_NET.get(net, []), *SMOKE_TECHNIQUE.get(model, [])]
    return [*SMOKE, *SMOKE_DATA.get(data, []), *SMOKE_NET.get(net, []), *SMOKE_TECHNIQUE.get(model, []),
            *SMOKE_PAIR.get((model, data), [])]


class GradientProbe(Callback):
    """``--trainer.callbacks+=conftest.GradientProbe``: after every backward pass (automatic or manual optimisation),
    which ``requires_grad`` parameters hold a gradient that is not all zero; and every training step's loss."""

    def __init__(self) -> None:
        self.backwards = 0
        self.trainable: set[str] = set()
        self.reached: set[str] = set()
        self.losses: list[float] = []

    def on_after_backward(self, trainer, pl_module) -> None:
        self.backwards += 1
        for name, p in pl_module.named_parameters():
            if p.requires_grad:
                self.trainable.add(name)
                if p.grad is not None and bool(p.grad.ne(0).any()):
                    self.reached.add(name)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss))

    def unreached(self) -> list[str]:
        return sorted(self.trainable - self.reached)
