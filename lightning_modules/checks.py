"""Refusals in one sentence where a network and its data, or a checkpoint and its module, do not fit."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def check_network_fits_data(net: nn.Module, example: torch.Tensor, num_classes: int) -> None:
    """One forward of ``example`` (a zero input of the data's shape, batch 1): a network that does not take the
    data's shape or classes is refused here instead of by a matrix-size error in the first training step."""
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            out = net(example)
    except RuntimeError as error:
        raise ValueError(
            f"model.net {type(net).__name__} does not accept inputs of shape {list(example.shape[1:])} (the data's "
            f"input_shape): {str(error).splitlines()[0][:160]}."
        ) from None
    finally:
        net.train(was_training)
    if tuple(out.shape) != (1, num_classes):
        raise ValueError(
            f"model.net {type(net).__name__} returns {list(out.shape)} for one input, but the data has "
            f"{num_classes} classes (expected [1, {num_classes}])."
        )


def check_state_dict_fits(module: nn.Module, net: nn.Module, state_dict: dict[str, Any]) -> None:
    """A checkpoint of another architecture (other widths, another N, another technique) is refused with one
    sentence instead of torch's list of every key."""
    own = module.state_dict()
    missing, unexpected = sorted(set(own) - set(state_dict)), sorted(set(state_dict) - set(own))
    wrong = sorted(k for k in set(own) & set(state_dict) if tuple(own[k].shape) != tuple(state_dict[k].shape))
    if missing or unexpected or wrong:
        raise ValueError(
            f"the checkpoint does not fit this {type(module).__name__} with net {type(net).__name__} "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}, other shapes {wrong[:3]}); pass the config "
            "it was trained with (config.yaml in its run directory)."
        )
