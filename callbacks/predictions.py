"""``train.py predict`` writes what it predicts: ``predictions.csv`` in the run directory.

One row per sample of the datamodule's predict split: ``sample`` (the datamodule's id of it: an image's file path
under the folder, a table's row number, else its index in the split), ``predicted`` (the class name), ``label``
(the true class name, where the split is labelled) and one ``p_<class>`` column per class (softmax probabilities,
as ``predict_step`` returns them). Lightning's ``BasePredictionWriter``; forced by train.py as ``--predictions.*``.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Sequence

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info


def class_names(datamodule: Any, num_classes: int) -> list[str]:
    """The datamodule's class names, or ``0 .. C-1`` where it has none."""
    names = getattr(datamodule, "class_names", None)
    return [str(n) for n in names] if names else [str(i) for i in range(num_classes)]


def sample_ids(datamodule: Any, count: int) -> list[str]:
    """The datamodule's ids of its predict samples (``predict_ids()``), or their indices."""
    ids = datamodule.predict_ids() if hasattr(datamodule, "predict_ids") else None
    return [str(i) for i in ids] if ids is not None else [str(i) for i in range(count)]


class PredictionsCSV(BasePredictionWriter):
    """Write ``predictions.csv`` (see the module docstring) when a predict epoch ends.

    Args:
        filename: the file's name inside the run directory (``trainer.log_dir``).
    """

    def __init__(self, filename: str = "predictions.csv") -> None:
        super().__init__(write_interval="epoch")
        self.filename = filename
        self.path: Path | None = None

    def write_on_epoch_end(self, trainer: Trainer, pl_module: LightningModule, predictions: Sequence[Any],
                           batch_indices: Sequence[Any]) -> None:
        if trainer.world_size > 1:
            raise RuntimeError("predict writes predictions.csv from one process; run it with --trainer.devices=1.")
        probabilities = torch.cat([torch.as_tensor(p).float().cpu() for p in predictions])
        names = class_names(trainer.datamodule, probabilities.shape[1])
        ids = sample_ids(trainer.datamodule, len(probabilities))
        labels = getattr(trainer.datamodule, "predict_labels", lambda: None)()
        self.path = Path(trainer.log_dir or ".") / self.filename
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(["sample", "predicted", *(["label"] if labels is not None else []), *(f"p_{n}" for n in names)])
            for i, (row, top) in enumerate(zip(probabilities.tolist(), probabilities.argmax(dim=1).tolist())):
                label = [names[int(labels[i])]] if labels is not None else []
                writer.writerow([ids[i], names[top], *label, *(f"{p:.6g}" for p in row)])
        rank_zero_info(f"[predict] {len(probabilities):,} predictions written to {self.path}")
