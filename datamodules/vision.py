"""Shared part of the image datamodules: uint8 NCHW tensors, per-batch float conversion and normalisation."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor
from torchvision.transforms import v2

from datamodules.tensor_data import TensorDataModule

Normalization = Literal["half", "dataset", "none"]


class VisionDataModule(TensorDataModule):
    """Images kept as uint8 ``(N, C, H, W)``; each batch becomes float in [0, 1], then normalised.

    Args:
        normalization: ``half`` maps [0, 1] to [-1, 1] (mean 0.5, std 0.5 per channel, the MorphReuse parity
            pipeline); ``dataset`` uses the training set's per-channel mean/std; ``none`` keeps [0, 1] (the
            LruNet parity pipeline).
        augment: random crop (padding 4) and horizontal flip on training batches, per sample
            (torchvision transforms v2). Off unless a config asks for it.
        **kwargs: see ``TensorDataModule``.
    """

    dataset_mean: tuple[float, ...] = (0.5,)
    dataset_std: tuple[float, ...] = (0.5,)

    def __init__(self, normalization: Normalization = "half", augment: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        if normalization not in ("half", "dataset", "none"):
            raise ValueError(f"data.normalization must be one of half, dataset, none; got {normalization!r}.")
        self.normalization, self.augment = normalization, augment
        channels = self.input_shape[0]
        mean, std = {"half": ((0.5,), (0.5,)), "dataset": (self.dataset_mean, self.dataset_std), "none": ((0.0,), (1.0,))}[
            normalization
        ]
        self._mean = torch.tensor(mean * (channels // len(mean))).view(1, -1, 1, 1)
        self._std = torch.tensor(std * (channels // len(std))).view(1, -1, 1, 1)
        size = self.input_shape[-1]
        self._augment = v2.Compose([v2.RandomCrop(size, padding=4), v2.RandomHorizontalFlip()])

    def batch_transform(self, x: Tensor, train: bool) -> Tensor:
        if train and self.augment:
            x = torch.stack([self._augment(img) for img in x])
        return (x.float().div_(255.0) - self._mean) / self._std
