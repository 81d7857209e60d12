"""Networks by name: torchvision's and timm's model zoos, fitted to the data (``net(input_shape, num_classes)``).

``TorchvisionNet(name, weights=None, **kwargs)`` builds ``torchvision.models.get_model(name, ...)`` and
``TimmNet(name, pretrained=False, **kwargs)`` builds ``timm.create_model(name, ...)``. Both are fitted to the
datamodule's input shape and class count:

* input channels: timm takes ``in_chans``; for torchvision the first convolution is rebuilt with the data's
  channel count (pretrained RGB kernels adapted by ``timm.models.adapt_input_conv``, i.e. summed for grey images);
* image size: timm models that have one (ViT, MLP-Mixer, ...) get ``img_size`` = the data's height; convolutional
  networks accept any size through their adaptive pooling (a torchvision ResNet turns 28 x 28 into 1 x 1);
* classes: ``num_classes`` is passed through; with pretrained weights the classifier is replaced by a new one.

Pretrained weights take the real download path (torch.hub / the Hugging Face hub). When they cannot be fetched,
the run stops with one sentence: a pretrained name never silently trains from a random initialisation.
"""

from collections.abc import Sequence
from typing import Any

import timm
import torch
import torchvision
from timm.models import adapt_input_conv
from torch import Tensor, nn

from models.targets import output_layer


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _fit_input_channels(model: nn.Module, channels: int, pretrained: bool) -> None:
    """Rebuild the first Conv2d for ``channels`` input channels (pretrained kernels adapted, else fresh)."""
    name, conv = next(((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), (None, None))
    if conv is None or conv.in_channels == channels:
        return
    new = nn.Conv2d(channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    conv.groups, conv.bias is not None, conv.padding_mode)
    if pretrained:
        with torch.no_grad():
            new.weight.copy_(adapt_input_conv(channels, conv.weight, conv.in_channels))
            if conv.bias is not None:
                new.bias.copy_(conv.bias)
    _replace(model, name, new)


def _fit_classes(model: nn.Module, num_classes: int) -> None:
    name = output_layer(model, (nn.Linear,))
    head = model.get_submodule(name)
    if head.out_features != num_classes:
        _replace(model, name, nn.Linear(head.in_features, num_classes, bias=head.bias is not None))


def _weights_unavailable(zoo: str, name: str, weights: Any, error: Exception) -> RuntimeError:
    return RuntimeError(f"{zoo} {name}: the pretrained weights {weights!r} could not be fetched "
                        f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else 'no detail'}); "
                        "connect to the internet or put them in the local cache, or train from random "
                        "initialisation with weights: null / pretrained: false.")


class TorchvisionNet(nn.Module):
    """A ``torchvision.models`` network by name, fitted to the data (see the module docstring).

    Args:
        input_shape: ``(channels, height, width)`` of one sample. num_classes: number of logits.
        name: a name ``torchvision.models.list_models()`` lists (``resnet18``, ``mobilenet_v3_small``, ...).
        weights: a weights name (``DEFAULT``, ``IMAGENET1K_V1``) or None for random initialisation.
        kwargs: passed to the model builder (``dropout``, ``image_size`` for ``vit_*``, ...).
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int, name: str, weights: str | None = None,
                 kwargs: dict[str, Any] | None = None) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"TorchvisionNet {name} needs image inputs (C, H, W); the data gives {tuple(input_shape)}.")
        if name not in torchvision.models.list_models():
            raise ValueError(f"TorchvisionNet: {name!r} is not a torchvision model; torchvision.models.list_models() "
                             "lists them (e.g. resnet18, mobilenet_v3_small, efficientnet_b0).")
        self.name = name
        kwargs = dict(kwargs or {})
        if weights is None:
            kwargs["num_classes"] = num_classes
        try:
            self.model = torchvision.models.get_model(name, weights=weights, **kwargs)
        except (OSError, RuntimeError) as error:  # URLError is an OSError; a failed hash check a RuntimeError
            if weights is None:
                raise
            raise _weights_unavailable("torchvision", name, weights, error) from error
        _fit_input_channels(self.model, int(input_shape[0]), pretrained=weights is not None)
        _fit_classes(self.model, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


class TimmNet(nn.Module):
    """A ``timm`` network by name, fitted to the data (see the module docstring).

    Args:
        input_shape: ``(channels, height, width)`` of one sample. num_classes: number of logits.
        name: a name ``timm.list_models()`` lists (``vit_tiny_patch16_224``, ``mixer_s16_224``, ``resnet18``, ...).
        pretrained: load the pretrained weights (from the Hugging Face hub).
        kwargs: passed to ``timm.create_model`` (``patch_size``, ``depth``, ``embed_dim``, ``drop_rate``, ...).
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int, name: str, pretrained: bool = False,
                 kwargs: dict[str, Any] | None = None) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"TimmNet {name} needs image inputs (C, H, W); the data gives {tuple(input_shape)}.")
        if not timm.is_model(name):
            raise ValueError(f"TimmNet: {name!r} is not a timm model; timm.list_models() lists them "
                             "(e.g. vit_tiny_patch16_224, mixer_s16_224, resnet18).")
        self.name = name
        kwargs = {"num_classes": num_classes, "in_chans": int(input_shape[0]), **(kwargs or {})}
        try:
            try:
                self.model = timm.create_model(name, pretrained=pretrained, img_size=int(input_shape[1]), **kwargs)
            except TypeError as error:  # a network without a fixed image size (convolutional) takes no img_size
                if "img_size" not in str(error):
                    raise
                self.model = timm.create_model(name, pretrained=pretrained, **kwargs)
        except (OSError, RuntimeError, ValueError) as error:
            if not pretrained:
                raise
            raise _weights_unavailable("timm", name, "pretrained", error) from error

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)
