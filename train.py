"""morphlab's command line: ``python train.py fit|validate|test|predict --config configs/<dataset>/<technique>.yaml``.

A thin LightningCLI: the model and the datamodule are chosen by ``class_path`` (subclass mode), the datamodule's
input shape and class count are linked into the model, and the callbacks every run needs (checkpointing on
``val/acc``, LR monitor) are config sections of their own (``--checkpoint.*``, ``--lr_monitor.*``).
``fit`` ends by testing the best checkpoint (``--test_ckpt last``: the last) unless ``--test_after_fit false``; ``fit --ckpt_path last``
resumes the newest run of the same logger name in its own version directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from lightning.pytorch import LightningDataModule
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

import datamodules  # noqa: F401  (short class names in YAML)
from callbacks import BestAndLastCheckpoint
from lightning_modules import ClassificationModule

LOGGER_DEFAULT = {
    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
    "init_args": {"save_dir": "runs", "name": "default"},
}


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

    def before_instantiate_classes(self) -> None:
        if self.subcommand == "fit" and self.config.fit.get("ckpt_path") == "last":
            self._resume_into_last_version(self.config.fit)

    @staticmethod
    def _resume_into_last_version(config) -> None:
        """Point the TensorBoard logger at the newest version that has a ``last.ckpt`` (continues its curves)."""
        logger = config.trainer.logger
        if not hasattr(logger, "init_args") or logger.init_args.get("version") is not None:
            return
        run_root = Path(logger.init_args.save_dir) / logger.init_args.name
        candidates = [p.parent.parent for p in run_root.glob("version_*/checkpoints/last.ckpt")]
        if not candidates:
            raise SystemExit(f"--ckpt_path last: no checkpoints/last.ckpt under {run_root}/version_*; start with fit first.")
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
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"logger": LOGGER_DEFAULT, "log_every_n_steps": 10},
        args=args,
        run=run,
    )


if __name__ == "__main__":
    main()
