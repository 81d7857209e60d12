"""The LightningModule every technique builds on: classification loss, metrics, accounting, run summary.

A technique subclasses ``ClassificationModule`` and changes only what it must: the network it builds
(``build_network``), an extra loss term (``regularization``), its optimizer (``configure_optimizers``) or
extra summary fields (``summary_extras``). Everything a comparison needs is measured here, once:

* metrics ``train/loss``, ``train/acc``, ``val/loss``, ``val/acc``, ``val/acc_best``, ``test/acc``,
  ``test/f1`` (macro), ``test/loss``;
* parameter accounting (``models.accounting``: total, trainable, nonzero, dense_equivalent), FLOPs per
  sample (``torch.utils.flop_counter``) and model bytes, logged under ``params/*``;
* ``summary.json`` in the run's log directory at the end of fit and of test (DESIGN.md contract).

Reproducibility: torch's, numpy's and Python's global RNGs are reseeded from ``(seed, epoch)`` at every
training-epoch start, so a run resumed from an epoch-end checkpoint draws the same dropout masks and
augmentations as an uninterrupted run (Lightning does not restore RNG states itself).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MaxMetric, MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from lightning_modules.distributed import global_batch_cross_entropy
from lightning_modules.schedules import follow_run
from models.accounting import count_dense_equivalent, count_nonzero, flops_per_sample, model_bytes
from models.latency import measure_latency
from seeding import global_seed, reseed_global_rngs

NetworkFactory = Callable[[Sequence[int], int], nn.Module]
"""A network class given in YAML by ``class_path``/``init_args``; called as ``net(input_shape, num_classes)``."""


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, dict):
        return {k: v.to(device) for k, v in value.items()}
    return value.to(device)


class ClassificationModule(LightningModule):
    """Supervised classification around a plain ``nn.Module``.

    Args:
        net: the network, e.g. ``{class_path: models.MLP, init_args: {hidden: [512, 512]}}``; its first two
            arguments (input shape, number of classes) come from the datamodule.
        input_shape: shape of one sample, linked from ``data.input_shape``.
        num_classes: number of classes, linked from ``data.num_classes``.
        optimizer: optimizer class and arguments (``class_path: torch.optim.Adam``, ``init_args: {lr: ...}``).
        lr_scheduler: optional LR scheduler class and arguments, stepped once per epoch.
    """

    technique = "baseline"

    def __init__(
        self,
        net: NetworkFactory,
        input_shape: Sequence[int],
        num_classes: int,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"model.num_classes must be >= 2, got {num_classes}.")
        self.save_hyperparameters()
        self.input_shape, self.num_classes = tuple(input_shape), num_classes
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self.net_factory = net
        self.net = self.build_network(net)
        example = getattr(self.net, "example_input", None)
        # a dict input is wrapped in a tuple so that Lightning passes it as one positional argument
        self.example_input_array = (example(),) if callable(example) else torch.zeros(1, *self.input_shape)
        if not callable(example):
            self._check_input_shape()
        metrics = MetricCollection(
            {
                "acc": MulticlassAccuracy(num_classes, average="micro"),
                "f1": MulticlassF1Score(num_classes, average="macro"),
            }
        )
        # Training metrics are accumulated with update() and logged once per epoch: a self.log() call costs about
        # a millisecond in Lightning 2.6, as much as a whole step of a small MLP.
        self.train_means = nn.ModuleDict()
        self.train_acc = MulticlassAccuracy(num_classes, average="micro", validate_args=False)
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")
        self.val_acc_best = MaxMetric()
        self.eval_losses = nn.ModuleDict({"val": MeanMetric(), "test": MeanMetric()})
        self.train_seconds = 0.0
        self.epochs_trained = 0
        self._epoch_start: float | None = None
        self._summary_metrics: dict[str, float] = {}

    def _check_input_shape(self) -> None:
        """One forward of a zero input: a network that does not fit the data's shape or classes is refused here,
        in one sentence, instead of by a matrix-size error in the first training step."""
        was_training = self.net.training
        self.net.eval()
        try:
            with torch.no_grad():
                out = self.net(self.example_input_array)
        except RuntimeError as error:
            raise ValueError(
                f"model.net {type(self.net).__name__} does not accept inputs of shape {list(self.input_shape)} (the data's "
                f"input_shape): {str(error).splitlines()[0][:160]}."
            ) from None
        finally:
            self.net.train(was_training)
        if tuple(out.shape) != (1, self.num_classes):
            raise ValueError(
                f"model.net {type(self.net).__name__} returns {list(out.shape)} for one input, but the data has "
                f"{self.num_classes} classes (expected [1, {self.num_classes}])."
            )

    # --- hooks for techniques -----------------------------------------------------------------------------
    def build_network(self, net: NetworkFactory) -> nn.Module:
        """Build the network; techniques wrap or transform it here."""
        return net(self.input_shape, self.num_classes)

    def regularization(self) -> Tensor | None:
        """Extra loss term added to cross-entropy during training (none by default)."""
        return None

    def summary_extras(self, deployed: nn.Module) -> dict[str, Any]:
        """Technique-specific fields for ``summary.json`` (sparsity, collapsed layers, ...); ``deployed`` is
        ``deployed_model()``, built once per summary."""
        return {}

    def save_exports(self, deployed: nn.Module, log_dir: Path) -> None:
        """Files written into the run directory at the end of ``fit`` (rank 0), e.g. the exported model."""

    def deployed_model(self) -> nn.Module:
        """The network as it would be deployed (techniques with an export return the exported model)."""
        return self.net

    def dense_equivalent_parameters(self, deployed: nn.Module) -> int:
        """Parameters of the same architecture without sharing/masking/collapse (models.accounting)."""
        return count_dense_equivalent(self.net)

    # --- forward and steps ----------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self.training_loss(batch)

    def training_loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        """Cross-entropy + ``regularization()`` on one batch, with training metrics accumulated."""
        x, y = batch
        logits = self(x)
        loss = global_batch_cross_entropy(logits, y)
        extra = self.regularization()
        if extra is not None:
            self.log_epoch_mean("train/regularization", extra)
            loss = loss + extra
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"the training loss became {loss.item()} at global step {self.global_step} (epoch {self.current_epoch}); "
                "lower the learning rate or check the inputs."
            )
        self.train_acc.update(logits.detach(), y)
        self.log_epoch_mean("train/loss", loss)
        self.log_step_loss(loss)
        return loss

    def log_step_loss(self, loss: Tensor) -> None:
        """``train/loss_step`` every ``log_every_n_steps``; in DDP the mean over processes, the global batch's loss."""
        if self.global_step % self.trainer.log_every_n_steps == 0:
            self.log("train/loss_step", loss, on_step=True, on_epoch=False, prog_bar=True, sync_dist=self.trainer.world_size > 1)

    def log_epoch_mean(self, name: str, value: Tensor) -> None:
        """Accumulate ``value`` over the training epoch; logged as ``name`` at the epoch's end."""
        key = name.replace("/", "__")
        if key not in self.train_means:
            self.train_means[key] = MeanMetric().to(self.device)
        self.train_means[key].update(value.detach())

    def _log_training_epoch(self) -> None:
        for key, metric in self.train_means.items():
            if metric.update_count:
                self.log(key.replace("__", "/"), metric.compute(), prog_bar=key == "train__loss")
            metric.reset()
        self.log("train/acc", self.train_acc.compute())
        self.train_acc.reset()

    def _eval_step(self, batch: tuple[Tensor, Tensor], metrics: MetricCollection, stage: str) -> None:
        x, y = batch
        logits = self(x)
        self.log_eval_loss(stage, logits, y)
        metrics(logits, y)
        self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=stage == "val")

    def log_eval_loss(self, stage: str, logits: Tensor, y: Tensor) -> None:
        """``{stage}/loss``, the mean over samples; a metric state, so DDP sums it over processes exactly."""
        self.eval_losses[stage].update(F.cross_entropy(logits, y), weight=len(y))
        self.log(f"{stage}/loss", self.eval_losses[stage], on_step=False, on_epoch=True)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, self.test_metrics, "test")

    def predict_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self(batch[0]).argmax(dim=-1)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        self.val_acc_best(self.val_metrics["acc"].compute())
        best = self.val_acc_best.compute()
        self.log("val/acc_best", best)
        self.log("hp_metric", best)  # fills TensorBoard's HPARAMS tab

    def on_train_start(self) -> None:
        self.val_acc_best.reset()  # sanity-check batches must not count
        if self.trainer.checkpoint_callback is not None and self.trainer.checkpoint_callback.best_model_score is not None:
            self.val_acc_best.update(self.trainer.checkpoint_callback.best_model_score)

    # --- optimisation ---------------------------------------------------------------------------------------
    def optimizer_parameters(self) -> Any:
        """What the optimizer gets: all parameters, or param groups a technique defines."""
        return self.parameters()

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.optimizer_parameters())
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        follow_run(scheduler, self.trainer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    # --- reproducibility and timing -------------------------------------------------------------------------
    def on_train_epoch_start(self) -> None:
        reseed_global_rngs(global_seed(), self.current_epoch)
        self._epoch_start = time.perf_counter()

    def on_train_epoch_end(self) -> None:
        self._log_training_epoch()
        if self._epoch_start is not None:
            self.train_seconds += time.perf_counter() - self._epoch_start
            self._epoch_start = None
        self.epochs_trained = self.current_epoch + 1

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        running = time.perf_counter() - self._epoch_start if self._epoch_start is not None else 0.0
        # Saved during validation of epoch e, before on_train_epoch_end: count epoch e as done.
        done = self.current_epoch + 1 if self._epoch_start is not None else self.epochs_trained
        checkpoint["morphlab"] = {"train_seconds": self.train_seconds + running, "epochs_trained": done}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Resuming, or testing a checkpoint in a new process, takes the run's time from the checkpoint; testing the
        # best checkpoint right after fit keeps the whole fit's (the best epoch may be an early one).
        if self.epochs_trained == 0:
            state = checkpoint.get("morphlab", {})
            self.train_seconds = float(state.get("train_seconds", 0.0))
            self.epochs_trained = int(state.get("epochs_trained", 0))

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """``nn.Module.load_state_dict``, but a checkpoint of another architecture (other widths, another N,
        another technique) is refused with one sentence instead of torch's list of every key."""
        if strict:
            own = self.state_dict()
            missing, unexpected = sorted(set(own) - set(state_dict)), sorted(set(state_dict) - set(own))
            wrong = sorted(k for k in set(own) & set(state_dict) if tuple(own[k].shape) != tuple(state_dict[k].shape))
            if missing or unexpected or wrong:
                raise ValueError(
                    f"the checkpoint does not fit this {type(self).__name__} with net {type(self.net).__name__} "
                    f"(missing {missing[:3]}, unexpected {unexpected[:3]}, other shapes {wrong[:3]}); pass the config "
                    "it was trained with (config.yaml in its run directory)."
                )
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # --- accounting and summary -----------------------------------------------------------------------------
    def accounting(self, deployed: nn.Module | None = None) -> dict[str, Any]:
        """Parameter counts (DESIGN.md), FLOPs per sample and bytes.

        ``total``/``trainable`` describe the network as trained; ``nonzero``, FLOPs and bytes the deployed one
        (``deployed``, built with ``deployed_model()`` when not given).
        """
        params = list(self.net.parameters())
        model = self.deployed_model() if deployed is None else deployed
        was_training = model.training
        model.eval()
        example = self._example_args()
        flops = flops_per_sample(lambda: model(*example), batch_size=1)
        model.train(was_training)
        counts = {
            "total": sum(p.numel() for p in params),
            "trainable": sum(p.numel() for p in params if p.requires_grad),
            "nonzero": count_nonzero(model),
            "dense_equivalent": self.dense_equivalent_parameters(model),
        }
        return {"params": counts, "flops_per_sample": flops, "model_bytes": model_bytes(model)}

    def _example_args(self) -> tuple:
        """``example_input_array`` as positional arguments on this module's device."""
        example = self.example_input_array
        return tuple(_to_device(e, self.device) for e in example) if isinstance(example, tuple) else (_to_device(example, self.device),)

    def latency(self, deployed: nn.Module | None = None) -> dict[str, Any]:
        """Inference latency of the deployed model at batch 1 and 256 (``models.latency``: warm-up, median)."""
        return measure_latency(self.deployed_model() if deployed is None else deployed, self._example_args())

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        data_encoder, net_encoder = getattr(datamodule, "encoder_name", None), getattr(self.net, "encoder_name", None)
        if data_encoder and net_encoder and data_encoder != net_encoder:
            raise ValueError(
                f"data.encoder tokenizes for {data_encoder} but the model's encoder is {net_encoder}; set both to the same value."
            )

    def _prepare_cache(self) -> None:
        """Let the network precompute per-sample features it keeps frozen (e.g. a BERT's frozen bottom)."""
        prepare = getattr(self.net, "prepare_cache", None)
        datamodule = getattr(self.trainer, "datamodule", None)
        if callable(prepare) and hasattr(datamodule, "all_inputs"):
            prepare(datamodule.all_inputs())

    def on_test_start(self) -> None:
        self._prepare_cache()

    def on_fit_start(self) -> None:
        self._prepare_cache()
        facts = self.accounting()
        metrics = {f"params/{k}": float(v) for k, v in facts["params"].items()}
        metrics["params/flops_per_sample"] = float(facts["flops_per_sample"])
        for logger in self.loggers:  # self.log() is not allowed in on_fit_start
            logger.log_metrics(metrics, step=self.global_step)

    def on_fit_end(self) -> None:
        self.write_summary("fit")

    def on_test_end(self) -> None:
        self.write_summary("test")

    def write_summary(self, stage: str) -> Path | None:
        """Write (or update) ``summary.json`` in the run's log directory; returns its path on rank 0."""
        trainer = self.trainer
        for key, value in trainer.callback_metrics.items():
            if key.split("/")[0] in ("train", "val", "test", "compact", "sched") and value.numel() == 1:
                self._summary_metrics[key] = float(value)
        if stage == "fit":
            self._summary_metrics["val/acc_best"] = float(self.val_acc_best.compute()) if self.val_acc_best.update_count else float("nan")
        log_dir = trainer.log_dir  # a broadcast under DDP: every rank must ask, not only rank 0
        if trainer.global_rank != 0 or log_dir is None:
            return None
        datamodule = trainer.datamodule
        deployed = self.deployed_model()  # built once: export, collapse or generation can be costly
        summary = {
            "technique": self.technique,
            "dataset": getattr(datamodule, "name", None),
            "data_source": getattr(datamodule, "source", None),
            "seed": global_seed(),
            "metrics": dict(sorted(self._summary_metrics.items())),
            **self.accounting(deployed),
            "epochs": self.epochs_trained,
            "train_seconds": round(self.train_seconds, 3),
            "seconds_per_epoch": round(self.train_seconds / self.epochs_trained, 3) if self.epochs_trained else None,
            "stage": stage,
            "checkpoint": getattr(trainer, "ckpt_path", None),
            **({"latency": self.latency(deployed)} if stage == "test" else {}),
            **self.summary_extras(deployed),
        }
        path = Path(log_dir) / "summary.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.part")
        tmp.write_text(json.dumps(summary, indent=2, default=str) + "\n")
        tmp.replace(path)
        if stage == "fit":
            self.save_exports(deployed, Path(log_dir))
        return path
