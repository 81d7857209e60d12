"""CIFAR-10 / CIFAR-100 (50k train / 10k test, 32x32 RGB) through torchvision's real loading path.

No offline copy exists on the development machines: without the archive and without internet the
datamodule stops with one sentence naming the file to place. ``synthetic=True`` gives class-dependent random
images of the same shape for tests; its name says ``synthetic`` so no result can pass for CIFAR.
"""

from pathlib import Path

import torch
from torch import Tensor
from torchvision.datasets import CIFAR10, CIFAR100

from datamodules.vision import VisionDataModule
from constraints import PositiveInt


class CIFAR10DataModule(VisionDataModule):
    """CIFAR-10, or a synthetic stand-in of the same shape (for tests only).

    Args:
        synthetic: generate ``synthetic_size`` train and half as many test images instead of loading CIFAR.
        synthetic_size: number of synthetic training images.
        **kwargs: see ``VisionDataModule``.
    """

    name = "cifar10"
    input_shape = (3, 32, 32)
    num_classes = 10
    archive = "cifar-10-python.tar.gz"
    torchvision_class = CIFAR10
    dataset_mean = (0.4914, 0.4822, 0.4465)
    dataset_std = (0.2470, 0.2435, 0.2616)

    def __init__(self, synthetic: bool = False, synthetic_size: PositiveInt = 512, **kwargs) -> None:
        super().__init__(**kwargs)
        self.synthetic, self.synthetic_size = synthetic, synthetic_size
        if synthetic:
            self.name = f"{self.name}-synthetic"

    def prepare_data(self) -> None:
        if self.synthetic:
            self.source = "synthetic class-dependent noise (not CIFAR)"
            return
        try:
            for train in (True, False):
                self.torchvision_class(self.root, train=train, download=True)
        except Exception as error:
            raise FileNotFoundError(
                f"{self.name} is not in {Path(self.root)} and could not be downloaded ({type(error).__name__}); "
                f"place {self.archive} under {Path(self.root)}/ and run again."
            ) from None
        self.source = f"torchvision {self.torchvision_class.__name__} in {self.root}"

    def _synthetic(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        prototypes = torch.randint(0, 256, (self.num_classes, *self.input_shape), generator=torch.Generator().manual_seed(0))
        labels = torch.randint(0, self.num_classes, (n,), generator=generator)
        noise = torch.randint(-64, 65, (n, *self.input_shape), generator=generator)
        return (prototypes[labels] + noise).clamp(0, 255).to(torch.uint8), labels

    def load(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        if not self.source:
            self.prepare_data()
        if self.synthetic:
            generator = torch.Generator().manual_seed(1)
            return *self._synthetic(self.synthetic_size, generator), *self._synthetic(self.synthetic_size // 2, generator)
        splits = []
        for train in (True, False):
            ds = self.torchvision_class(self.root, train=train, download=False)
            splits += [torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets)]
        return tuple(splits)


class CIFAR100DataModule(CIFAR10DataModule):
    """CIFAR-100 (100 fine classes); same behaviour as ``CIFAR10DataModule``."""

    name = "cifar100"
    num_classes = 100
    archive = "cifar-100-python.tar.gz"
    torchvision_class = CIFAR100
    dataset_mean = (0.5071, 0.4865, 0.4409)
    dataset_std = (0.2673, 0.2564, 0.2762)
