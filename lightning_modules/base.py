"""The LightningModule every technique builds on: the classification loss and metrics, and the hooks a technique
changes.

A technique subclasses ``ClassificationModule`` and changes only what it must: the network it builds
(``build_network``), an extra loss term (``regularization``), its optimizer (``optimizer_parameters``,
``configure_optimizers``), the network it deploys (``deployed_model``) and what its summary adds
(``summary_extras``, ``extra_deployables``). Metrics: ``train/loss``, ``train/acc``, ``val/loss``, ``val/acc``,
``val/acc_best``, ``test/acc``, ``test/f1`` (macro), ``test/loss``. The rest lives in its own place:
``lightning_modules.summary`` (accounting, latency, ``summary.json``, run time), ``lightning_modules.checks``
(refusals of a network that does not fit its data or a checkpoint), ``lightning_modules.text_hooks`` (text
networks and data), ``seeding`` (the global RNGs are reseeded from ``(seed, epoch)`` at every epoch start, so a
resumed run draws the same dropout masks as an uninterrupted one).
"""

from __future__ import annotations

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

from lightning_modules import summary
from lightning_modules.checks import check_network_fits_data, check_state_dict_fits
from lightning_modules.distributed import global_batch_cross_entropy
from lightning_modules.schedules import follow_run
from lightning_modules.text_hooks import DictInputNetwork, PrefixCachingNetwork, TokenizedData
from models.accounting import count_dense_equivalent
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
        if isinstance(self.net, DictInputNetwork):
            # a dict input is wrapped in a tuple so that Lightning passes it as one positional argument
            self.example_input_array = (self.net.example_input(),)
        else:
            self.example_input_array = torch.zeros(1, *self.input_shape)
            check_network_fits_data(self.net, self.example_input_array, num_classes)
        metrics = MetricCollection(
            {
                "acc": MulticlassAccuracy(num_classes, average="micro"),
                "f1": MulticlassF1Score(num_classes, average="macro"),
            }
        )
        # Training means are running (weighted sum, weight) tensors, logged once per epoch: a self.log() call costs
        # about a millisecond in Lightning 2.6, and a torchmetrics update() per step about 40 us plus, on a GPU, a
        # host sync (its NaN check). At the epoch's end each goes through a MeanMetric, which sums over processes.
        self.train_means = nn.ModuleDict()
        self._running: dict[str, tuple[Tensor, float]] = {}
        self._last_epoch_means: set[str] = set()
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")
        self.val_acc_best = MaxMetric()
        self.eval_losses = nn.ModuleDict({"val": MeanMetric(), "test": MeanMetric()})
        self.record = summary.RunRecord()

    def __setattr__(self, name: str, value: Any) -> None:
        """Lightning records the running hook's name in ``_current_fx_name`` around every hook call, about 40 times
        a training step; ``nn.Module.__setattr__`` checks a value against parameters, buffers and submodules first
        (2.5 us against 0.4 us here), about 0.1 ms a step (benchmarks/step_profile.py). A hook name is a string,
        never one of those, so it is stored directly."""
        if name == "_current_fx_name":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

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

    def extra_deployables(self) -> dict[str, nn.Module]:
        """Networks written beside the deployed one at the end of test (``callbacks.DeployExport``), by file stem:
        e.g. LayerCollapse's network as trained, for before/after comparisons."""
        return {}

    def deployed_model(self) -> nn.Module:
        """The network as it would be deployed (techniques with an export return the exported model)."""
        return self.net

    def counted_parameters(self) -> Any:
        """The parameters ``total`` and ``trainable`` count (the network as trained; a shared tensor once)."""
        return self.net.parameters()

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
        self.log_epoch_accuracy(logits, y)
        self.log_epoch_mean("train/loss", loss)
        self.log_step_loss(loss)
        return loss

    def log_step_loss(self, loss: Tensor, advice: str = "lower the learning rate or check the inputs") -> None:
        """``train/loss_step`` every ``log_every_n_steps``; in DDP the mean over processes, the global batch's loss.
        On those steps and the epoch's last, a non-finite loss since the last check (the running ``train/loss``
        sum is then non-finite) stops training: checking every step would cost a host sync per step on a GPU."""
        trainer = self.trainer
        log_step = self.global_step % trainer.log_every_n_steps == 0
        if log_step or trainer.is_last_batch:
            running = self._running.get("train__loss", (loss.detach(), 1.0))[0]
            if not torch.isfinite(running):
                raise FloatingPointError(
                    f"the training loss became {running.item()} at or before global step {self.global_step} "
                    f"(epoch {self.current_epoch}); {advice}."
                )
        if log_step:
            self.log("train/loss_step", loss, on_step=True, on_epoch=False, prog_bar=True, sync_dist=trainer.world_size > 1)

    def log_epoch_mean(self, name: str, value: Tensor, weight: float = 1.0) -> None:
        """Add ``value`` (weight ``weight``) to the training epoch's running mean ``name``, logged at its end."""
        key = name.replace("/", "__")
        total, count = self._running.get(key, (0.0, 0.0))
        self._running[key] = (total + value.detach().float() * weight, count + weight)

    def log_epoch_accuracy(self, logits: Tensor, y: Tensor) -> None:
        """``train/acc``: the fraction of the epoch's training samples whose argmax is the label."""
        self.log_epoch_mean("train/acc", (logits.detach().argmax(dim=-1) == y).float().mean(), weight=len(y))

    def _log_training_epoch(self) -> None:
        for key, (total, count) in self._running.items():
            if key not in self.train_means:
                self.train_means[key] = MeanMetric().to(self.device)
            metric = self.train_means[key]
            metric.update(total / count, weight=count)
            self.log(key.replace("__", "/"), metric.compute(), prog_bar=key == "train__loss")
            metric.reset()
        self._last_epoch_means = {key.replace("__", "/") for key in self._running}
        self._running.clear()

    def stale_training_means(self) -> set[str]:
        """Training means logged in an earlier epoch but not in the last one (a term computed only at some steps,
        e.g. NeuMeta's full-width reconstruction). Lightning keeps their old value in ``callback_metrics``, a resumed
        run never saw it: the summary leaves them out."""
        return {key.replace("__", "/") for key in self.train_means} - self._last_epoch_means

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
        """Class probabilities ``softmax(logits)``, one row per sample (``callbacks.PredictionsCSV`` writes them)."""
        return self(batch[0]).softmax(dim=-1)

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
        self.record.epoch_started()

    def on_train_epoch_end(self) -> None:
        self._log_training_epoch()
        self.record.epoch_ended(self.current_epoch)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["morphlab"] = self.record.state(self.current_epoch)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.record.load(checkpoint.get("morphlab", {}))

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """``nn.Module.load_state_dict``; a checkpoint of another architecture is refused in one sentence."""
        if strict:
            check_state_dict_fits(self, self.net, state_dict)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # --- accounting, summary and text hooks ------------------------------------------------------------------
    def accounting(self, deployed: nn.Module | None = None) -> dict[str, Any]:
        """Parameter counts, FLOPs per sample and bytes (``summary.accounting``) of ``deployed`` (built with
        ``deployed_model()`` when not given)."""
        return summary.accounting(self, self.deployed_model() if deployed is None else deployed)

    def example_args(self) -> tuple:
        """``example_input_array`` as positional arguments on this module's device."""
        example = self.example_input_array
        return tuple(_to_device(e, self.device) for e in example) if isinstance(example, tuple) else (_to_device(example, self.device),)

    def setup(self, stage: str) -> None:
        data = getattr(self.trainer, "datamodule", None)
        if isinstance(data, TokenizedData) and isinstance(self.net, PrefixCachingNetwork) and data.encoder_name \
                and self.net.encoder_name != data.encoder_name:
            raise ValueError(
                f"data.encoder tokenizes for {data.encoder_name} but the model's encoder is {self.net.encoder_name}; "
                "set both to the same value."
            )

    def _prepare_cache(self) -> None:
        """Let a text network precompute the outputs of its frozen prefix for every input (a BERT's bottom)."""
        data = getattr(self.trainer, "datamodule", None)
        if isinstance(self.net, PrefixCachingNetwork) and isinstance(data, TokenizedData):
            self.net.prepare_cache(data.all_inputs())

    def on_test_start(self) -> None:
        self._prepare_cache()

    def on_fit_start(self) -> None:
        self._prepare_cache()
        summary.log_accounting(self)

    def on_fit_end(self) -> None:
        summary.write_summary(self, "fit")

    def on_test_end(self) -> None:
        summary.write_summary(self, "test")
