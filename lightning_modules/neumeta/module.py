"""NeuMeta: an INR hypernetwork trained to generate a target network at any width h (spec:
shared/specs/neumeta.md §4, §5, §9.4). The class ``NeuMeta`` is here, with the training step; its two other jobs
are mixed in from ``preparation.py`` and ``evaluation.py`` (the plot is ``plot.py``).

Preparation, once per run (``on_fit_start``; the result is in every checkpoint, so resume and test skip it):
the target ``net`` at the pretrained width N is loaded (``pretrained``) or trained (``pretrain_epochs``), its
BatchNorm folded, its channels smoothed by the function-preserving SHP permutation (§2) and frozen; the INR is
warm-started on the smoothed weights resampled to random training widths (§9.4.1) and the EMA copy starts from it.

Training step (§4.1): h ~ U{train_widths}; Ŵ = INR(coordinates of the width-h target + U(-σ/2, σ/2) noise);
logits = ``functional_call(net, Ŵ, x)`` (the template's layers read their weights at call time, so one template
serves every width); loss = CE + reg_weight · Σ_t ||Ŵ_t||_2 + recon_weight · Recon, with
Recon = mean_t mean((|W_t| + 1e-6) / max(|W_t| + 1e-6) ⊙ (Ŵ_t − W_t)²) against the smoothed pretrained W, only
when h = N (or every step at width N with ``recon_every_step``). The EMA of the INR (``AveragedModel``, decay
0.995) is updated after every optimizer step.

Evaluation (§5): for each width, the EMA INR's weights of K samples (the clean one and K − 1 noisy ones) are
averaged into one network. Metrics per width: ``val/acc@h=32``, ``test/acc@h=32``, the fraction of dead units of
the generated ReLU layers (``test/dead@h=32``) and, at test, the baselines at the same widths: the pretrained net
(``test/pretrained/acc``), the generated part zeroed (``test/zeroed/acc``: the identity path of a residual
target), structured L1 pruning without fine-tuning (``test/l1_prune/acc@h=..``) and the smoothed
weights resampled without training (``test/resample/acc@h=..``). ``val/acc`` and ``test/acc`` are the means over
the evaluated widths inside the training range. The accuracy-vs-width table goes to summary.json, the plot to
``accuracy_vs_width.png`` and TensorBoard.

Improvements on the paper (off in the faithful preset; issue 21): ``base: resampled`` makes the INR generate a
correction to the smoothed pretrained weights resampled to h, Ŵ(h) = R_h(W) + INR(h), with the INR's output layers
zero-initialised, so every width starts as the resample-only baseline (no warm start needed, no dead layer at the
start) and CE at the trained widths only adds to it; R_h(W) is computed from the frozen smoothed target, so the
stored model is the INR plus the N-wide generated tensors.

``anchor_widths`` (off by default) adds, at every step, the spec's warm-start regression (§9.4.1) at one untrained
width: anchor_weight · relative MSE(Ŵ(h_a), R_{h_a}(W)), h_a ~ U{anchor_widths}; with the resampled base it keeps
the correction near 0 where no data ever trained it, so such widths stay at (rather than below) resampling.

Safeguards (§9.4, on by default): width-aware warm start, LR warm-up, dead-unit logging with a collapse check;
``configs/*/neumeta_faithful.yaml`` turns them off and restores the release's quirks.
"""

# Annotations are not postponed (no __future__ import): jsonargparse must see the constrained types (constraints.py).
from collections.abc import Sequence
from typing import Any, Literal

import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn
from torch.func import functional_call
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torchmetrics.classification import MulticlassAccuracy

from constraints import NonNegativeFloat, NonNegativeInt, OpenFraction, PositiveFloat, PositiveInt
from lightning_modules.base import ClassificationModule, NetworkFactory
from lightning_modules.distributed import global_batch_cross_entropy
from lightning_modules.neumeta.evaluation import Evaluation, dead_fraction, unit_activity, width_key
from lightning_modules.neumeta.preparation import Preparation
from models.neumeta_inr import NeuMetaINR, relative_mse
from models.neumeta_smoothing import fold_batchnorm_, resample_to_width
from models.neumeta_targets import NeuMetaTarget
from seeding import global_seed, stream_seed


def weighted_recon(generated: dict[str, Tensor], pretrained: dict[str, Tensor]) -> Tensor:
    """Magnitude-weighted MSE (§4.1.5): mean over tensors of mean(w ⊙ (Ŵ − W)²), w = (|W|+1e-6) / max(|W|+1e-6)."""
    terms = []
    for name, w in pretrained.items():
        weight = (w.abs() + 1e-6) / (w.abs() + 1e-6).max()
        terms.append((weight * (generated[name] - w).pow(2)).mean())
    return torch.stack(terms).mean()


class NeuMeta(Preparation, Evaluation, ClassificationModule):
    """Train an INR that generates ``net``'s width-dependent tensors at any width (see module docstring).

    Args:
        net: the target at its pretrained width N, e.g. ``{class_path: models.NeuMetaHead, init_args: {width: 64}}``.
        train_widths: ``[lo, hi]``, the widths sampled per step (default ``[N // 2, N]``).
        val_widths: widths validated each epoch (default N/4, N/2, 3N/4, N).
        test_widths: widths tested (default N/4 to N in steps of N/16; give ``[16, 17, ...]`` for every width).
            Widths above N are allowed in validation and test: the INR is queried with sizes C/N > 1 and the
            resample baseline (and base) interpolates the N pretrained channels up to h; L1 pruning only narrows.
        pretrained: a checkpoint of a Baseline run of the same target (``net.*`` keys) or a plain state dict;
            without it the target is trained here for ``pretrain_epochs`` (Adam ``pretrain_lr``, the data's batch).
        smooth: apply the SHP channel permutation before INR training (§2); off only for the ablation.
        inr_hidden, inr_layers, inr_freqs, inr_kind: the INR's H, L, F and MLP kind (§3.4).
        faithful_routing, noise_sizes: the release's quirks (§3.6, §4.1.3); off by default.
        sigma: coordinate noise σ in training and in the K − 1 noisy evaluation samples.
        reg_weight, recon_weight, recon_every_step: the loss terms (§4.1.5, §9.4.5).
        warm_start_steps, warm_start_lr: width-aware warm start (§9.4.1); 0 steps turns it off (so does
            ``base: resampled``, which starts at R_h(W) exactly).
        warm_start_widths: ``[lo, hi]`` of the warm start's widths (default ``train_widths``). The targets are the
            smoothed weights resampled to h (no data), so a range reaching below the trained widths prepares the
            INR for widths CE training never sees.
        warmup_steps, schedule: linear LR warm-up over the first steps (§9.4.2), then cosine decay to 0 over the
            run (``cosine``) or a constant LR (``constant``).
        ema_decay: EMA of the INR weights used for evaluation; ``None`` evaluates the raw INR.
        val_samples, test_samples: K of the K-sample weight averaging at validation and test.
        deploy_width: width of the exported / predicting network (default N).
        base: ``none`` (the paper: the INR is the weights) or ``resampled`` (the INR is a correction to R_h(W); the
            stored model then holds the N-wide smoothed tensors too).
        anchor_widths, anchor_weight: ``[lo, hi]`` of untrained widths where, at every step, the generated weights
            are pulled towards R_h(W) (data-free: anchor_weight · relative MSE at one width h ~ U{lo..hi}); with
            ``base: resampled`` this keeps the correction near 0 where no CE ever trained it. ``None``: off.
        optimizer: the INR's optimizer (the spec's AdamW, lr 2e-4, weight decay 1e-2).
    """

    technique = "neumeta"

    def __init__(
        self,
        net: NetworkFactory,
        input_shape: Sequence[int],
        num_classes: int,
        train_widths: tuple[int, int] | None = None,
        val_widths: list[int] | None = None,
        test_widths: list[int] | None = None,
        pretrained: str | None = None,
        pretrain_epochs: NonNegativeInt = 20,
        pretrain_lr: PositiveFloat = 3e-3,
        smooth: bool = True,
        inr_hidden: PositiveInt = 128,
        inr_layers: PositiveInt = 4,
        inr_freqs: NonNegativeInt = 8,
        inr_kind: Literal["resmlp", "mlp"] = "resmlp",
        faithful_routing: bool = False,
        noise_sizes: bool = False,
        sigma: NonNegativeFloat = 1.0,
        reg_weight: NonNegativeFloat = 1e-4,
        recon_weight: NonNegativeFloat = 1.0,
        recon_every_step: bool = False,
        warm_start_steps: NonNegativeInt = 600,
        warm_start_lr: PositiveFloat = 1e-3,
        warm_start_widths: tuple[int, int] | None = None,
        warmup_steps: NonNegativeInt = 200,
        schedule: Literal["cosine", "constant"] = "cosine",
        ema_decay: OpenFraction | None = 0.995,
        val_samples: PositiveInt = 10,
        test_samples: PositiveInt = 10,
        deploy_width: int | None = None,
        base: Literal["none", "resampled"] = "none",
        anchor_widths: tuple[int, int] | None = None,
        anchor_weight: NonNegativeFloat = 1.0,
        optimizer: OptimizerCallable = torch.optim.AdamW,
    ) -> None:
        super().__init__(net, input_shape, num_classes, optimizer, None)
        if not isinstance(self.net, NeuMetaTarget):
            raise ValueError(f"model.net must be a NeuMeta target (models.NeuMetaHead, NeuMetaResidual or NeuMetaCNN), "
                             f"got {type(self.net).__name__}.")
        n = self.full_width = self.net.width
        lo, hi = train_widths if train_widths is not None else (max(1, n // 2), n)
        self.train_widths = (int(lo), int(hi))
        ws_lo, ws_hi = warm_start_widths if warm_start_widths is not None else self.train_widths
        self.warm_start_widths = (int(ws_lo), int(ws_hi))
        self.val_widths = sorted(set(val_widths if val_widths is not None else
                                     [max(1, n // 4), max(1, n // 2), max(1, 3 * n // 4), n]))
        step = max(1, n // 16)
        self.test_widths = sorted(set(test_widths if test_widths is not None else range(max(1, n // 4), n + 1, step)) | (
            set() if test_widths is not None else {n}))
        self.deploy_width = n if deploy_width is None else int(deploy_width)
        self.base = base
        self.anchor_widths = None if anchor_widths is None else (int(anchor_widths[0]), int(anchor_widths[1]))
        self.anchor_weight = anchor_weight
        # the target (model.net) at width N is the largest network trained (and deployed); wider ones are only tested
        checks = {
            "model.train_widths": (1 <= lo <= hi <= n, f"[lo, hi] with 1 <= lo <= hi <= {n} (the target's width), got {list(self.train_widths)}"),
            # evaluation may go above N: the INR is queried at C/N > 1, the resampled base is interpolated up
            "model.val_widths": (1 <= min(self.val_widths, default=0), f"a non-empty list of widths >= 1, got {val_widths}"),
            "model.test_widths": (1 <= min(self.test_widths, default=0), f"a non-empty list of widths >= 1, got {test_widths}"),
            "model.warm_start_widths": (1 <= ws_lo <= ws_hi <= n, f"[lo, hi] with 1 <= lo <= hi <= {n}, got {warm_start_widths}"),
            "model.deploy_width": (1 <= self.deploy_width <= n, f"a width in [1, {n}], got {deploy_width}"),
            "model.anchor_widths": (anchor_widths is None or 1 <= anchor_widths[0] <= anchor_widths[1],
                                    f"null or [lo, hi] with 1 <= lo <= hi, got {anchor_widths}"),
        }
        for field, (ok, allowed) in checks.items():
            if not ok:
                raise ValueError(f"{field} must be {allowed}.")
        if pretrained is None and pretrain_epochs == 0:
            raise ValueError("model.pretrain_epochs must be >= 1 when no model.pretrained checkpoint is given.")
        self.pretrained, self.pretrain_epochs, self.pretrain_lr = pretrained, pretrain_epochs, pretrain_lr
        self.smooth, self.sigma = smooth, float(sigma)
        self.reg_weight, self.recon_weight, self.recon_every_step = reg_weight, recon_weight, recon_every_step
        self.warm_start_steps, self.warm_start_lr = warm_start_steps, warm_start_lr
        self.warmup_steps, self.schedule = warmup_steps, schedule
        self.val_samples, self.test_samples = val_samples, test_samples
        self.net.requires_grad_(False)  # frozen template: trained only by the pretraining loop (preparation.py)
        self.inr = NeuMetaINR(self.net.layout, norm=n, hidden=inr_hidden, layers=inr_layers, num_freqs=inr_freqs,
                              kind=inr_kind, faithful_routing=faithful_routing, noise_sizes=noise_sizes)
        if base == "resampled":  # the correction starts at 0: every width starts as R_h(W)
            for mlp in self.inr.mlps:
                nn.init.zeros_(mlp.out.weight)
                nn.init.zeros_(mlp.out.bias)
        self.ema = None
        if ema_decay is not None:
            self.ema = AveragedModel(self.inr, multi_avg_fn=get_ema_multi_avg_fn(ema_decay), use_buffers=False)
            self.ema.requires_grad_(False)
        self.register_buffer("prepared", torch.zeros((), dtype=torch.bool))
        self.relu_producers = self.net.layout.relu_producers()
        self.val_width_acc = nn.ModuleDict({width_key("neumeta", h): self._accuracy() for h in self.val_widths})
        methods = ("neumeta", "l1_prune", "resample")
        self.test_width_acc = nn.ModuleDict({width_key(m, h): self._accuracy() for m in methods for h in self.test_widths}
                                            | {width_key(m, n): self._accuracy() for m in ("pretrained", "zeroed")})
        self.preparation: dict[str, Any] = {}
        self.width_table: list[dict[str, Any]] = []
        self._params_cache: dict[tuple[int, int], dict[str, Tensor]] = {}
        self._resampled_cache: dict[int, dict[str, Tensor]] = {}
        self._alive: dict[int, dict[str, Tensor]] = {}

    def _accuracy(self) -> MulticlassAccuracy:
        return MulticlassAccuracy(self.num_classes, average="micro", validate_args=False)

    # --- generated networks ---------------------------------------------------------------------------------
    @property
    def eval_inr(self) -> NeuMetaINR:
        """The INR used for evaluation and export: the EMA copy (or the raw INR without EMA)."""
        return self.ema.module if self.ema is not None else self.inr

    def generated_parameters(self, width: int, samples: int) -> dict[str, Tensor]:
        """K-sample merged weights of the width-``width`` network from the evaluation INR (cached per (width, K)
        until the next training step or checkpoint load). The noise comes from a private generator seeded by (seed, width): reproducible, and it
        leaves the global RNG (training data order, width sampling) alone."""
        key = (width, samples)
        if key not in self._params_cache:
            generator = torch.Generator(device=self.device).manual_seed(stream_seed(global_seed(), width))
            with torch.no_grad():
                self._params_cache[key] = self.with_base(width, self.eval_inr.merge(width, samples, self.sigma, generator))
        return self._params_cache[key]

    def resampled(self, width: int) -> dict[str, Tensor]:
        """R_h(W): the smoothed pretrained tensors resampled to ``width`` (cached until the target changes)."""
        if width not in self._resampled_cache:
            self._resampled_cache[width] = resample_to_width(self.net, width)
        return self._resampled_cache[width]

    def with_base(self, width: int, generated: dict[str, Tensor]) -> dict[str, Tensor]:
        """The width-h weights from the INR's output: R_h(W) + output with ``base: resampled``, else the output."""
        if self.base == "none":
            return generated
        base = self.resampled(width)
        return {name: base[name] + value for name, value in generated.items()}

    def pretrained_tensors(self) -> dict[str, Tensor]:
        """The smoothed pretrained values of the generated tensors at width N (the reconstruction targets)."""
        return {name: self.net.get_parameter(name) for name in self.net.layout.tensors(self.full_width)}

    def run_at(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        """Logits of the target with its generated tensors replaced by ``params`` (any width)."""
        return functional_call(self.net, params, (x,))

    def forward(self, x: Tensor) -> Tensor:
        """Logits of the generated network at ``deploy_width`` (EMA INR, K = test_samples)."""
        return self.run_at(self.generated_parameters(self.deploy_width, self.test_samples), x)

    def deployed_model(self) -> nn.Module:
        """A plain target network of width ``deploy_width`` holding the generated (K-merged) weights."""
        net = self.net.resized(self.deploy_width)
        net.load_state_dict(self.generated_parameters(self.deploy_width, self.test_samples), strict=False)
        return net.requires_grad_(False).eval()

    def counted_parameters(self) -> list[nn.Parameter]:
        """What a NeuMeta model stores to produce every width: the INR (trainable) and the target's fixed,
        non-generated part (frozen); the generated tensors are not counted, unless they are the INR's base."""
        generated = set(self.net.layout.tensors(self.full_width)) if self.base == "none" else set()
        fixed = [p for name, p in self.net.named_parameters() if name not in generated]
        return [*self.inr.parameters(), *fixed]

    def dense_equivalent_parameters(self, deployed: nn.Module) -> int:
        return sum(p.numel() for p in deployed.parameters())

    # --- training -------------------------------------------------------------------------------------------
    def sample_width(self, widths: tuple[int, int] | None = None) -> int:
        """A width uniform over ``widths`` (default ``train_widths``; global RNG: reseeded per epoch, same on every
        rank)."""
        lo, hi = self.train_widths if widths is None else widths
        return int(torch.randint(lo, hi + 1, (1,)))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        width = self.sample_width()
        generated = self.with_base(width, self.inr(width, self.sigma))
        with unit_activity(self.net, self.relu_producers) as alive:
            logits = self.run_at(generated, x)
        ce = global_batch_cross_entropy(logits, y)
        l2 = torch.stack([t.norm() for t in generated.values()]).sum()
        loss = ce + self.reg_weight * l2
        if width == self.full_width or self.recon_every_step:
            at_full = generated if width == self.full_width else self.with_base(self.full_width, self.inr(self.full_width, self.sigma))
            recon = weighted_recon(at_full, self.pretrained_tensors())
            loss = loss + self.recon_weight * recon
            self.log_epoch_mean("train/recon", recon)
        if self.anchor_widths is not None:
            h = self.sample_width(self.anchor_widths)
            anchor = relative_mse(self.with_base(h, self.inr(h, self.sigma)), self.resampled(h))
            loss = loss + self.anchor_weight * anchor
            self.log_epoch_mean("train/anchor", anchor)
        self.log_epoch_accuracy(logits, y)
        self.log_epoch_mean("train/loss", loss)
        self.log_epoch_mean("train/ce", ce)
        self.log_epoch_mean("train/l2", l2)
        self.log_epoch_mean("train/dead", dead_fraction(self._fired_on_any_process(alive)))
        self.log_step_loss(loss, advice="lower the learning rate or the coordinate noise")
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.ema is not None:
            self.ema.update_parameters(self.inr)
        self._params_cache.clear()

    def optimizer_parameters(self) -> Any:
        return self.inr.parameters()

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.optimizer_parameters())
        total = max(1, int(self.trainer.estimated_stepping_batches))
        stages, milestones = [], []
        if self.warmup_steps:
            stages.append(torch.optim.lr_scheduler.LinearLR(optimizer, 1.0 / self.warmup_steps, 1.0, self.warmup_steps))
            milestones.append(self.warmup_steps)
        if self.schedule == "cosine":
            stages.append(torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, total - self.warmup_steps)))
        else:
            stages.append(torch.optim.lr_scheduler.ConstantLR(optimizer, 1.0, 0))
        scheduler = stages[0] if len(stages) == 1 else torch.optim.lr_scheduler.SequentialLR(optimizer, stages, milestones)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # --- checkpoints, exports and summary -----------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["morphlab"]["neumeta_preparation"] = self.preparation

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.preparation = dict(checkpoint.get("morphlab", {}).get("neumeta_preparation", {}))
        state = checkpoint.get("state_dict", {})
        if self.net.has_batchnorm and not any(k.startswith("net.") and ".running_mean" in k for k in state):
            fold_batchnorm_(self.net)  # the checkpoint holds the folded target: match its keys
        self._params_cache.clear()
        self._resampled_cache.clear()

    def summary_extras(self, deployed: nn.Module) -> dict[str, Any]:
        return {
            "neumeta": {
                "full_width": self.full_width,
                "train_widths": list(self.train_widths),
                "deploy_width": self.deploy_width,
                "base": self.base,
                "anchor_widths": None if self.anchor_widths is None else list(self.anchor_widths),
                "inr_parameters": sum(p.numel() for p in self.inr.parameters()),
                "preparation": self.preparation,
                "pretrained_test_acc": getattr(self, "pretrained_test_acc", None),
                "accuracy_vs_width": self.width_table,
                "collapse_check": self.collapse_check(),
            }
        }
