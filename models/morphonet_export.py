"""Export a trained MorphoNet network as the plain, physically smaller model it amounts to (spec 2.5).

``export_pruned(model)`` returns a NEW ``nn.Sequential`` of ``nn.Linear`` / ``nn.Conv2d`` / ``nn.ReLU`` /
``nn.AdaptiveAvgPool2d`` / ``nn.Flatten`` / ``nn.Dropout`` (and ``SkipLinear`` for a skip-connected layer) that
predicts exactly what ``model`` predicts with ``set_mask_mode("hard")`` in eval mode:

1. the hard mask is folded into the weights (W <- W * 1[M > 0]); mask logits disappear; a BatchNorm that
   directly follows a layer is folded into it with its running statistics (eval semantics), so the skip scale
   of a skip-connected layer becomes a per-unit vector sigmoid(g) * gamma / sqrt(var + eps);
2. hidden units that cannot influence the output are removed, repeatedly until nothing changes:
   * a unit whose outgoing weights in the next layer are all zero is dropped;
   * a unit whose incoming weights are all zero outputs the constant c = act(b) (BN folded); it is dropped and
     ``W_next[:, j] * c`` is added to the next layer's bias. For a conv channel the constant map passes ReLU,
     average pooling and flattening unchanged, so it folds into the following linear layer's bias (summed over
     the pooled positions it feeds). Before another conv a constant channel is only dropped when c == 0:
     zero padding makes a non-zero constant's contribution position dependent;
   * a skip connection (in == out) ties unit j of the layer's input to unit j of its output: the chain of tied
     units is removed only as a whole, when a leading part of it is constant (no weight enters it from outside
     the chain; its outgoing weights are folded into biases) and the rest is unread (no weight leaves it to
     outside the chain) - all-constant and all-unread chains included - and never when it reaches the input
     features or the output classes;
   input features and output classes are never removed.

The returned model is in eval mode (BatchNorm is folded, so training it would not be equivalent anyway).

For ``MorphoTransformer`` no unit is removed: the export is a copy whose MorphoLinear layers are plain
``nn.Linear`` with the hard mask folded in and whose attentions are plain ``SelfAttention`` with the per-head
score scale sigmoid(m_h / T) folded into the query projection (no mask parameters remain; the container class
stays ``MorphoTransformer`` so that it takes the same dict batches).
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from models.accounting import count_dense_equivalent, count_nonzero
from models.masked_network import MaskedNetwork
from models.morphonet import MaskedLayer, MorphoAttention, MorphoConv2d, MorphoLinear, MorphoTransformer, SelfAttention

PASS_THROUGH = (nn.ReLU, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Dropout, nn.Identity)
"""Modules allowed between two weight layers: they map a constant feature map to a constant."""


class SkipLinear(nn.Linear):
    """``y = x W^T + b + s * x`` with s a scalar or a per-unit vector (an exported skip-connected layer)."""

    def __init__(self, in_features: int, out_features: int, skip_scale: Tensor, **kwargs: Any) -> None:
        super().__init__(in_features, out_features, **kwargs)
        self.skip_scale = nn.Parameter(skip_scale.to(self.weight).clone())

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) + self.skip_scale * x


@dataclass
class _Layer:
    """One weight layer of the chain, hard mask and BN folded in, plus the pass-through modules after it."""

    weight: Tensor  # (out, in) or (out, in, k, k)
    bias: Tensor
    skip: Tensor | None = None  # scale of the identity path (linear, in == out): scalar or (out,)
    conv: dict[str, Any] | None = None  # stride / padding of a convolution
    after: list[nn.Module] = field(default_factory=list)
    group: int = 1  # input columns fed by one producer unit (a linear layer after a flattened conv: H * W)

    @property
    def relu(self) -> bool:
        return any(isinstance(m, nn.ReLU) for m in self.after)

    def feeds(self) -> Tensor:
        """(out, producer units) bool: which input units this layer's outputs read (skip diagonal excluded)."""
        nz = self.weight != 0
        nz = nz.flatten(2).any(-1) if self.conv else nz.view(nz.shape[0], nz.shape[1] // self.group, self.group).any(-1)
        if self.skip is not None:
            nz.fill_diagonal_(False)
        return nz

    def act(self, value: Tensor) -> Tensor:
        return value.clamp(min=0) if self.relu else value


def _parse(sequential: nn.Sequential) -> tuple[list[nn.Module], list[_Layer]]:
    prefix: list[nn.Module] = []
    layers: list[_Layer] = []
    for module in sequential:
        if isinstance(module, (MorphoLinear, nn.Linear, MorphoConv2d, nn.Conv2d)):
            masked = isinstance(module, MaskedLayer)
            weight = module.masked_weight(hard=True) if masked else module.weight
            bias = module.bias if module.bias is not None else weight.new_zeros(weight.shape[0])
            skip = torch.sigmoid(module.skip_gate) if masked and module.skip_gate is not None else None
            conv = None
            if isinstance(module, (MorphoConv2d, nn.Conv2d)):
                conv = {"stride": module.stride, "padding": module.padding}
                if not masked and (module.groups != 1 or module.dilation != (1, 1) or module.padding_mode != "zeros"):
                    raise ValueError("export_pruned supports plain convolutions (groups 1, dilation 1, zero padding).")
            group = 1
            if layers and layers[-1].conv and conv is None:
                group = weight.shape[1] // layers[-1].weight.shape[0]
            skip = None if skip is None else skip.detach().clone()
            layers.append(_Layer(weight.detach().clone(), bias.detach().clone(), skip, conv, [], group))
        elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)) and layers and not layers[-1].after:
            if module.running_var is None:
                raise ValueError("export_pruned folds BatchNorm with its running statistics (track_running_stats).")
            layer = layers[-1]
            scale = (module.weight if module.affine else 1.0) / torch.sqrt(module.running_var + module.eps)
            shift = module.bias if module.affine else 0.0
            scale, shift = torch.as_tensor(scale).detach(), torch.as_tensor(shift).detach()
            layer.weight = layer.weight * scale.view(-1, *[1] * (layer.weight.dim() - 1))
            layer.bias = (layer.bias - module.running_mean) * scale + shift
            if layer.skip is not None:
                layer.skip = layer.skip * scale
        elif isinstance(module, PASS_THROUGH):
            (layers[-1].after if layers else prefix).append(copy.deepcopy(module))
        else:
            raise ValueError(f"export_pruned cannot handle {type(module).__name__} here (supported: Linear/Conv2d, "
                             "a BatchNorm right after them, ReLU, AdaptiveAvgPool2d, Flatten, Dropout).")
    return prefix, layers


def _removal_pass(layers: list[_Layer]) -> bool:
    """Remove every currently removable chain of hidden units once; True if anything was removed."""
    n = len(layers)  # activation a (1..n-1) is produced by layers[a-1] and read by layers[a]
    feeds = [layer.feeds() for layer in layers]
    unread = [[]] + [(~feeds[a].any(0)).tolist() for a in range(1, n)]  # no weight leaves the unit
    unfed = [[]] + [(~feeds[a - 1].any(1)).tolist() for a in range(1, n)]  # no weight enters the unit
    remove = [None] + [torch.zeros(len(unread[a]), dtype=torch.bool) for a in range(1, n)]
    const = [None] + [torch.zeros_like(layers[a - 1].bias) for a in range(1, n)]
    for start in range(1, n):
        if layers[start - 1].skip is not None:
            continue  # tied to the previous activation (or the input): handled from the chain's start
        end = start
        while end < n and layers[end].skip is not None:
            end += 1
        if end == n:
            continue  # the chain reaches the output classes
        chain = range(start, end + 1)
        for j in range(len(unread[start])):
            # a constant prefix of the chain (no weight enters it) folds into the next biases; the rest of the
            # chain must be unread (no weight leaves it): then the whole chain goes
            values, value = [], None
            for a in chain:
                if not unfed[a][j]:
                    break
                producer = layers[a - 1]
                pre = producer.bias[j]
                if value is not None:  # the previous chain unit, through the diagonal weight and the skip path
                    pre = pre + (producer.weight[j, j] + _skip_at(producer, j)) * value
                value = producer.act(pre)
                if layers[a].conv and bool(value != 0) and not unread[a][j]:
                    break  # a non-zero constant map before a zero-padded conv is position dependent
                values.append(value)
            if all(unread[a][j] for a in chain[len(values):]):
                for a, v in zip(chain, values + [None] * (len(chain) - len(values))):
                    remove[a][j] = True
                    if v is not None:
                        const[a][j] = v
    changed = False
    for a in range(1, n):
        removed = remove[a].to(layers[a].weight.device)
        if not removed.any():
            continue
        changed = True
        consumer, producer, keep = layers[a], layers[a - 1], ~removed
        if not consumer.conv:  # fold the constants (zero for dead-ended units)
            out, cols = consumer.weight.shape
            per_unit = consumer.weight.view(out, cols // consumer.group, consumer.group).sum(-1)
            consumer.bias = consumer.bias + per_unit @ torch.where(removed, const[a], 0.0)
        producer.weight, producer.bias = producer.weight[keep], producer.bias[keep]
        if producer.skip is not None and producer.skip.dim() == 1:
            producer.skip = producer.skip[keep]
        consumer.weight = consumer.weight[:, keep if consumer.conv else keep.repeat_interleave(consumer.group)]
    return changed


def _skip_at(layer: _Layer, j: int) -> Tensor:
    return layer.skip if layer.skip.dim() == 0 else layer.skip[j]


def _materialise(make: Any, like: Tensor, state: dict[str, Tensor]) -> nn.Module:
    """Build ``make()`` on the meta device (no initialisation, the global RNG is left alone) and load ``state``."""
    with torch.device("meta"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")  # a layer whose units all died
        module = make()
    module = module.to_empty(device=like.device).to(like.dtype)
    module.load_state_dict({k: v.detach() for k, v in state.items()})
    return module


def _build(prefix: list[nn.Module], layers: list[_Layer]) -> nn.Sequential:
    modules = list(prefix)
    for layer in layers:
        w, state = layer.weight, {"weight": layer.weight, "bias": layer.bias}
        if layer.conv:
            module = _materialise(lambda: nn.Conv2d(w.shape[1], w.shape[0], tuple(w.shape[2:]), **layer.conv), w, state)
        elif layer.skip is not None:
            state["skip_scale"] = layer.skip
            module = _materialise(lambda: SkipLinear(w.shape[1], w.shape[0], layer.skip), w, state)
        else:
            module = _materialise(lambda: nn.Linear(w.shape[1], w.shape[0]), w, state)
        modules += [module, *layer.after]
    return nn.Sequential(*modules)


def _plain_linear(layer: MorphoLinear) -> nn.Linear:
    weight = layer.masked_weight(hard=True).detach()
    bias = layer.bias.detach() if layer.bias is not None else torch.zeros_like(weight[:, 0])
    skip = None if layer.skip_gate is None else torch.sigmoid(layer.skip_gate).detach()
    return _build([], [_Layer(weight, bias, skip)])[0]


def _plain_attention(attention: MorphoAttention) -> SelfAttention:
    """A plain ``SelfAttention`` with the head scale folded into the query rows of the qkv projection."""
    d = attention.d_model
    state = {k: v.detach().clone() for k, v in attention.state_dict().items() if k.startswith(("qkv.", "proj."))}
    scale = attention.head_scale().detach().repeat_interleave(attention.head_dim)  # (d,): one per query row
    state["qkv.weight"][:d] *= scale[:, None]
    state["qkv.bias"][:d] *= scale
    return _materialise(lambda: SelfAttention(d, attention.n_heads), attention.qkv.weight, state)


def _export_transformer(model: MorphoTransformer) -> MorphoTransformer:
    exported = copy.deepcopy(model)
    for name, module in list(exported.named_modules()):
        if isinstance(module, (MorphoLinear, MorphoAttention)):
            parent, _, child = name.rpartition(".")
            plain = _plain_linear(module) if isinstance(module, MorphoLinear) else _plain_attention(module)
            setattr(exported.get_submodule(parent), child, plain)
    return exported.eval()


@torch.no_grad()
def export_pruned(model: nn.Module, prune_threshold: float | None = None) -> nn.Module:
    """The deployed model of a MorphoNet network (see the module docstring); ``model`` is not changed.

    Args:
        model: a ``MorphoMLP``, ``MorphoCNN`` (anything with a ``layers`` Sequential of supported modules),
            ``MorphoTransformer`` or a ``models.masked_network.MaskedNetwork`` (any network; its own ``export``).
        prune_threshold: if given, ``prune_(prune_threshold)`` is applied to a copy of ``model`` first.
    """
    if isinstance(model, MaskedNetwork):  # before any copy: a copy made in Lightning's inference mode cannot be traced
        return model.export(prune_threshold)
    if prune_threshold is not None:
        model = copy.deepcopy(model)
        model.prune_(prune_threshold)
    if isinstance(model, MorphoTransformer):
        return _export_transformer(model)
    sequential = getattr(model, "layers", None)
    if not isinstance(sequential, nn.Sequential):
        raise TypeError(f"export_pruned needs a MorphoMLP, MorphoCNN or MorphoTransformer, got {type(model).__name__}.")
    prefix, layers = _parse(sequential)
    while _removal_pass(layers):
        pass
    return _build(prefix, layers).eval()


def _weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (MaskedLayer, nn.Linear, nn.Conv2d))]


def _widths(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, (MorphoConv2d, nn.Conv2d)):
        return module.in_channels, module.out_channels
    return module.in_features, module.out_features


def export_summary(model: nn.Module, exported: nn.Module) -> dict[str, Any]:
    """Per weight layer: in/out widths before and after export and the exported layer's parameter counts; plus
    totals (exported parameters, their non-zero count, the model's dense equivalent and hard-mask non-zero)."""
    hard = model.hard_plain() if isinstance(model, MaskedNetwork) else model
    before, after = _weight_layers(hard), _weight_layers(exported)
    if len(before) != len(after):
        raise ValueError(f"export_summary: {len(before)} weight layers in the model but {len(after)} in the export.")
    masked_names = {n for n, m in model.named_modules() if parametrize.is_parametrized(m)}
    masked_names = {n.removeprefix("net.") for n in masked_names}
    layers = []
    for (name, old), (_, new) in zip(before, after):
        (in_before, out_before), (in_after, out_after) = _widths(old), _widths(new)
        layers.append({
            "name": name,
            "kind": "conv" if isinstance(new, nn.Conv2d) else "linear",
            "masked": isinstance(old, MaskedLayer) or name in masked_names,
            "in_before": in_before, "out_before": out_before, "in_after": in_after, "out_after": out_after,
            "params": sum(p.numel() for p in new.parameters()),
            "nonzero": sum(int(torch.count_nonzero(p)) for p in new.parameters()),
        })
    return {
        "layers": layers,
        "units_removed": sum(layer["out_before"] - layer["out_after"] for layer in layers),
        "params_exported": sum(p.numel() for p in exported.parameters()),
        "nonzero_exported": count_nonzero(exported),
        "nonzero_hard_masked": count_nonzero(hard),
        "dense_equivalent": count_dense_equivalent(model),
    }
