"""MorphReuse: train one shared block reused by many layers (``models.morphreuse``).

The network does the work (``SharedCoreMLP`` for vision, ``ShapeSharedBert`` for text); this module trains it
like any classifier and reports how the sharing is used.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lightning_modules.base import ClassificationModule
from models.morphreuse import SharedCoreMLP, ShapeSharedBert


class MorphReuse(ClassificationModule):
    """Cross-entropy training of a MorphReuse network; see ``ClassificationModule`` for the arguments."""

    technique = "morphreuse"

    def summary_extras(self, deployed: nn.Module) -> dict[str, Any]:
        if isinstance(self.net, SharedCoreMLP):
            core = sum(p.numel() for p in self.net.core.parameters())
            return {"morphreuse": {"variant": "shared_core", "core_parameters": core, "core_uses": len(self.net.adapters)}}
        if isinstance(self.net, ShapeSharedBert):
            return {"morphreuse": {"variant": "shape_shared", "shape_groups": self.net.shape_groups()}}
        return {}
