"""Pictures of learned connectivity: per-layer hard masks and the sparsity/temperature history.

TensorBoard gets one image per masked layer every ``every_n_epochs`` (white = connection on). At the end of fit
``connectivity.png`` (the final masks) and ``history.png`` (per-layer sparsity and temperature per epoch) are
written next to the run.
"""


from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch import Callback, LightningModule, Trainer  # noqa: E402

from callbacks.controls import MaskSchedule, controls_of  # noqa: E402
from callbacks.schedules import is_last_batch  # noqa: E402
from constraints import PositiveInt  # noqa: E402


def mask_image(layer: torch.nn.Module) -> torch.Tensor:
    """The layer's hard mask as a 2-D {0, 1} image (conv masks: one row per output filter)."""
    hard = (layer.mask_logits > 0).float().detach().cpu()
    return hard.reshape(hard.shape[0], -1)


class ConnectivityImages(Callback):
    """Log mask images and keep a per-epoch history of sparsity and temperature.

    Args:
        every_n_epochs: how often the images go to TensorBoard.
    """

    def __init__(self, every_n_epochs: PositiveInt = 10) -> None:
        self.every_n_epochs = every_n_epochs
        self.history: list[dict[str, Any]] = []

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        controls_of(pl_module, MaskSchedule, "callbacks.ConnectivityImages")

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not is_last_batch(trainer, batch_idx):  # recorded before the epoch's checkpoint (see is_last_batch)
            return
        layers = pl_module.net.morpho_layers()
        temperature = float(layers[0].temperature) if layers else float("nan")
        self.history.append(
            {"epoch": trainer.current_epoch, "temperature": temperature, "sparsity": [1.0 - float(layer.density()) for layer in layers]}
        )
        if (trainer.current_epoch + 1) % self.every_n_epochs == 0 and trainer.is_global_zero:
            experiment = getattr(trainer.logger, "experiment", None)
            if hasattr(experiment, "add_image"):
                for index, layer in enumerate(layers):
                    experiment.add_image(f"compact/mask_layer{index}", mask_image(layer)[None], trainer.current_epoch)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        log_dir = trainer.log_dir  # a broadcast under DDP: asked on every rank
        if not trainer.is_global_zero or not log_dir:
            return
        out = Path(log_dir)
        layers = pl_module.net.morpho_layers()
        fig, axes = plt.subplots(1, len(layers), figsize=(4 * len(layers), 4), squeeze=False)
        for index, (ax, layer) in enumerate(zip(axes[0], layers)):
            image = mask_image(layer)
            ax.imshow(image, cmap="gray", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
            ax.set_title(f"layer {index}: {image.shape[0]}x{image.shape[1]}, {100 * float(image.mean()):.1f}% on")
            ax.set_xlabel("input connection")
            ax.set_ylabel("output unit")
        fig.tight_layout()
        fig.savefig(out / "connectivity.png", dpi=100)
        plt.close(fig)
        if not self.history:
            return
        fig, left = plt.subplots(figsize=(7, 4))
        epochs = [h["epoch"] + 1 for h in self.history]
        for index in range(len(self.history[0]["sparsity"])):
            left.plot(epochs, [h["sparsity"][index] for h in self.history], label=f"layer {index} sparsity")
        left.set_xlabel("epoch")
        left.set_ylabel("hard sparsity (fraction of connections off)")
        right = left.twinx()
        right.plot(epochs, [h["temperature"] for h in self.history], "k--", label="temperature")
        right.set_ylabel("temperature T")
        handles = left.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
        left.legend(handles, [h.get_label() for h in handles], loc="best", fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "history.png", dpi=100)
        plt.close(fig)

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict["history"])
