"""Data-parallel training that gives the run of one process: the global batch, split across processes.

``data.batch_size`` is the *global* batch: with ``W`` processes, rank ``r`` gets the ``r``-th of ``W`` near-equal
slices of every batch (``datamodules.tensor_data.EpochBatchSampler``). Three things make the W-process run the
one-process run up to float rounding:

- the loss of rank ``r`` is ``Σ_{i ∈ slice r} ce_i · W / N`` (``N`` the global batch size), so DDP's gradient
  average ``(1/W) Σ_r ∇loss_r`` is the gradient of the global batch mean, even when the last batch does not split
  evenly, and a term that is the same on every rank (a regulariser) keeps its weight;
- BatchNorm normalises with the statistics of the global batch, and ``nn.Dropout`` draws the global batch's mask
  and keeps this rank's rows (:class:`GlobalBatchLayers`);
- metrics are torchmetrics states, summed over processes before they are computed.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from types import MethodType

import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.plugins import LayerSync
from torch import Tensor, nn
from torch.distributed.nn.functional import all_reduce as differentiable_all_reduce
from torch.nn.modules.batchnorm import _BatchNorm

# Every value morphlab logs at epoch level is a torchmetrics result (already summed over processes) or the same on
# every process (schedules, densities, slopes): Lightning's advice to add sync_dist=True to each would only add
# all-reduces that change nothing.
warnings.filterwarnings("ignore", message=r".*It is recommended to use `self\.log\(.*sync_dist=True")
# torch 2.14 deprecates torch.distributed.nn.functional in favour of the private _functional_collectives; the public,
# documented, differentiable all_reduce is kept until a public replacement exists.
warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.all_reduce is deprecated")


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def global_batch_cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    """Mean cross-entropy in one process; in ``W`` processes this rank's ``Σ ce_i · W / N`` (see module docstring)."""
    world = world_size()
    if world == 1:
        return F.cross_entropy(logits, y)
    n = torch.tensor(float(len(y)), device=logits.device)
    dist.all_reduce(n)
    return F.cross_entropy(logits, y, reduction="sum") * (world / n)


def average_gradients(parameters: Iterable[nn.Parameter]) -> None:
    """DDP's gradient average, for a plain loop outside the DDP-wrapped module (NeuMeta's pretraining)."""
    world = world_size()
    if world == 1:
        return
    for p in parameters:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world


def dropout_rows(x: Tensor, p: float, total: int, start: int) -> Tensor:
    """Rows ``start:start + len(x)`` of ``F.dropout`` applied to a batch of ``total`` rows: the mask of the whole
    batch is drawn as ATen's CPU dropout draws it (``empty.bernoulli_(1 - p).div_(1 - p)``), so every process
    consumes the same random numbers and keeps the mask rows of its own samples."""
    if p == 1.0:
        return x * 0.0
    noise = torch.empty((total, *x.shape[1:]), dtype=x.dtype, device=x.device).bernoulli_(1 - p).div_(1 - p)
    return x * noise[start : start + len(x)]


def _global_batch_dropout_forward(self: nn.Dropout, x: Tensor) -> Tensor:
    if not (self.training and self.p > 0 and world_size() > 1):
        return type(self).forward(self, x)
    sizes = [torch.zeros((), dtype=torch.long, device=x.device) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor(len(x), device=x.device))
    sizes = [int(n) for n in sizes]
    return dropout_rows(x, self.p, sum(sizes), sum(sizes[: dist.get_rank()]))


def _global_batch_norm_forward(self: _BatchNorm, x: Tensor) -> Tensor:
    """``BatchNorm`` with the mean and (biased) variance of the global batch: sums are all-reduced with autograd,
    so the gradient also flows through the other processes' statistics, as in one process."""
    if not (self.training and world_size() > 1):
        return type(self).forward(self, x)
    dims = [0, *range(2, x.dim())]
    shape = [1, -1] + [1] * (x.dim() - 2)
    count = torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype, device=x.device)
    sums = differentiable_all_reduce(torch.cat([x.sum(dims), count]))
    n = sums[-1].detach()
    mean = sums[:-1] / n
    centred = x - mean.view(shape)  # two passes, as F.batch_norm, rather than E[x²] - E[x]²
    var = differentiable_all_reduce((centred * centred).sum(dims)) / n
    out = centred * torch.rsqrt(var + self.eps).view(shape)
    if self.affine:
        out = out * self.weight.view(shape) + self.bias.view(shape)
    if self.track_running_stats:
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
            self.running_mean.lerp_(mean.detach(), factor)
            self.running_var.lerp_(var.detach() * n / (n - 1).clamp(min=1), factor)
    return out


def rewrap_after_structure_change(trainer) -> None:
    """After modules were replaced during ``fit`` (LayerCollapse merges a block into a new Linear), wrap the
    LightningModule in a new ``DistributedDataParallel``: the old wrapper's reducer knows only the old parameters
    (their gradients would go missing, the new ones would never be averaged). A collective: every rank calls it at
    the same point. No effect outside DDP. Uses ``DDPStrategy._setup_model``, Lightning's own wrapping step."""
    from lightning.pytorch.strategies import DDPStrategy

    strategy = trainer.strategy
    if isinstance(strategy, DDPStrategy) and trainer.world_size > 1:
        strategy.model = strategy._setup_model(strategy.lightning_module)


class GlobalBatchLayers(LayerSync):
    """Lightning plugin: under DDP, every BatchNorm layer normalises with the global batch's statistics and every
    ``nn.Dropout`` applies the global batch's mask, as in one process.

    On NCCL (GPUs) BatchNorm becomes ``torch.nn.SyncBatchNorm`` (torch's fused kernels), turned back into the very
    class it was after fit, holding the same parameters (Lightning's ``TorchSyncBatchNorm`` does not keep the class:
    its revert gives a private ``_BatchNormXd``). On gloo (CPUs), where SyncBatchNorm refuses CPU tensors, the layers
    keep their class and their ``forward`` is replaced by ``_global_batch_norm_forward``, the same computation.
    Nothing in torch draws one dropout mask across processes, so ``nn.Dropout``'s forward is replaced on every
    backend. Functional dropout inside third-party models (``F.dropout`` in BERT's attention) stays per process.
    One process: no effect. ``train.py`` adds the plugin by default; ``--trainer.plugins=null`` removes it.
    """

    FORWARDS = ((_BatchNorm, _global_batch_norm_forward), (nn.Dropout, _global_batch_dropout_forward))

    def __init__(self) -> None:
        self._batchnorm_classes: dict[str, type[nn.Module]] = {}  # what each SyncBatchNorm was (NCCL only)

    @staticmethod
    def on_nccl() -> bool:
        """Whether this process's default group runs on NCCL (the strategy sets it up before ``apply``)."""
        return dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl"

    def apply(self, model: nn.Module) -> nn.Module:
        sync_batchnorm = self.on_nccl()
        if sync_batchnorm:
            self._batchnorm_classes = {n: type(m) for n, m in model.named_modules() if isinstance(m, _BatchNorm) and n}
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        for module in model.modules():
            for kind, forward in self.FORWARDS:
                if isinstance(module, kind) and not (sync_batchnorm and kind is _BatchNorm):
                    module.forward = MethodType(forward, module)
        return model

    def revert(self, model: nn.Module) -> nn.Module:
        for module in model.modules():
            if "forward" in vars(module) and isinstance(module, tuple(kind for kind, _ in self.FORWARDS)):
                del module.forward
        for name, cls in self._batchnorm_classes.items():
            sync = model.get_submodule(name)
            if isinstance(sync, nn.SyncBatchNorm):
                model.set_submodule(name, _as_class(sync, cls))
        self._batchnorm_classes = {}
        return model


def _as_class(sync: nn.SyncBatchNorm, cls: type[nn.Module]) -> nn.Module:
    """``sync``'s layer as a ``cls`` holding the same parameter and buffer tensors (an optimizer keeps them)."""
    layer = cls(sync.num_features, sync.eps, sync.momentum, sync.affine, sync.track_running_stats)
    for name, tensor in [*sync.named_parameters(recurse=False), *sync.named_buffers(recurse=False)]:
        setattr(layer, name, tensor)
    return layer.train(sync.training)
