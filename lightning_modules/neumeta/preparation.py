"""NeuMeta's preparation, once per run before INR training (spec §1.1, §2.6, §9.4.1): load or pretrain the target
at width N, fold its BatchNorm, smooth it (SHP permutation, §2) and freeze it, warm-start the INR on the smoothed
weights resampled to widths h ~ U{warm_start_widths} and start the EMA from it. The result (template, INR, EMA and
``prepared``) is in every checkpoint, so resume and test skip this.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lightning_modules.distributed import average_gradients, global_batch_cross_entropy
from models.neumeta_inr import warm_start_
from models.neumeta_smoothing import fold_batchnorm_, network_tv, resample_to_width, smooth_
from seeding import global_seed


class Preparation:
    """``on_fit_start`` of ``NeuMeta``: pretrain / fold BatchNorm / smooth / warm start, unless already prepared."""

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
        self._resampled_cache.clear()  # the target is final now: R_h(W) is taken from it
        # with base: resampled the zero-initialised INR already generates R_h(W) exactly: nothing to warm-start
        if self.warm_start_steps and self.base == "none":
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
