"""One LightningModule per technique; LightningCLI's ``class_path`` (e.g. ``lightning_modules.Baseline``) selects it."""

from lightning_modules.base import ClassificationModule
from lightning_modules.baseline import Baseline
from lightning_modules.layer_reuse import LayerReuse
from lightning_modules.layercollapse import LayerCollapse
from lightning_modules.lora import LoRA
from lightning_modules.morphonet import MorphoNet
from lightning_modules.morphreuse import MorphReuse
from lightning_modules.neumeta import NeuMeta
from lightning_modules.structured_pruning import StructuredPruning

__all__ = ["ClassificationModule", "Baseline", "MorphReuse", "LoRA", "MorphoNet", "LayerCollapse", "LayerReuse", "NeuMeta",
           "StructuredPruning"]
