"""morphlab's command line: ``python train.py fit|validate|test|predict --config configs/<dataset>/<technique>.yaml``.

A thin LightningCLI: the model and the datamodule are chosen by ``class_path`` (subclass mode), the datamodule's
input shape and class count are linked into the model, and the callbacks every run needs (checkpointing on
``val/acc``, LR monitor) are config sections of their own (``--checkpoint.*``, ``--lr_monitor.*``).
``fit`` ends by testing the best checkpoint (``--test_ckpt last``: the last) unless ``--test_after_fit false``; ``fit --ckpt_path last``
resumes the newest run of the same logger name in its own version directory.
"""

from __future__ import annotations

import os
import pickle
import shutil
import sys
from pathlib import Path
from typing import Literal

import torch

from lightning.pytorch import LightningDataModule
from lightning.pytorch.callbacks import LearningRateMonitor, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

import datamodules  # noqa: F401  (short class names in YAML)
from cli_errors import INTERRUPTED, USER_ERRORS, OneLineParser, one_line
from callbacks import BestAndLastCheckpoint, DeployExport, PredictionsCSV, TimedProgressBar
from lightning_modules import ClassificationModule

DEFAULT_ROOT_DIR = "runs"

# Lightning sets PYTORCH_NVML_BASED_CUDA_CHECK=1 (a fork-safe CUDA check) on import. With it, every
# torch.cuda.is_available() dlopens libnvidia-ml, and Adam/AdamW call it on every step (torch.optim's graph-capture
# health check): ~50 us a step where no NVIDIA driver is installed. Without a GPU there is no fork to keep safe.
if os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK") == "1" and torch.cuda.device_count() == 0:
    del os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"]

# Runs live in <save_dir>/<name>/version_N: save_dir follows trainer.default_root_dir (runs; _place_logger), the name
# is the first --config's path under configs/ (run_name): configs/fashion_mnist/baseline.yaml -> fashion_mnist/baseline
LOGGER_DEFAULT = {
    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
    "init_args": {"save_dir": DEFAULT_ROOT_DIR, "name": "default"},
}


def run_name(args: list[str]) -> str:
    """The logger name a command line gets unless it gives one: the first ``--config`` file's path relative to the
    ``configs`` directory holding it, without its suffix (``configs/fashion_mnist/baseline.yaml`` ->
    ``fashion_mnist/baseline``); the file's stem outside a ``configs`` directory; ``default`` without a file."""
    for i, arg in enumerate(args):
        if arg in ("-c", "--config") and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith("--config="):
            value = arg.split("=", 1)[1]
        else:
            continue
        path = Path(value)
        if not path.is_file():  # a config given as a YAML string
            continue
        path = path.resolve()
        root = next((parent for parent in path.parents if parent.name == "configs"), path.parent)
        return path.relative_to(root).with_suffix("").as_posix()
    return "default"


def logger_default(args: list[str]) -> dict:
    """``LOGGER_DEFAULT`` named by ``run_name(args)``."""
    return {**LOGGER_DEFAULT, "init_args": {**LOGGER_DEFAULT["init_args"], "name": run_name(args)}}


GLOBAL_BATCH_LAYERS = {"class_path": "lightning_modules.distributed.GlobalBatchLayers"}


class MorphLabCLI(LightningCLI):
    """LightningCLI with morphlab's links, forced callbacks and resume-into-the-same-run behaviour."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(BestAndLastCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/acc",
                "checkpoint.mode": "max",
                "checkpoint.save_last": True,
                # metric names contain '/', so they must not be auto-inserted into file names
                "checkpoint.filename": "best-epoch{epoch:03d}-val_acc{val/acc:.4f}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.add_lightning_class_args(DeployExport, "deploy")  # exported.{json,safetensors,onnx} after test
        parser.add_lightning_class_args(PredictionsCSV, "predictions")  # predict: predictions.csv in the run directory
        parser.set_defaults({"lr_monitor.logging_interval": "epoch"})
        parser.link_arguments("data.input_shape", "model.init_args.input_shape", apply_on="instantiate")
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.add_argument("--test_after_fit", type=bool, default=True, help="fit: test a checkpoint at the end.")
        parser.add_argument(
            "--test_ckpt",
            type=Literal["best", "last"],
            default="best",
            help="fit: which checkpoint test_after_fit tests: best on the monitored metric, or last (e.g. the end of a pruning schedule).",
        )

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads the checkpoint's hyperparameters here, before any hook: check the file first
        # (LightningCLI then lets the checkpoint's hyperparameters override the config's, model class included)
        subcommand = self.config.get("subcommand")
        path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if path not in (None, "last", "best", "hpc", "registry"):
            trained = check_checkpoint(path).get("hyper_parameters", {}).get("_class_path")
            model = self.config[subcommand].get("model")
            wanted = model.get("class_path") if model is not None else None
            if trained and wanted and trained != wanted:
                raise ValueError(
                    f"--ckpt_path {path} holds a {trained} but the config's model is {wanted}; pass the config it was "
                    "trained with (config.yaml in its run directory)."
                )
        super()._parse_ckpt_path()

    def before_instantiate_classes(self) -> None:
        config = self.config.get(str(self.subcommand), self.config)
        self._place_logger(config)
        if self.subcommand == "fit" and config.get("ckpt_path") == "last":
            self._resume_into_last_version(config)

    @staticmethod
    def _place_logger(config) -> None:
        """The logger writes under ``trainer.default_root_dir``, as Lightning's own default logger does, unless its
        ``save_dir`` is given: a ``save_dir`` other than the default ``runs`` wins (``runs`` itself reads as not given,
        since the parsed config cannot tell a default from a value that equals it)."""
        root = config.trainer.get("default_root_dir")
        loggers = config.trainer.get("logger")
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            init_args = getattr(logger, "init_args", None)
            if root and init_args is not None and init_args.get("save_dir") == DEFAULT_ROOT_DIR:
                init_args.save_dir = str(root)

    def instantiate_trainer(self, **kwargs):
        """The Trainer, with ``callbacks.TimedProgressBar`` as its progress bar unless the bar is off or
        ``--trainer.callbacks`` brings one (Lightning's default bar redraws after every batch)."""
        config = self._get(self.config_init, "trainer", default={})
        given = config.get("callbacks") or []
        given = list(given) if isinstance(given, list) else [given]
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in given):
            kwargs.setdefault("callbacks", [*given, TimedProgressBar()])
        return super().instantiate_trainer(**kwargs)

    def _run_subcommand(self, subcommand: str) -> None:
        """Run it; a run that fails before its first checkpoint leaves no half-written run directory behind."""
        log_dir = Path(self.trainer.log_dir) if self.trainer.log_dir else None
        fresh = log_dir is not None and not log_dir.exists()
        try:
            super()._run_subcommand(subcommand)
        except BaseException:
            if fresh and self.trainer.is_global_zero and log_dir.exists() and not list(log_dir.glob("checkpoints/*.ckpt")):
                shutil.rmtree(log_dir, ignore_errors=True)
            raise

    @staticmethod
    def _resume_into_last_version(config) -> None:
        """Point the TensorBoard logger at the newest version that has a ``last.ckpt`` (continues its curves)."""
        logger = config.trainer.logger
        if not hasattr(logger, "init_args") or logger.init_args.get("version") is not None:
            return
        run_root = Path(logger.init_args.save_dir) / logger.init_args.name
        candidates = [p.parent.parent for p in run_root.glob("version_*/checkpoints/last.ckpt")]
        if not candidates:
            raise FileNotFoundError(f"--ckpt_path last: no checkpoints/last.ckpt under {run_root}/version_*; start with fit first.")
        newest = max(candidates, key=lambda p: int(p.name.split("_")[1]))
        logger.init_args.version = int(newest.name.split("_")[1])

    def after_fit(self) -> None:
        if not self.config.fit.test_after_fit or self.trainer.interrupted:
            return
        callback = self.trainer.checkpoint_callback
        path = ""
        if callback is not None:
            path = callback.best_model_path if self.config.fit.test_ckpt == "best" else callback.last_model_path
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=path or None)


def main(args: list[str] | None = None, run: bool = True) -> MorphLabCLI:
    """Build the CLI from ``args`` (default: ``sys.argv``); ``run=False`` only instantiates (no subcommand)."""
    return MorphLabCLI(
        ClassificationModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        parser_class=OneLineParser,  # a refused argument: one line naming the key (cli_errors)
        save_config_kwargs={"overwrite": True},
        # the logger: named after the first --config, under trainer.default_root_dir (LOGGER_DEFAULT, run_name);
        # GlobalBatchLayers: under DDP, BatchNorm and Dropout act on the global batch (lightning_modules/distributed.py)
        trainer_defaults={
            "logger": logger_default(sys.argv[1:] if args is None else args if isinstance(args, list) else []),
            "default_root_dir": DEFAULT_ROOT_DIR,
            "log_every_n_steps": 10,
            "plugins": GLOBAL_BATCH_LAYERS,
            "profiler": {"class_path": "callbacks.NullProfiler"},  # Lightning's pass-through, without its per-hook cost
        },
        args=args,
        run=run,
    )


def check_checkpoint(path: str) -> dict:
    """The checkpoint (memory-mapped), or a one-sentence refusal of a missing, truncated, corrupt or code-carrying
    file: loading is ``weights_only``, so a checkpoint cannot run code."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"--ckpt_path {path}: no such file.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"--ckpt_path {path} holds objects other than tensors and plain containers, which are not loaded "
            f"(weights_only=True; {str(error).splitlines()[0][:120]})."
        ) from None
    except Exception as error:  # torch raises RuntimeError, EOFError, ... for a torn or foreign file
        raise ValueError(
            f"--ckpt_path {path} is not a readable checkpoint (truncated or corrupt: {str(error).splitlines()[0][:120]})."
        ) from None


def end_process_group() -> None:
    """After a run under DDP: wait for every rank (rank 0 writes and checks the deployable alone), then destroy the
    process group, as PyTorch asks of every process at the end of its main. Lightning leaves this to an ``atexit``
    handler; a rank that reached interpreter shutdown first once died there with SIGABRT ('terminate called without
    an active exception', CI, the two-process LruNet run), so it is done here while everything is alive."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def cli(args: list[str] | None = None) -> None:
    """The command line: ``main``, ending in one line and exit status 2 for a user error, 130 for Ctrl-C
    (``cli_errors``)."""
    try:
        main(args)
        end_process_group()
    except USER_ERRORS as error:
        if os.environ.get("MORPHLAB_TRACEBACK"):
            raise
        print(f"train.py: error: {one_line(error)}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("train.py: interrupted", file=sys.stderr)
        raise SystemExit(INTERRUPTED) from None
    except SystemExit as done:  # Lightning ends a fit interrupted by Ctrl-C with sys.exit(1)
        if isinstance(done.__context__, KeyboardInterrupt):
            print("train.py: interrupted", file=sys.stderr)
            raise SystemExit(INTERRUPTED) from None
        raise


if __name__ == "__main__":
    cli()
