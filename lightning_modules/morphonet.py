"""MorphoNet: learned connection masks ``W * sigmoid(M / T)`` (spec: shared/specs/morphreuse_morphonet.md section 2).

The network (``models.morphonet``) holds weights W and mask logits M. This module trains both with two
optimisers stepped together after one backward pass (manual optimisation): AdamW on the weights (``weight_lr``,
``weight_decay``, cosine LR over the run) and Adam on the mask logits (``mask_lr``, no weight decay), the
gradient norm of all parameters clipped jointly. Callbacks drive the rest: ``TemperatureAnnealing`` sets T,
``SparsityScheduler`` sets the target density, ``ProgressivePruning`` prunes during training.

Sparsity penalty, by ``mode``:

* ``parity`` (spec 2.1-2.5): ``R = lambda * sum_l mean(sigmoid(M_l / T))``, constant lambda (0.002). It barely
  acts: the upstream masks densify during training (spec 2.9).
* ``intended`` (spec 2.6): ``R = lambda * N * (D - d_t)^2`` where D is the density over all N masked
  connections and ``d_t = 1 - s_t`` the scheduled target density. D's value is the hard density 1[M > 0], its
  gradient that of the soft density sigmoid(M/T) (straight-through), so the penalty is zero only when the
  connections that are really on match the target. Scaling by N makes the push on each
  connection, ``2 lambda (D - d_t) sigmoid'(M/T) / T``, independent of the network's size, so one lambda
  controls the achieved sparsity on Moons and on FashionMNIST alike. Masks are frozen during the scheduler's
  warm-up. With ``budget: flops`` (unit gates) D is the fraction of the FLOPs the export keeps
  (``models.flop_budget``) and N the number of gates: the push on gate i is ``2 lambda (D - d_t) F_i / mean F``
  times sigmoid'(M/T) / T, F_i the FLOPs it removes, instead of one proportional to its row's weight count.

Evaluation (``eval_mask``): ``soft`` (parity: the soft-masked model, as upstream reports), ``hard`` (M > 0) or
``exported`` (default in intended mode): the final prune, the hard mask folded into plain layers and dead
channels removed (``MaskedNetwork.export``, ``models.morphonet_export``) - the physically smaller model that is
deployed.
"""

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from callbacks.controls import MaskSchedule
from callbacks.sparsity import SparsityScheduler
from lightning_modules.base import ClassificationModule, NetworkFactory
from constraints import Fraction, NonNegativeFloat, PositiveFloat, Probability
from lightning_modules.text_hooks import DictInputNetwork
from models.masked_network import Granularity, MaskedNetwork
from models.masks import Budget
from models.targets import TargetModules
from models.morphonet_export import export_summary


class MorphoNet(ClassificationModule):
    """Learned-mask training; see the module docstring.

    Args:
        net, input_shape, num_classes: see ``ClassificationModule`` (a ``models.morphonet`` network).
        mode: ``parity`` or ``intended`` (the sparsity penalty above).
        weight_lr, weight_decay: AdamW on the weights (cosine-annealed over ``trainer.max_epochs``).
        mask_lr: Adam on the mask logits (constant, no weight decay).
        grad_clip: joint gradient-norm clip over all parameters (0 disables).
        sparsity_weight: lambda of the penalty (parity 0.002; intended default 0.05).
        final_prune_threshold: before export, entries with sigmoid(M/T) below this are pruned (spec: 0.2).
        eval_mask: ``soft``, ``hard`` or ``exported`` (validation and test); default: soft in parity, exported in
            intended mode. Validation during training uses the hard mask whenever eval_mask is not soft.
        target_modules, exclude_modules, granularity, init_density: for a plain network (any ``nn.Module``, e.g.
            ``models.TorchvisionNet``), which Linear / Conv2d layers get masks and of which granularity
            (``connection`` or ``unit``; ``models.masked_network``). A ``models.Morpho*`` network holds its own
            connection masks and takes none of these.
        budget: what the target density counts: ``weights`` (masked weights) or ``flops`` (unit gates: the FLOPs
            of the exported network's Linear / Conv2d layers, ``models.flop_budget``).
    """

    technique = "morphonet"

    def __init__(
        self,
        net: NetworkFactory,
        input_shape: Sequence[int],
        num_classes: int,
        mode: Literal["parity", "intended"] = "parity",
        weight_lr: PositiveFloat = 1e-3,
        weight_decay: NonNegativeFloat = 0.01,
        mask_lr: PositiveFloat = 0.02,
        grad_clip: NonNegativeFloat = 5.0,
        sparsity_weight: NonNegativeFloat | None = None,
        final_prune_threshold: Fraction = 0.2,
        eval_mask: Literal["soft", "hard", "exported"] | None = None,
        target_modules: TargetModules | None = None,
        exclude_modules: TargetModules | None = None,
        granularity: Granularity = "connection",
        init_density: Probability | None = None,
        budget: Budget = "weights",
    ) -> None:
        super().__init__(net, input_shape, num_classes)  # the two optimisers are built in configure_optimizers
        self.automatic_optimization = False
        self.mode = mode
        self.weight_lr, self.weight_decay, self.mask_lr, self.grad_clip = weight_lr, weight_decay, mask_lr, grad_clip
        self.sparsity_weight = sparsity_weight if sparsity_weight is not None else (0.002 if mode == "parity" else 0.05)
        self.final_prune_threshold = final_prune_threshold
        self.eval_mask = eval_mask or ("soft" if mode == "parity" else "exported")
        self.budget = budget
        self.controls = MaskSchedule()  # SparsityScheduler sets the target density and the warm-up freeze
        self.density_at_start: float | None = None
        self._exported: nn.Module | None = None

    def build_network(self, net: NetworkFactory) -> nn.Module:
        """A preset (``models.Morpho*``, already masked) as it is; any other network with masks on its targets."""
        network = super().build_network(net)
        h = self.hparams
        if isinstance(network, MaskedNetwork):
            given = [k for k in ("target_modules", "exclude_modules", "init_density") if h[k] is not None]
            given += ["granularity"] if h.granularity != "connection" else []
            given += ["budget"] if h.budget != "weights" else []
            if given:
                raise ValueError(f"model.net {type(network).__name__} holds its own connection masks: drop "
                                 f"model.init_args.{' / '.join(given)} (its init_density is model.net's), or give "
                                 "a plain network.")
            return network
        if isinstance(network, DictInputNetwork):
            raise ValueError(f"lightning_modules.MorphoNet puts masks on image and tabular networks; "
                             f"{type(network).__name__} takes token dicts: use models.MorphoTransformer.")
        if h.budget == "flops" and h.granularity != "unit":
            raise ValueError("model.init_args.budget flops counts the FLOPs that unit gates remove; connection masks "
                             "leave the export's FLOPs dense: set model.init_args.granularity unit or budget weights.")
        return MaskedNetwork(network, torch.zeros(1, *self.input_shape), target_modules=h.target_modules or "all-linear",
                             exclude_modules=h.exclude_modules, granularity=h.granularity, init_density=h.init_density)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit" and self.mode == "intended" and not any(isinstance(c, SparsityScheduler) for c in self.trainer.callbacks):
            raise ValueError("model.mode intended pulls the masks toward a scheduled target density: add "
                             "callbacks.SparsityScheduler to trainer.callbacks (or use mode: parity).")

    # --- loss -----------------------------------------------------------------------------------------------
    def regularization(self) -> Tensor:
        target = self.controls.target_density
        if self.mode == "parity" or target is None:
            return self.sparsity_weight * self.net.mask_penalty()
        # Straight-through density: the value is the hard density (what is exported), the gradient the soft
        # one's. A penalty on the soft density alone is met by shrinking logits toward 0 instead of switching
        # connections off (on Moons it reached soft 0.30 at hard 0.40).
        density = self.net.kept_fraction(self.budget)
        return self.sparsity_weight * self.net.penalty_count(self.budget) * (density - target) ** 2

    def density(self) -> float:
        """The fraction of the budget (weights or FLOPs) the hard masks keep: what the target density counts."""
        with torch.no_grad():
            return float(self.net.kept_fraction(self.budget))

    # --- optimisation ---------------------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        weights = torch.optim.AdamW(self.net.weight_parameters(), lr=self.weight_lr, weight_decay=self.weight_decay)
        masks = torch.optim.Adam(self.net.mask_parameters(), lr=self.mask_lr)
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(weights, T_max=max(self.trainer.max_epochs or 1, 1))
        return [weights, masks], [cosine]

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        weights, masks = self.optimizers()
        loss = self.training_loss(batch)
        weights.zero_grad()
        masks.zero_grad()
        self.manual_backward(loss)
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for p in self.parameters() if p.grad is not None], self.grad_clip)
        weights.step()
        if not self.controls.masks_frozen:
            masks.step()
        return loss

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        # Manual optimisation: step the cosine schedule to the current epoch here, not at the epoch's end,
        # which comes after the epoch's checkpoint (a resumed run would repeat one learning rate).
        scheduler = self.lr_schedulers()
        while scheduler.last_epoch < self.current_epoch:
            scheduler.step()

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        self.log("compact/density", self.density())
        self.log("compact/sparsity", 1.0 - self.density())

    # --- evaluation -----------------------------------------------------------------------------------------
    def export(self) -> nn.Module:
        """Final prune (on a copy), hard mask folded in, dead units removed: the deployed model."""
        return self.net.export(prune_threshold=self.final_prune_threshold)

    def deployed_model(self) -> nn.Module:
        return self.export()

    def _set_eval_mask(self) -> None:
        self.net.set_mask_mode("soft" if self.eval_mask == "soft" else "hard")

    def on_validation_start(self) -> None:
        self._set_eval_mask()

    def on_validation_end(self) -> None:
        self.net.set_mask_mode("soft")

    def on_test_start(self) -> None:
        super().on_test_start()
        self._set_eval_mask()
        self._exported = self.export().to(self.device).eval() if self.eval_mask == "exported" else None

    def on_test_end(self) -> None:
        self.net.set_mask_mode("soft")
        super().on_test_end()
        self._exported = None

    def forward(self, x: Tensor) -> Tensor:
        if self._exported is not None and not self.training:
            return self._exported(x)
        return self.net(x)

    # --- bookkeeping ----------------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.density_at_start is None:
            self.density_at_start = self.density()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["morphlab"]["density_at_start"] = self.density_at_start

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.density_at_start = checkpoint.get("morphlab", {}).get("density_at_start")

    def summary_extras(self, deployed: nn.Module) -> dict[str, Any]:
        return {
            "morphonet": {
                "mode": self.mode,
                "eval_mask": self.eval_mask,
                "hard_sparsity_start": None if self.density_at_start is None else 1.0 - self.density_at_start,
                "budget": self.budget,
                "hard_sparsity_end": 1.0 - self.density(),
                "layer_density": [round(float(layer.density()), 4) for layer in self.net.morpho_layers()],
                "mask_on": int(sum(int((layer.mask_logits > 0).sum()) for layer in self.net.morpho_layers())),
                "export": export_summary(self.net, deployed),
            }
        }
