"""One LightningModule per technique; LightningCLI's ``class_path`` (e.g. ``lightning_modules.Baseline``) selects it."""

from lightning_modules.base import ClassificationModule
from lightning_modules.baseline import Baseline

__all__ = ["ClassificationModule", "Baseline"]
