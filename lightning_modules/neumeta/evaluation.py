"""NeuMeta's evaluation over widths (spec §5, §9.4.6): validation and test at every width of ``val_widths`` /
``test_widths`` with the K-merged EMA INR, the test baselines (pretrained, zeroed, L1 pruning, resampling), the
dead-unit probe, the accuracy-vs-width table and the collapse check.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from lightning_modules.neumeta.plot import plot_accuracy_vs_width
from models.neumeta_baselines import l1_prune_to_width
from models.neumeta_smoothing import resample_to_width


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


def dead_fraction(alive: dict[str, Tensor]) -> Tensor:
    """Worst generated ReLU layer's share of units that never fired."""
    return torch.stack([1 - a.float().mean() for a in alive.values()]).max()


def width_key(method: str, width: int) -> str:
    """Key of a per-(method, width) accuracy metric."""
    return f"{method}_h{width}"


class Evaluation:
    """Validation and test hooks of ``NeuMeta``: per-width accuracy, dead units, baselines, table, collapse check."""

    def _fired_on_any_process(self, alive: dict[str, Tensor]) -> dict[str, Tensor]:
        """Per unit, whether it fired in any process (a sum over processes under DDP; itself in one)."""
        return {name: self.trainer.strategy.reduce(a.float(), reduce_op="sum") > 0 for name, a in alive.items()}

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
                metrics[width_key(method, width)].update(logits, y)

    def _dead_by_width(self) -> dict[int, float]:
        dead = {}
        for width, alive in self._alive.items():
            dead[width] = float(dead_fraction(self._fired_on_any_process(alive)))
        self._alive = {}
        return dead

    def _in_range(self, widths: Sequence[int]) -> list[int]:
        lo, hi = self.train_widths
        return [h for h in widths if lo <= h <= hi]

    # --- validation -----------------------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._require_prepared("validate")
        self._alive = {}
        self._val_methods = {"neumeta": {h: self.generated_parameters(h, self.val_samples) for h in self.val_widths}}

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(self._val_methods, self.val_width_acc, batch)

    def on_validation_epoch_end(self) -> None:
        acc = {h: float(self.val_width_acc[width_key("neumeta", h)].compute()) for h in self.val_widths}
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

    # --- test -----------------------------------------------------------------------------------------------
    def on_test_start(self) -> None:
        self._require_prepared("test")
        self._alive = {}
        n = self.full_width
        narrow = [h for h in self.test_widths if h <= n]  # pruning only removes channels
        self._test_methods = {
            "neumeta": {h: self.generated_parameters(h, self.test_samples) for h in self.test_widths},
            "l1_prune": {h: l1_prune_to_width(self.net, h) for h in narrow},
            "resample": {h: resample_to_width(self.net, h) for h in self.test_widths},  # interpolated up above N
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
                metric = self.test_width_acc[width_key(method, h)]
                row[method] = float(metric.compute()) if metric.update_count else None
                metric.reset()
            row["dead"] = dead[h]
            table.append(row)
            self.log(f"test/acc@h={h}", row["neumeta"])
            self.log(f"test/dead@h={h}", dead[h])
            for method in ("l1_prune", "resample"):
                if row[method] is not None:
                    self.log(f"test/{method}/acc@h={h}", row[method])
        pretrained, zeroed = (self.test_width_acc[width_key(m, self.full_width)] for m in ("pretrained", "zeroed"))
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
