"""Save and load an exported model: a plain ``nn.Module`` (Linear, Conv2d, ReLU, ...) with no technique code.

The file holds the pickled module, so loading it runs the unpickler on it (``weights_only=False``): load only
files your own runs wrote.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def save_exported(model: nn.Module, path: Path) -> Path:
    """Write ``model`` (moved to CPU) atomically to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".part")
    for module in model.modules():  # a forward set on an instance (DDP's GlobalBatchLayers) is not the model's
        vars(module).pop("forward", None)
    torch.save({"format": "morphlab-exported-v1", "model": model.cpu()}, tmp)
    tmp.replace(path)
    return path


def load_exported(path: str | Path) -> nn.Module:
    """Load a model written by ``save_exported`` (this unpickles the file; trust its origin)."""
    payload = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(payload, dict) or payload.get("format") != "morphlab-exported-v1":
        raise ValueError(f"{path} is not an exported morphlab model (written by models.plain_export.save_exported).")
    return payload["model"]
