"""Shared part of the image datamodules: uint8 NCHW tensors, per-batch float conversion and normalisation."""

from typing import Literal

import torch
from torch import Tensor
from torchvision.transforms import v2

from datamodules.tensor_data import TensorDataModule
from constraints import Degrees, PositiveInt

Normalization = Literal["half", "dataset", "none"]


class VisionDataModule(TensorDataModule):
    """Images kept as uint8 ``(N, C, H, W)``; each batch becomes float in [0, 1], then normalised.

    Args:
        normalization: ``half`` maps [0, 1] to [-1, 1] (mean 0.5, std 0.5 per channel, the MorphReuse parity
            pipeline); ``dataset`` uses the training set's per-channel mean/std; ``none`` keeps [0, 1] (the
            LruNet parity pipeline).
        augment: random crop (padding 4), optional random rotation and horizontal flip on training batches, per
            sample (torchvision transforms v2), seeded by (seed, epoch, sample index). Off unless a config asks.
        crop_size: side of the random crop (default: the image side). LruNet's published pipeline crops
            FashionMNIST's 28x28 images padded by 4 to 32x32 for training while testing on 28x28 (spec B4).
        rotation: maximum angle in degrees of a random rotation before the flip (0: none; LruNet: 10).
        **kwargs: see ``TensorDataModule``.
    """

    dataset_mean: tuple[float, ...] = (0.5,)
    dataset_std: tuple[float, ...] = (0.5,)

    def __init__(
        self,
        normalization: Normalization = "half",
        augment: bool = False,
        crop_size: PositiveInt | None = None,
        rotation: Degrees = 0.0,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.normalization, self.augment = normalization, augment
        channels = self.input_shape[0]
        mean, std = {"half": ((0.5,), (0.5,)), "dataset": (self.dataset_mean, self.dataset_std), "none": ((0.0,), (1.0,))}[
            normalization
        ]
        self._mean = torch.tensor(mean * (channels // len(mean))).view(1, -1, 1, 1)
        self._std = torch.tensor(std * (channels // len(std))).view(1, -1, 1, 1)
        steps: list[v2.Transform] = [v2.RandomCrop(crop_size or self.input_shape[-1], padding=4)]
        if rotation:
            steps.append(v2.RandomRotation(rotation))
        self._augment = v2.Compose([*steps, v2.RandomHorizontalFlip()])

    def batch_transform(self, x: Tensor, train: bool, keys: Tensor | None = None) -> Tensor:
        if train and self.augment:
            x = self.augment_batch(x, keys)
        return (x.float().div_(255.0) - self._mean) / self._std

    def augment_batch(self, x: Tensor, keys: Tensor | None) -> Tensor:
        """Augment each image; with ``keys``, image ``i`` draws its crop/rotation/flip from a generator seeded with
        ``keys[i]``, so it is augmented the same way whichever batch or process holds it, and the global RNG
        (dropout) is left alone. torchvision's transforms draw from the global RNG: it is reseeded per image inside
        ``fork_rng``, which restores it afterwards."""
        if keys is None:
            return torch.stack([self._augment(img) for img in x])
        with torch.random.fork_rng(devices=[]):
            out = []
            for img, key in zip(x, keys.tolist()):
                torch.manual_seed(key)
                out.append(self._augment(img))
        return torch.stack(out)
