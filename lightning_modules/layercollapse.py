"""LayerCollapse: pull single-slope PReLUs toward 1, then merge the linear layers around them, on any network.

The chains (``Linear -> activation -> [Dropout/BatchNorm1d] -> Linear``, ``models.collapse_chains``) are found
in the network by tracing; the selected ones get a single-slope PReLU in place of their activation (ReLU -> 0
and LeakyReLU exactly, others -> ``slope_init``, the change is measured and reported). Regulariser (spec A3):
``R = lambda_t * sum_{i in S} (a_i - 1)^2`` over the selected chains' slopes, with lambda constant or linearly
warmed up over ``lc_warmup_epochs``. PReLU slopes never get weight decay (decay pulls them toward 0, i.e.
toward ReLU, against the regulariser; spec A3/D4).

Test evaluates two models on the same batches: ``test/acc`` is the deployed model, every selected chain with
|a - 1| < ``collapse_threshold`` merged into one ``nn.Linear``, and ``test/acc_uncollapsed`` the network as
trained. Chains collapsed in place during training (``callbacks.CollapseBlocks``, ``callbacks.ProgressiveCollapse``)
are recorded in the checkpoint and rebuilt before the weights load, so ``test --ckpt_path`` and resume work; the
optimizer drops the removed parameters and takes the new Linear's in the order a fresh ``configure_optimizers``
would give (exact resume).
"""

import copy
import re
from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from callbacks.controls import CollapseStage
from constraints import NonNegativeFloat, NonNegativeInt, OpenFraction, PositiveFloat, PositiveInt
from lightning_modules.base import ClassificationModule, NetworkFactory
from lightning_modules.structure import after_structure_change
from models.collapse_chains import (Chain, collapse_chains_, find_chains, keeps_function, rebuild_collapsed_chains_, slope,
                                    to_prelu_)
from models.targets import TargetModules, name_matches, network_name


def select_chains(net: nn.Module, target_modules: TargetModules | None, exclude_modules: TargetModules | None,
                  last_k: int | None) -> list[Chain]:
    """The chains LayerCollapse acts on. ``target_modules`` selects by chain name with peft's rules (a list of
    name suffixes or one full regex; ``"all"``: every chain); None: the chains that already have a single-slope
    PReLU (a network built for LayerCollapse), or every chain when there are none. Then ``exclude_modules``
    drops names and ``last_k`` keeps the last k."""
    chains = find_chains(net)
    if target_modules is None:
        built = [c for c in chains if isinstance(net.get_submodule(c.act), nn.PReLU)]
        chosen = built or chains
    elif target_modules in ("all", "all-linear"):
        chosen = chains
    else:
        chosen = [c for c in chains if name_matches(c.name, target_modules)]
    chosen = [c for c in chosen if not name_matches(c.name, exclude_modules)]
    if last_k:
        chosen = chosen[-last_k:]
    if not chosen:
        found = ", ".join(c.name for c in chains[:4]) or "none"
        raise ValueError(
            f"layercollapse: {network_name(net)} has no collapsible chain (Linear -> activation -> [Dropout / "
            f"BatchNorm1d] -> Linear, children of one module) matching target_modules {target_modules!r} / "
            f"exclude_modules {exclude_modules!r} / last_k_blocks {last_k}; its chains: {found}. Pick chains by "
            f"those names, or use a technique that works on any layer (MorphoNet, LoRA)."
        )
    return chosen


class LayerCollapse(ClassificationModule):
    """Compression-aware training of any network with collapsible chains.

    Args:
        net, input_shape, num_classes, optimizer, lr_scheduler: see ``ClassificationModule``.
        lc_weight: lambda of the regulariser (>= 0; spec defaults 0.5 from scratch, 5 when fine-tuning).
        lc_warmup_epochs: lambda grows linearly from 0 over this many epochs (0: constant).
        target_modules, exclude_modules: which chains, by name (``select_chains``); a chain is named by the
            module that holds it (``blocks.3.mlp``, ``layers.block0``) or, when that module holds several (a VGG
            classifier), by its activation (``classifier.1``).
        last_k_blocks: keep only the last k selected chains.
        slope_init: initial slope of the PReLU that replaces an activation other than (leaky) ReLU.
        regularize_prelus: regexes; single-slope PReLUs outside the chains (e.g. ``features\\..*`` of the custom
            VGG) whose module paths match are regularised too but never collapsed ("LC as a regulariser", A3).
        collapse_threshold: tau; a selected chain collapses when |a - 1| < tau (spec: 0.05).
        slope_lr: learning rate of the PReLU slopes (None: the optimizer's). Adam moves a parameter by about
            lr per step whatever lambda is, so with lr 1e-3 a slope needs ~1,000 steps to travel from 0.01 to 1;
            a larger slope_lr lets a short (progressive) stage get there.
    """

    technique = "layercollapse"

    def __init__(
        self,
        net: NetworkFactory,
        input_shape: Sequence[int],
        num_classes: int,
        lc_weight: NonNegativeFloat = 0.5,
        lc_warmup_epochs: NonNegativeInt = 0,
        target_modules: TargetModules | None = None,
        exclude_modules: TargetModules | None = None,
        last_k_blocks: PositiveInt | None = None,
        slope_init: float = 0.01,
        regularize_prelus: list[str] | None = None,
        collapse_threshold: OpenFraction = 0.05,
        slope_lr: PositiveFloat | None = None,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(net, input_shape, num_classes, optimizer, lr_scheduler)
        self.lc_weight, self.lc_warmup_epochs, self.collapse_threshold = lc_weight, lc_warmup_epochs, collapse_threshold
        self.slope_lr = slope_lr
        self.chains = {c.name: c for c in select_chains(self.net, target_modules, exclude_modules, last_k_blocks)}
        self.conversion_change = self._convert(slope_init)
        self.collapsed_blocks: list[str] = []  # collapsed in place during training, in order
        self.controls = CollapseStage()  # ProgressiveCollapse sets the chains regularised now
        patterns = [re.compile(p) for p in regularize_prelus or []]
        acts = {c.act for c in self.chains.values()}
        self.extra_prelus = {
            name: m for name, m in self.net.named_modules()
            if isinstance(m, nn.PReLU) and m.weight.numel() == 1 and any(p.search(name) for p in patterns) and name not in acts
        }
        if patterns and not self.extra_prelus:
            raise ValueError(f"model.regularize_prelus {regularize_prelus} matches no single-slope PReLU of model.net.")
        self.test_acc_uncollapsed = MulticlassAccuracy(num_classes, average="micro")
        self._collapsed_copy: nn.Module | None = None

    @torch.no_grad()
    def _convert(self, slope_init: float) -> dict[str, float]:
        """Single-slope PReLUs into the selected chains; the largest |change| of the logits on a random batch,
        per chain whose function changed (none for ReLU / LeakyReLU / PReLU)."""
        if all(keeps_function(self.net.get_submodule(c.act)) for c in self.chains.values()):
            to_prelu_(self.net, self.chains.values(), slope_init)  # exact: nothing to measure (no forward passes)
            return {}
        was_training = self.net.training
        self.net.eval()
        if hasattr(self.net, "example_input"):  # dict inputs (text): the network's own example
            x = self.net.example_input()
        else:
            x = torch.randn(4, *self.input_shape, generator=torch.Generator().manual_seed(0))
        before = self.net(x)
        changed = to_prelu_(self.net, self.chains.values(), slope_init)
        after = self.net(x)
        self.net.train(was_training)
        change = float((after - before).abs().max())
        rank_zero_info(f"[layercollapse] {len(changed)} chain(s) got PReLU({slope_init}) for another activation: "
                       f"the logits moved by up to {change:.3g} on a random batch (fine-tune to recover).")
        return {name: change for name in changed}

    # --- selection and regulariser --------------------------------------------------------------------------
    def selected_block_names(self) -> list[str]:
        """Names of the selected chains, collapsed ones included, in module order (a fixed list: collapsing a
        chain does not shift "the last k" to another one)."""
        return list(self.chains)

    def slopes(self) -> dict[str, float]:
        """The slope of each selected chain not collapsed yet."""
        return {n: slope(self.net, c) for n, c in self.chains.items() if n not in self.collapsed_blocks}

    def regularized_slopes(self) -> dict[str, Tensor]:
        """Slope parameters in the penalty now: the selected (or, progressively, active) chains and the extra PReLUs."""
        names = [n for n in self.chains if n not in self.collapsed_blocks]
        active = self.controls.active_blocks
        if active is not None:
            names = [n for n in names if n in active]
        slopes = {n: self.net.get_submodule(self.chains[n].act).weight for n in names}
        slopes.update({n: m.weight for n, m in self.extra_prelus.items()})
        return slopes

    def current_lambda(self) -> float:
        if self.lc_warmup_epochs == 0:
            return self.lc_weight
        return self.lc_weight * min(1.0, (self.current_epoch + 1) / self.lc_warmup_epochs)

    def regularization(self) -> Tensor | None:
        slopes = list(self.regularized_slopes().values())
        if not slopes or self.lc_weight == 0:
            return None
        return self.current_lambda() * sum(((a - 1.0) ** 2).sum() for a in slopes)

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        self.log("sched/lambda", self.current_lambda())
        for name, value in self.slopes().items():
            self.log(f"compact/slope/{name}", value)
        for name in self.collapsed_blocks:  # collapsed = exactly linear: slope 1 (a resumed run logs the same)
            self.log(f"compact/slope/{name}", 1.0)
        self.log("compact/collapsed_blocks", float(len(self.collapsed_blocks)))

    def optimizer_parameters(self) -> Any:
        slopes = [m.weight for m in self.net.modules() if isinstance(m, nn.PReLU)]
        ids = {id(p) for p in slopes}
        others = [p for p in self.net.parameters() if id(p) not in ids and p.requires_grad]
        slope_group = {"params": slopes, "weight_decay": 0.0}  # slopes never decay
        if self.slope_lr is not None:
            slope_group["lr"] = self.slope_lr
        return [{"params": others}, slope_group]

    # --- collapse -------------------------------------------------------------------------------------------
    def collapsible_now(self) -> list[str]:
        """Selected chains not collapsed yet with |a - 1| < tau."""
        return [n for n, a in self.slopes().items() if abs(a - 1.0) < self.collapse_threshold]

    @torch.no_grad()
    def collapse_in_place(self, names: Sequence[str] | None = None) -> list[str]:
        """Collapse ``names`` (default: ``collapsible_now()``) in the trained network itself and hand the optimizer
        the new parameters; returns the collapsed names."""
        names = self.collapsible_now() if names is None else list(names)
        if not names:
            return []
        collapse_chains_(self.net, list(self.chains.values()), names, before=self.collapsed_blocks)
        self.collapsed_blocks += names
        after_structure_change(self)
        return names

    def deployed_model(self) -> nn.Module:
        """A copy with every selected block within ``collapse_threshold`` of linear merged into one Linear."""
        collapsed = copy.deepcopy(self.net).eval()
        collapse_chains_(collapsed, list(self.chains.values()), self.collapsible_now(), before=self.collapsed_blocks)
        return collapsed

    def on_test_start(self) -> None:
        super().on_test_start()
        self._collapsed_copy = self.deployed_model().to(self.device)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.test_acc_uncollapsed(self.net(x), y)
        self.log("test/acc_uncollapsed", self.test_acc_uncollapsed, on_step=False, on_epoch=True)
        logits = self._collapsed_copy(x)
        self.log_eval_loss("test", logits, y)
        self.test_metrics(logits, y)
        self.log_dict(self.test_metrics, on_step=False, on_epoch=True)

    def on_test_end(self) -> None:
        super().on_test_end()
        self._collapsed_copy = None

    def extra_deployables(self) -> dict[str, nn.Module]:
        return {"uncollapsed": copy.deepcopy(self.net).eval()}  # the network as trained, for before/after comparisons

    # --- structure in checkpoints ---------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["morphlab"]["collapsed_blocks"] = list(self.collapsed_blocks)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        names = list(checkpoint.get("morphlab", {}).get("collapsed_blocks", []))
        extra = [n for n in self.collapsed_blocks if n not in names]
        if extra:
            raise ValueError(f"this network has {extra} collapsed, the checkpoint does not: load it into a fresh model.")
        rebuild_collapsed_chains_(self.net, list(self.chains.values()), [n for n in names if n not in self.collapsed_blocks],
                                  before=self.collapsed_blocks)
        self.collapsed_blocks = names

    @torch.no_grad()
    def collapse_error(self, deployed: nn.Module) -> dict[str, float]:
        """Max |logit difference| on a random batch between the deployed network and (a) the network with the
        collapsed chains' slopes set to 1, which the collapse must equal, (b) the network as trained."""
        if hasattr(self.net, "example_input"):
            return {}
        x = torch.randn(64, *self.input_shape, generator=torch.Generator().manual_seed(0)).to(self.device)
        linear = copy.deepcopy(self.net).eval()
        for name in self.collapsible_now():
            linear.get_submodule(self.chains[name].act).weight.fill_(1.0)
        y = deployed.eval()(x)
        return {"vs_linearised": float((y - linear(x)).abs().max()),
                "vs_trained": float((y - copy.deepcopy(self.net).eval()(x)).abs().max()),
                "logit_scale": float(y.abs().max())}

    def summary_extras(self, deployed: nn.Module) -> dict[str, Any]:
        original = self.net_factory(self.input_shape, self.num_classes)
        return {
            "layercollapse": {
                "chains_found": len(find_chains(original)),
                "chains_selected": len(self.chains),
                "collapse_max_abs_diff": self.collapse_error(deployed),
                "slopes": {name: round(value, 5) for name, value in self.slopes().items()},
                "conversion_change": self.conversion_change,
                "collapsed_in_training": list(self.collapsed_blocks),
                "collapsed_at_test": self.collapsed_blocks + self.collapsible_now(),
                "params_original": sum(p.numel() for p in original.parameters()),
                "params_before": sum(p.numel() for p in self.net.parameters()),
                "params_after": sum(p.numel() for p in deployed.parameters()),
                "threshold": self.collapse_threshold,
            }
        }
