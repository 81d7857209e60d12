"""What a LightningModule does after it changed its network's structure during ``fit`` (LayerCollapse merged a
block into a new Linear, StructuredPruning removed channels): the optimizers must see the new parameters and DDP
must wrap the new module."""

from typing import Any

import torch

from lightning_modules.distributed import rewrap_after_structure_change


def as_groups(parameters: Any) -> list[dict[str, Any]]:
    """``optimizer_parameters()`` as a list of param-group dicts (a plain iterable of tensors is one group)."""
    parameters = list(parameters)
    return parameters if parameters and isinstance(parameters[0], dict) else [{"params": parameters}]


def point_optimizer_at(optimizer: torch.optim.Optimizer, groups: list[dict[str, Any]]) -> None:
    """Point ``optimizer``'s groups at ``groups``' parameters, in their order (what a resumed run's fresh
    ``configure_optimizers`` builds, so saved optimizer state lines up), keeping the state of surviving
    parameters; a new tensor starts with empty state. Hand-written because torch optimizers have no "replace
    parameters" API; adding a param group instead would change the group count the LR scheduler keeps."""
    if len(groups) != len(optimizer.param_groups):
        raise RuntimeError(f"optimizer has {len(optimizer.param_groups)} parameter groups, expected {len(groups)}.")
    alive = {id(p) for g in groups for p in g["params"]}
    for p in [p for p in optimizer.state if id(p) not in alive]:
        del optimizer.state[p]
    for group, fresh in zip(optimizer.param_groups, groups):
        group["params"] = list(fresh["params"])


def after_structure_change(module: Any) -> None:
    """Hand every optimizer of ``module``'s trainer the current ``optimizer_parameters()`` and rewrap DDP."""
    if module._trainer is None:
        return
    for optimizer in module.trainer.optimizers:
        point_optimizer_at(optimizer, as_groups(module.optimizer_parameters()))
    if module.trainer.training:
        rewrap_after_structure_change(module.trainer)
