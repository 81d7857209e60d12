"""NeuMeta: an INR hypernetwork trained to generate a target network at any width h (spec:
shared/specs/neumeta.md §4, §5, §9.4).

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

Safeguards (§9.4, on by default): width-aware warm start, LR warm-up, dead-unit logging with a collapse check;
``configs/*/neumeta_faithful.yaml`` turns them off and restores the release's quirks.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.func import functional_call
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torchmetrics.classification import MulticlassAccuracy

from lightning_modules.base import ClassificationModule, NetworkFactory
from lightning_modules.distributed import average_gradients, global_batch_cross_entropy
from models.neumeta_baselines import l1_prune_to_width
from models.neumeta_inr import NeuMetaINR, warm_start_
from models.neumeta_smoothing import fold_batchnorm_, network_tv, resample_to_width, smooth_
from models.neumeta_targets import NeuMetaTarget
from models.plain_export import save_exported
from seeding import global_seed, stream_seed


def weighted_recon(generated: dict[str, Tensor], pretrained: dict[str, Tensor]) -> Tensor:
    """Magnitude-weighted MSE (§4.1.5): mean over tensors of mean(w ⊙ (Ŵ − W)²), w = (|W|+1e-6) / max(|W|+1e-6)."""
    terms = []
    for name, w in pretrained.items():
        weight = (w.abs() + 1e-6) / (w.abs() + 1e-6).max()
        terms.append((weight * (generated[name] - w).pow(2)).mean())
    return torch.stack(terms).mean()


@contextmanager
def unit_activity(net: nn.Module, names: Sequence[str]) -> Iterator[dict[str, Tensor]]:
    """While active, ``store[name]`` holds per unit whether module ``name``'s output was > 0 for any sample
    (and any position) of the last call. Hooks are registered only for the ``with`` block, so copies of ``net``
    never carry them."""
    store: dict[str, Tensor] = {}

    def hook(name: str):
        def record(module: nn.Module, args: Any, out: Tensor) -> None:
            fired = out.detach() > 0  # [B, C] or [B, C, H, W]: reduce every axis but the channel axis
            store[name] = fired.any(0) if fired.dim() == 2 else fired.flatten(2).any(2).any(0)
        return record

    handles = [net.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


def _key(method: str, width: int) -> str:
    return f"{method}_h{width}"


class NeuMeta(ClassificationModule):
    """Train an INR that generates ``net``'s width-dependent tensors at any width (see module docstring).

    Args:
        net: the target at its pretrained width N, e.g. ``{class_path: models.NeuMetaHead, init_args: {width: 64}}``.
        train_widths: ``[lo, hi]``, the widths sampled per step (default ``[N // 2, N]``).
        val_widths: widths validated each epoch (default N/4, N/2, 3N/4, N).
        test_widths: widths tested (default N/4 to N in steps of N/16; give ``[16, 17, ...]`` for every width).
        pretrained: a checkpoint of a Baseline run of the same target (``net.*`` keys) or a plain state dict;
            without it the target is trained here for ``pretrain_epochs`` (Adam ``pretrain_lr``, the data's batch).
        smooth: apply the SHP channel permutation before INR training (§2); off only for the ablation.
        inr_hidden, inr_layers, inr_freqs, inr_kind: the INR's H, L, F and MLP kind (§3.4).
        faithful_routing, noise_sizes: the release's quirks (§3.6, §4.1.3); off by default.
        sigma: coordinate noise σ in training and in the K − 1 noisy evaluation samples.
        reg_weight, recon_weight, recon_every_step: the loss terms (§4.1.5, §9.4.5).
        warm_start_steps, warm_start_lr: width-aware warm start (§9.4.1); 0 steps turns it off.
        warm_start_widths: ``[lo, hi]`` of the warm start's widths (default ``train_widths``). The targets are the
            smoothed weights resampled to h (no data), so a range reaching below the trained widths prepares the
            INR for widths CE training never sees.
        warmup_steps, schedule: linear LR warm-up over the first steps (§9.4.2), then cosine decay to 0 over the
            run (``cosine``) or a constant LR (``constant``).
        ema_decay: EMA of the INR weights used for evaluation; ``None`` evaluates the raw INR.
        val_samples, test_samples: K of the K-sample weight averaging at validation and test.
        deploy_width: width of the exported / predicting network (default N).
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
        pretrain_epochs: int = 20,
        pretrain_lr: float = 3e-3,
        smooth: bool = True,
        inr_hidden: int = 128,
        inr_layers: int = 4,
        inr_freqs: int = 8,
        inr_kind: Literal["resmlp", "mlp"] = "resmlp",
        faithful_routing: bool = False,
        noise_sizes: bool = False,
        sigma: float = 1.0,
        reg_weight: float = 1e-4,
        recon_weight: float = 1.0,
        recon_every_step: bool = False,
        warm_start_steps: int = 600,
        warm_start_lr: float = 1e-3,
        warm_start_widths: tuple[int, int] | None = None,
        warmup_steps: int = 200,
        schedule: Literal["cosine", "constant"] = "cosine",
        ema_decay: float | None = 0.995,
        val_samples: int = 10,
        test_samples: int = 10,
        deploy_width: int | None = None,
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
        checks = {
            # the target (model.net) at width N is the largest network there is a template for
            "model.train_widths": (1 <= lo <= hi <= n, f"[lo, hi] with 1 <= lo <= hi <= {n} (the target's width), got {list(self.train_widths)}"),
            "model.val_widths": (1 <= min(self.val_widths, default=0) and max(self.val_widths) <= n,
                                 f"a non-empty list of widths in [1, {n}], got {val_widths}"),
            "model.test_widths": (1 <= min(self.test_widths, default=0) and max(self.test_widths) <= n,
                                  f"a non-empty list of widths in [1, {n}], got {test_widths}"),
            "model.warm_start_widths": (1 <= ws_lo <= ws_hi <= n, f"[lo, hi] with 1 <= lo <= hi <= {n}, got {warm_start_widths}"),
            "model.deploy_width": (1 <= self.deploy_width <= n, f"a width in [1, {n}], got {deploy_width}"),
            "model.sigma": (sigma >= 0, f">= 0, got {sigma}"),
            "model.pretrain_epochs": (pretrain_epochs >= 0, f">= 0, got {pretrain_epochs}"),
            "model.warm_start_steps": (warm_start_steps >= 0, f">= 0, got {warm_start_steps}"),
            "model.warmup_steps": (warmup_steps >= 0, f">= 0, got {warmup_steps}"),
            "model.reg_weight": (reg_weight >= 0, f">= 0, got {reg_weight}"),
            "model.recon_weight": (recon_weight >= 0, f">= 0, got {recon_weight}"),
            "model.ema_decay": (ema_decay is None or 0 < ema_decay < 1, f"in (0, 1) or null, got {ema_decay}"),
            "model.val_samples": (val_samples >= 1, f">= 1, got {val_samples}"),
            "model.test_samples": (test_samples >= 1, f">= 1, got {test_samples}"),
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
        self.net.requires_grad_(False)  # frozen template: trained only by the pretraining loop in _prepare
        self.inr = NeuMetaINR(self.net.layout, norm=n, hidden=inr_hidden, layers=inr_layers, num_freqs=inr_freqs,
                              kind=inr_kind, faithful_routing=faithful_routing, noise_sizes=noise_sizes)
        self.ema = None
        if ema_decay is not None:
            self.ema = AveragedModel(self.inr, multi_avg_fn=get_ema_multi_avg_fn(ema_decay), use_buffers=False)
            self.ema.requires_grad_(False)
        self.register_buffer("prepared", torch.zeros((), dtype=torch.bool))
        self.relu_producers = self.net.layout.relu_producers()
        self.val_width_acc = nn.ModuleDict({_key("neumeta", h): self._accuracy() for h in self.val_widths})
        methods = ("neumeta", "l1_prune", "resample")
        self.test_width_acc = nn.ModuleDict({_key(m, h): self._accuracy() for m in methods for h in self.test_widths}
                                            | {_key(m, n): self._accuracy() for m in ("pretrained", "zeroed")})
        self.preparation: dict[str, Any] = {}
        self.width_table: list[dict[str, Any]] = []
        self._params_cache: dict[tuple[int, int], dict[str, Tensor]] = {}
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
                self._params_cache[key] = self.eval_inr.merge(width, samples, self.sigma, generator)
        return self._params_cache[key]

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

    def stored_parameters(self) -> list[nn.Parameter]:
        """What a NeuMeta model stores to produce every width: the INR and the target's fixed (non-generated) part."""
        generated = set(self.net.layout.tensors(self.full_width))
        fixed = [p for name, p in self.net.named_parameters() if name not in generated]
        return [*self.inr.parameters(), *fixed]

    def dense_equivalent_parameters(self, deployed: nn.Module) -> int:
        return sum(p.numel() for p in deployed.parameters())

    # --- preparation: pretrain, fold, smooth, warm start (once per run) -------------------------------------
    def on_fit_start(self) -> None:
        if not bool(self.prepared):
            self._prepare()
        super().on_fit_start()

    def _prepare(self) -> None:
        started = time.perf_counter()
        facts: dict[str, Any] = {}
        if self.pretrained is not None:
            self._load_pretrained(self.pretrained)
            facts["pretrained_from"] = self.pretrained
        else:
            facts["pretrain_loss"] = self._pretrain()
        if self.net.has_batchnorm:
            facts["folded_batchnorm"] = fold_batchnorm_(self.net)
        facts["pretrained_val_acc"] = self._accuracy_on("val", {})
        if self.smooth:
            result = smooth_(self.net)
            facts["tv_before"], facts["tv_after"] = result.tv_before, result.tv_after
        else:
            facts["tv_before"] = facts["tv_after"] = network_tv(self.net)
        self.net.requires_grad_(False)
        if self.warm_start_steps:
            targets: dict[int, dict[str, Tensor]] = {}

            def resampled(h: int) -> dict[str, Tensor]:
                if h not in targets:
                    targets[h] = resample_to_width(self.net, h)
                return targets[h]

            lo, hi = self.warm_start_widths
            losses = warm_start_(self.inr, resampled, list(range(lo, hi + 1)), steps=self.warm_start_steps,
                                 lr=self.warm_start_lr, sigma=self.sigma, seed=global_seed())
            facts["warm_start_loss"] = [losses[0], losses[-1]]
        if self.ema is not None:
            self.ema.n_averaged.zero_()
            self.ema.update_parameters(self.inr)  # n_averaged 0 -> copies the (warm-started) INR
        self.prepared.fill_(True)
        self._params_cache.clear()
        facts["seconds"] = round(time.perf_counter() - started, 2)
        self.preparation = facts
        rank_zero_info(f"[neumeta] prepared in {facts['seconds']} s: pretrained val acc {facts['pretrained_val_acc']:.4f}, "
                       f"TV {facts['tv_before']:.4g} -> {facts['tv_after']:.4g}"
                       + (f", warm-start loss {facts['warm_start_loss'][0]:.3g} -> {facts['warm_start_loss'][1]:.3g}"
                          if "warm_start_loss" in facts else ""))

    def _load_pretrained(self, path: str) -> None:
        """Load the target from a Baseline checkpoint (``state_dict`` with ``net.`` keys) or a plain state dict."""
        if not Path(path).is_file():
            raise FileNotFoundError(f"model.pretrained: no file {path!r}; give a Baseline checkpoint of the same target.")
        payload = torch.load(path, map_location="cpu", weights_only=True)
        state = payload.get("state_dict", payload)
        if any(k.startswith("net.") for k in state):
            state = {k[len("net."):]: v for k, v in state.items() if k.startswith("net.")}
        own = self.net.state_dict()
        if set(state) != set(own) or any(tuple(state[k].shape) != tuple(own[k].shape) for k in own):
            raise ValueError(f"model.pretrained {path!r} does not hold a {type(self.net).__name__} of width "
                             f"{self.full_width} (keys {sorted(state)[:4]}...); train it with the same model.net.")
        self.net.load_state_dict(state)

    def _pretrain(self) -> list[float]:
        """Train the target at width N with Adam on the training split; returns the mean loss of each epoch.

        A plain loop rather than a nested Trainer: the target is a small network trained once before the INR,
        inside this run's fit (its own loggers, callbacks and checkpoints belong to the INR)."""
        loader = self.trainer.datamodule.train_dataloader()
        self.net.requires_grad_(True).train()
        optimizer = torch.optim.Adam(self.net.parameters(), lr=self.pretrain_lr)
        torch.manual_seed(global_seed())
        losses = []
        with torch.enable_grad():
            for epoch in range(self.pretrain_epochs):
                for sampler in (loader.sampler, loader.batch_sampler):  # a new shuffle each epoch
                    if hasattr(sampler, "set_epoch"):
                        sampler.set_epoch(epoch)
                total, count = torch.zeros((), device=self.device), 0
                for x, y in loader:
                    x, y = x.to(self.device), y.to(self.device)
                    loss = global_batch_cross_entropy(self.net(x), y)
                    optimizer.zero_grad()
                    loss.backward()
                    average_gradients(self.net.parameters())  # the loop is outside DDP: sync as DDP would
                    optimizer.step()
                    total, count = total + loss.detach(), count + 1
                # mean over batches of the global batch's loss (in DDP the shares' mean over ranks is that loss)
                losses.append(float(self.trainer.strategy.reduce(total, reduce_op="mean")) / count)
                rank_zero_info(f"[neumeta] pretraining the width-{self.full_width} target: epoch {epoch + 1}/"
                               f"{self.pretrain_epochs}, loss {losses[-1]:.4f}")
        self.net.requires_grad_(False)
        return losses

    @torch.no_grad()
    def _accuracy_on(self, split: str, params: dict[str, Tensor]) -> float:
        loader = getattr(self.trainer.datamodule, f"{split}_dataloader")()
        correct = total = 0
        for x, y in loader:
            x, y = x.to(self.device), y.to(self.device)
            correct += int((self.run_at(params, x).argmax(-1) == y).sum())
            total += len(y)
        return correct / max(total, 1)

    # --- training -------------------------------------------------------------------------------------------
    def sample_width(self) -> int:
        """A training width, uniform over ``train_widths`` (global RNG: reseeded per epoch, same on every rank)."""
        lo, hi = self.train_widths
        return int(torch.randint(lo, hi + 1, (1,)))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        width = self.sample_width()
        generated = self.inr(width, self.sigma)
        with unit_activity(self.net, self.relu_producers) as alive:
            logits = self.run_at(generated, x)
        ce = global_batch_cross_entropy(logits, y)
        l2 = torch.stack([t.norm() for t in generated.values()]).sum()
        loss = ce + self.reg_weight * l2
        if width == self.full_width or self.recon_every_step:
            at_full = generated if width == self.full_width else self.inr(self.full_width, self.sigma)
            recon = weighted_recon(at_full, self.pretrained_tensors())
            loss = loss + self.recon_weight * recon
            self.log_epoch_mean("train/recon", recon)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the NeuMeta loss became {loss.item()} at global step {self.global_step} (width "
                                     f"{width}); lower the learning rate or the coordinate noise.")
        self.train_acc.update(logits.detach(), y)
        self.log_epoch_mean("train/loss", loss)
        self.log_epoch_mean("train/ce", ce)
        self.log_epoch_mean("train/l2", l2)
        self.log_epoch_mean("train/dead", self._dead_fraction(self._fired_on_any_process(alive)))
        self.log_step_loss(loss)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.ema is not None:
            self.ema.update_parameters(self.inr)
        self._params_cache.clear()

    def _fired_on_any_process(self, alive: dict[str, Tensor]) -> dict[str, Tensor]:
        """Per unit, whether it fired in any process (a sum over processes under DDP; itself in one)."""
        return {name: self.trainer.strategy.reduce(a.float(), reduce_op="sum") > 0 for name, a in alive.items()}

    @staticmethod
    def _dead_fraction(alive: dict[str, Tensor]) -> Tensor:
        """Worst generated ReLU layer's share of units that never fired."""
        return torch.stack([1 - a.float().mean() for a in alive.values()]).max()

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

    # --- evaluation -------------------------------------------------------------------------------------------
    def _require_prepared(self, stage: str) -> None:
        if not bool(self.prepared):
            raise ValueError(f"NeuMeta {stage}: this model has no trained INR yet; run fit first or pass "
                             "--ckpt_path with a NeuMeta checkpoint.")

    def _evaluate(self, methods: dict[str, dict[int, dict[str, Tensor]]], metrics: nn.ModuleDict,
                  batch: tuple[Tensor, Tensor]) -> None:
        x, y = batch
        for method, per_width in methods.items():
            for width, params in per_width.items():
                if method == "neumeta":
                    with unit_activity(self.net, self.relu_producers) as alive:
                        logits = self.run_at(params, x)
                    seen = self._alive.setdefault(width, {})
                    for name, fired in alive.items():
                        seen[name] = seen[name] | fired if name in seen else fired
                else:
                    logits = self.run_at(params, x)
                metrics[_key(method, width)].update(logits, y)

    def _dead_by_width(self) -> dict[int, float]:
        dead = {}
        for width, alive in self._alive.items():
            dead[width] = float(self._dead_fraction(self._fired_on_any_process(alive)))
        self._alive = {}
        return dead

    def _in_range(self, widths: Sequence[int]) -> list[int]:
        lo, hi = self.train_widths
        return [h for h in widths if lo <= h <= hi]

    def on_validation_epoch_start(self) -> None:
        self._require_prepared("validate")
        self._alive = {}
        self._val_methods = {"neumeta": {h: self.generated_parameters(h, self.val_samples) for h in self.val_widths}}

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(self._val_methods, self.val_width_acc, batch)

    def on_validation_epoch_end(self) -> None:
        acc = {h: float(self.val_width_acc[_key("neumeta", h)].compute()) for h in self.val_widths}
        for metric in self.val_width_acc.values():
            metric.reset()
        dead = self._dead_by_width()
        for h in self.val_widths:
            self.log(f"val/acc@h={h}", acc[h])
            self.log(f"val/dead@h={h}", dead[h])
        trained = self._in_range(self.val_widths) or self.val_widths
        mean = sum(acc[h] for h in trained) / len(trained)
        self.log("val/acc", mean, prog_bar=True)
        if self.trainer.sanity_checking:
            return
        self.val_acc_best(torch.tensor(mean))
        self.log("val/acc_best", self.val_acc_best.compute())
        self.log("hp_metric", self.val_acc_best.compute())

    def on_test_start(self) -> None:
        self._require_prepared("test")
        self._alive = {}
        n = self.full_width
        narrow = [h for h in self.test_widths if h <= n]
        self._test_methods = {
            "neumeta": {h: self.generated_parameters(h, self.test_samples) for h in self.test_widths},
            "l1_prune": {h: l1_prune_to_width(self.net, h) for h in narrow},
            "resample": {h: resample_to_width(self.net, h) for h in narrow},
            "pretrained": {n: {}},  # the template's own (smoothed pretrained) tensors
            # generated tensors all zero: for a residual target the identity path alone (the dead-block signature, §6.3)
            "zeroed": {n: {name: torch.zeros_like(t) for name, t in self.pretrained_tensors().items()}},
        }

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(self._test_methods, self.test_width_acc, batch)

    def on_test_epoch_end(self) -> None:
        dead = self._dead_by_width()
        table = []
        for h in self.test_widths:
            row: dict[str, Any] = {"width": h}
            for method in ("neumeta", "l1_prune", "resample"):
                metric = self.test_width_acc[_key(method, h)]
                row[method] = float(metric.compute()) if metric.update_count else None
                metric.reset()
            row["dead"] = dead[h]
            table.append(row)
            self.log(f"test/acc@h={h}", row["neumeta"])
            self.log(f"test/dead@h={h}", dead[h])
            for method in ("l1_prune", "resample"):
                if row[method] is not None:
                    self.log(f"test/{method}/acc@h={h}", row[method])
        pretrained, zeroed = (self.test_width_acc[_key(m, self.full_width)] for m in ("pretrained", "zeroed"))
        self.pretrained_test_acc = float(pretrained.compute())
        self.log("test/pretrained/acc", self.pretrained_test_acc)
        self.log("test/zeroed/acc", float(zeroed.compute()))
        pretrained.reset()
        zeroed.reset()
        trained = self._in_range(self.test_widths) or self.test_widths
        self.log("test/acc", sum(r["neumeta"] for r in table if r["width"] in trained) / len(trained))
        self.width_table = table
        self._test_methods = {}

    def collapse_check(self) -> dict[str, Any]:
        """Spec 9.4.6 / 9.6.8: collapsed if accuracy is width-invariant (spread <= 1 point over the tested widths)
        or half or more of a generated ReLU layer is dead at a trained width."""
        if not self.width_table:
            return {}
        accs = [r["neumeta"] for r in self.width_table]
        trained = self._in_range([r["width"] for r in self.width_table])
        dead = max((r["dead"] for r in self.width_table if r["width"] in trained), default=float("nan"))
        spread = max(accs) - min(accs)
        invariant = len(accs) > 1 and spread <= 0.01
        return {"accuracy_spread": spread, "width_invariant": invariant, "max_dead_in_training_range": dead,
                "collapsed": bool(invariant or dead >= 0.5)}

    def on_test_end(self) -> None:
        check = self.collapse_check()
        if check.get("collapsed"):
            rank_zero_warn(f"NeuMeta looks collapsed (spec 9.4.6): {check}.")
        super().on_test_end()
        log_dir = self.trainer.log_dir  # a broadcast under DDP: asked on every rank
        if log_dir and self.trainer.global_rank == 0 and self.width_table:
            figure = plot_accuracy_vs_width(self.width_table, self.pretrained_test_acc, self.full_width,
                                            self.train_widths, Path(log_dir) / "accuracy_vs_width.png")
            experiment = getattr(self.trainer.logger, "experiment", None)
            if hasattr(experiment, "add_figure"):
                experiment.add_figure("test/accuracy_vs_width", figure, self.global_step)

    def save_exports(self, deployed: nn.Module, log_dir: Path) -> None:
        save_exported(deployed, log_dir / "exported.pt")

    # --- checkpoints and summary --------------------------------------------------------------------------
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

    def accounting(self, deployed: nn.Module | None = None) -> dict[str, Any]:
        facts = super().accounting(deployed)
        stored = self.stored_parameters()
        facts["params"]["total"] = sum(p.numel() for p in stored)
        facts["params"]["trainable"] = sum(p.numel() for p in self.inr.parameters())
        return facts

    def summary_extras(self, deployed: nn.Module) -> dict[str, Any]:
        return {
            "neumeta": {
                "full_width": self.full_width,
                "train_widths": list(self.train_widths),
                "deploy_width": self.deploy_width,
                "inr_parameters": sum(p.numel() for p in self.inr.parameters()),
                "preparation": self.preparation,
                "pretrained_test_acc": getattr(self, "pretrained_test_acc", None),
                "accuracy_vs_width": self.width_table,
                "collapse_check": self.collapse_check(),
            }
        }


def plot_accuracy_vs_width(table: list[dict[str, Any]], pretrained: float, full_width: int,
                           train_widths: tuple[int, int], path: Path):
    """Accuracy against width for NeuMeta and the baselines, the training range shaded; saved to ``path``."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    widths = [r["width"] for r in table]
    axis.axvspan(train_widths[0], train_widths[1], color="0.92", label="training widths")
    for method, label, style in (("neumeta", "NeuMeta (EMA, K-merged)", "o-"), ("l1_prune", "L1 pruning, no fine-tune", "s--"),
                                 ("resample", "smoothed weights resampled", "^:")):
        points = [(r["width"], 100 * r[method]) for r in table if r[method] is not None]
        if points:
            axis.plot(*zip(*points), style, markersize=3, label=label)
    axis.plot([full_width], [100 * pretrained], "k*", markersize=10, label=f"pretrained (h = {full_width})")
    axis.set_xlabel("hidden width h")
    axis.set_ylabel("test accuracy (%)")
    axis.set_xlim(min(widths) - 1, max(widths) + 1)
    axis.grid(alpha=0.3)
    axis.legend(loc="lower right", fontsize=8)
    axis.set_title("NeuMeta: accuracy vs width")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return figure


__all__ = ["NeuMeta", "weighted_recon", "unit_activity", "plot_accuracy_vs_width"]
