"""The run summary: what a run trained, measured once and the same way for every technique (DESIGN.md contract).

* ``RunRecord`` keeps what the summary reports across fit and test: training seconds, epochs done and the last
  value of every ``train/ val/ test/ compact/ sched/`` metric. Its state travels in every checkpoint
  (``checkpoint["morphlab"]``), so a resumed run, or a test of a checkpoint in a new process, reports the whole run.
* ``accounting`` measures a deployed network: parameter counts (``models.accounting``), FLOPs per sample
  (``torch.utils.flop_counter``) and bytes; ``latency`` its forward time (``models.latency``).
* ``write_summary`` writes ``summary.json`` into the run's log directory at the end of fit and of test
  (``callbacks.DeployExport`` then adds the deployable's checks and ONNX Runtime latency).

A technique takes part through the hooks of ``ClassificationModule``: ``deployed_model()``,
``counted_parameters()``, ``dense_equivalent_parameters(deployed)`` and ``summary_extras(deployed)``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from models.accounting import count_nonzero, flops_per_sample, model_bytes
from models.latency import measure_latency
from seeding import global_seed

if TYPE_CHECKING:
    from lightning_modules.base import ClassificationModule

SUMMARY_PREFIXES = ("train", "val", "test", "compact", "sched")


class RunRecord:
    """Training time and epochs of a run, and the metrics its summary reports."""

    def __init__(self) -> None:
        self.train_seconds = 0.0
        self.epochs_trained = 0
        self.metrics: dict[str, float] = {}
        self._epoch_start: float | None = None
        self.tested_deployable: nn.Module | None = None  # the test summary's deployed model, for callbacks.DeployExport
        self.sections: dict[str, Any] = {}  # summary sections a callback measured (DeployedValidation's ``deployed``)

    def take_tested_deployable(self) -> nn.Module | None:
        """The deployed model the last test summary measured (once: a later test builds its own), or None."""
        deployed, self.tested_deployable = self.tested_deployable, None
        return deployed

    def epoch_started(self) -> None:
        self._epoch_start = time.perf_counter()

    def epoch_ended(self, epoch: int) -> None:
        if self._epoch_start is not None:
            self.train_seconds += time.perf_counter() - self._epoch_start
            self._epoch_start = None
        self.epochs_trained = epoch + 1

    def state(self, current_epoch: int) -> dict[str, Any]:
        """What a checkpoint saved now must hold. Lightning saves during validation of epoch e, before
        ``on_train_epoch_end``: a running epoch counts as done, with its time so far."""
        running = time.perf_counter() - self._epoch_start if self._epoch_start is not None else 0.0
        done = current_epoch + 1 if self._epoch_start is not None else self.epochs_trained
        return {"train_seconds": self.train_seconds + running, "epochs_trained": done}

    def load(self, state: dict[str, Any]) -> None:
        """Take the run's time from a checkpoint when resuming, or testing it in a new process; testing the best
        checkpoint right after fit keeps the whole fit's (the best epoch may be an early one)."""
        if self.epochs_trained == 0:
            self.train_seconds = float(state.get("train_seconds", 0.0))
            self.epochs_trained = int(state.get("epochs_trained", 0))

    def collect(self, callback_metrics: dict[str, torch.Tensor], stale: frozenset[str] | set[str] = frozenset()) -> None:
        for key, value in callback_metrics.items():
            if key.split("/")[0] in SUMMARY_PREFIXES and value.numel() == 1 and key not in stale:
                self.metrics[key] = float(value)


def accounting(module: ClassificationModule, deployed: nn.Module) -> dict[str, Any]:
    """Parameter counts, FLOPs per sample and bytes: ``total``/``trainable`` of the network as trained
    (``counted_parameters()``), ``nonzero``, FLOPs and bytes of the deployed one."""
    params = list(module.counted_parameters())
    was_training = deployed.training
    deployed.eval()
    example = module.example_args()
    flops = flops_per_sample(lambda: deployed(*example), batch_size=1)
    deployed.train(was_training)
    counts = {
        "total": sum(p.numel() for p in params),
        "trainable": sum(p.numel() for p in params if p.requires_grad),
        "nonzero": count_nonzero(deployed),
        "dense_equivalent": module.dense_equivalent_parameters(deployed),
    }
    return {"params": counts, "flops_per_sample": flops, "model_bytes": model_bytes(deployed)}


def latency(module: ClassificationModule, deployed: nn.Module) -> dict[str, Any]:
    """Inference latency of the deployed model at batch 1 and 256 (``models.latency``: warm-up, median)."""
    return measure_latency(deployed, module.example_args())


def log_accounting(module: ClassificationModule) -> None:
    """``params/*`` of the deployed model to every logger at fit start (``self.log`` is not allowed there)."""
    facts = module.accounting()
    metrics = {f"params/{k}": float(v) for k, v in facts["params"].items()}
    metrics["params/flops_per_sample"] = float(facts["flops_per_sample"])
    for logger in module.loggers:
        logger.log_metrics(metrics, step=module.global_step)


def write_summary(module: ClassificationModule, stage: str) -> Path | None:
    """Write (or update) ``summary.json`` in the run's log directory; returns its path on rank 0."""
    trainer, record = module.trainer, module.record
    record.collect(trainer.callback_metrics, stale=module.stale_training_means())
    if stage == "fit":
        best = module.val_acc_best
        record.metrics["val/acc_best"] = float(best.compute()) if best.update_count else float("nan")
    log_dir = trainer.log_dir  # a broadcast under DDP: every rank must ask, not only rank 0
    if trainer.global_rank != 0 or log_dir is None:
        return None
    datamodule = trainer.datamodule
    deployed = module.deployed_model()  # built once: an export, collapse or generation can be costly
    record.tested_deployable = deployed if stage == "test" else None  # DeployExport exports this one after test
    summary = {
        "technique": module.technique,
        "dataset": getattr(datamodule, "name", None),
        "data_source": getattr(datamodule, "source", None),
        "seed": global_seed(),
        "metrics": dict(sorted(record.metrics.items())),
        **module.accounting(deployed),
        "epochs": record.epochs_trained,
        "train_seconds": round(record.train_seconds, 3),
        "seconds_per_epoch": round(record.train_seconds / record.epochs_trained, 3) if record.epochs_trained else None,
        "stage": stage,
        "checkpoint": getattr(trainer, "ckpt_path", None),
        **({"latency": latency(module, deployed)} if stage == "test" else {}),
        **module.summary_extras(deployed),
        **record.sections,
    }
    return save_summary(Path(log_dir) / "summary.json", summary)


def save_summary(path: Path, summary: dict[str, Any]) -> Path:
    """Write ``summary`` to ``path`` atomically (a ``.part`` file, then a rename: a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.part")
    tmp.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    tmp.replace(path)
    return path
