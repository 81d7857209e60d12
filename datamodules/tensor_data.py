"""In-memory tensor data: decode once, batch by indexing.

Every datamodule here holds its splits as tensors and yields batches with ``dataset[index_tensor]`` instead of
collating samples one by one (for a small MLP the per-sample path costs more than the model). The batch order
of epoch ``e`` is a permutation seeded with ``(seed, e)``: a run resumed from an epoch-end checkpoint sees the
same batches as an uninterrupted one. Lightning calls ``set_epoch`` on the sampler at every epoch start.

``batch_size`` is the global batch: in DDP every process takes its slice of each batch (see
``lightning_modules/distributed.py``), so a run on W processes trains on the batches of the run on one.
"""

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from constraints import OpenFraction, PositiveInt
from seeding import global_seed, sample_keys, stream_seed


class IndexedTensors(Dataset):
    """``dataset[indices] -> (transform(x[indices], indices), y[indices])`` for a whole batch at once."""

    def __init__(self, x: Tensor, y: Tensor, transform: Callable[[Tensor, Tensor], Tensor] | None = None) -> None:
        if len(x) != len(y):
            raise ValueError(f"inputs and labels differ in length: {len(x)} vs {len(y)}.")
        self.x, self.y, self.transform = x, y, transform

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: Tensor) -> tuple[Tensor, Tensor]:
        xb = self.x[index]
        return (self.transform(xb, index) if self.transform else xb), self.y[index]


class EpochBatchSampler(DistributedSampler):
    """Index batches of ``range(n)``, shuffled by a permutation seeded with ``(seed, epoch)``; with ``num_replicas``
    W > 1, process ``rank`` gets its slice of every batch (``torch.tensor_split``: sizes differ by at most 1).

    A ``DistributedSampler`` only so that Lightning does not wrap it in one of its own (which would deal out
    whole batches round-robin and pad the last round with repeated batches). With W > 1, a final batch of fewer
    than W samples joins the batch before it, so that no process gets an empty slice.
    """

    def __init__(self, n: int, batch_size: int, shuffle: bool, seed: int = 0, num_replicas: int = 1, rank: int = 0) -> None:
        # DistributedSampler.__init__ is not called: it wants a dataset and the process group, this needs neither.
        if 0 < n < num_replicas:
            raise ValueError(f"a split of {n} sample(s) cannot be shared by {num_replicas} processes; use fewer devices.")
        self.n, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, seed
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _bounds(self) -> list[int]:
        """Start of every global batch, and the end."""
        bounds = list(range(0, self.n, self.batch_size)) + [self.n]
        if len(bounds) > 2 and bounds[-1] - bounds[-2] < self.num_replicas:
            del bounds[-2]
        return bounds

    def __len__(self) -> int:
        return len(self._bounds()) - 1

    def __iter__(self) -> Iterator[Tensor]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(stream_seed(self.seed, self.epoch))
            order = torch.randperm(self.n, generator=generator)
        else:
            order = torch.arange(self.n)
        bounds = self._bounds()
        for start, end in zip(bounds[:-1], bounds[1:]):
            batch = order[start:end]
            yield batch if self.num_replicas == 1 else torch.tensor_split(batch, self.num_replicas)[self.rank]


def stratified_split(y: Tensor, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Indices ``(keep, held_out)`` with ``round(fraction * n_c)`` samples of every class ``c`` held out."""
    generator = torch.Generator().manual_seed(seed)
    keep, held = [], []
    for label in torch.unique(y):
        idx = torch.nonzero(y == label).flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        cut = int(round(fraction * len(idx)))
        held.append(idx[:cut])
        keep.append(idx[cut:])
    return torch.cat(keep).sort().values, torch.cat(held).sort().values


class TensorDataModule(LightningDataModule, ABC):
    """Base of the in-memory datamodules: seeded validation split, index-batched loaders.

    Subclasses set ``name``, ``input_shape`` and ``num_classes`` and implement ``load()`` returning
    ``(x_train, y_train, x_test, y_test)`` plus ``batch_transform`` for the per-batch conversion to float.

    Args:
        root: directory for dataset files.
        batch_size: training batch size.
        eval_batch_size: batch size for validation, test and predict.
        val_fraction: share of the training split held out (stratified) for validation and model selection,
            unless ``load()`` sets ``given_val``; the test split is never used to select anything.
        split_seed: seed of the validation split (fixed across runs so seeds vary only the training).
        shuffle_seed: seed of the batch order; defaults to the run's ``seed_everything`` value.
    """

    name: str = "tensors"
    input_shape: tuple[int, ...] = ()
    num_classes: int = 0
    class_names: list[str] | None = None  # label i is class_names[i] (predictions.csv); None: the index

    def __init__(
        self,
        root: str = "data",
        batch_size: PositiveInt = 128,
        eval_batch_size: PositiveInt = 1024,
        val_fraction: OpenFraction = 0.1,
        split_seed: int = 0,
        shuffle_seed: int | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.root = root
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.val_fraction, self.split_seed, self.shuffle_seed = val_fraction, split_seed, shuffle_seed
        self.splits: dict[str, tuple[Tensor, Tensor]] = {}
        self.source = ""
        self.given_val: tuple[Tensor, Tensor] | None = None  # a validation split of its own, set by load()
        self.predict_inputs: str | None = None  # unlabelled inputs (a folder, a table) predict runs on, not the test split
        self.sample_ids: dict[str, list] = {}  # split -> an id per sample for predictions.csv (a file path, a row)

    # --- to implement -------------------------------------------------------------------------------------
    @abstractmethod
    def load(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Return ``(x_train, y_train, x_test, y_test)`` and set ``self.source`` to where they came from."""

    def batch_transform(self, x: Tensor, train: bool, keys: Tensor | None = None) -> Tensor:
        """Per-batch conversion. ``keys``: one seed per training sample, a function of (seed, epoch, sample index),
        for random augmentation that does not depend on the batch, the process or the global RNG."""
        return x.float()

    # --- Lightning hooks ------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        x_train, y_train, x_test, y_test = self.load()
        for split, (x, y) in {"train": (x_train, y_train), "test": (x_test, y_test)}.items():
            if len(x) == 0:
                raise ValueError(f"the {split} split of {self.name} is empty; check data.root={self.root!r}.")
            bad = (y < 0) | (y >= self.num_classes)
            if bad.any():
                raise ValueError(
                    f"{self.name} {split} labels must lie in [0, {self.num_classes - 1}], found {int(y[bad][0])}."
                )
        if self.given_val is not None:
            self.splits = {"train": (x_train, y_train), "val": self.given_val, "test": (x_test, y_test)}
        else:
            keep, held = stratified_split(y_train, self.val_fraction, self.split_seed)
            self.splits = {
                "train": (x_train[keep], y_train[keep]),
                "val": (x_train[held], y_train[held]),
                "test": (x_test, y_test),
            }
        sizes = ", ".join(f"{k} {len(v[0]):,}" for k, v in self.splits.items())
        rank_zero_info(f"[data] {self.name}: {sizes} (source: {self.source})")

    def _loader(self, split: str, train: bool) -> DataLoader:
        if not self.splits:
            self.setup()
        x, y = self.splits[split]
        seed = global_seed() if self.shuffle_seed is None else self.shuffle_seed
        batch_size = self.batch_size if train else self.eval_batch_size
        sampler = EpochBatchSampler(len(x), batch_size, shuffle=train, seed=seed, **self.process_share())

        def transform(xb: Tensor, index: Tensor) -> Tensor:
            return self.batch_transform(xb, train, sample_keys(seed, sampler.epoch, index) if train else None)

        dataset = IndexedTensors(x, y, transform)
        # batch_size=None: the sampler yields whole index batches, the dataset indexes them in one go.
        # A private generator: creating an iterator would otherwise draw from the global RNG, and how often that
        # happens before an epoch's first step differs between a fresh and a resumed run.
        return DataLoader(dataset, sampler=sampler, batch_size=None, generator=torch.Generator().manual_seed(seed))

    def process_share(self) -> dict[str, int]:
        """``num_replicas`` and ``rank`` of this process (the Trainer's world; 1 and 0 without a Trainer)."""
        trainer = self.trainer
        return {"num_replicas": trainer.world_size, "rank": trainer.global_rank} if trainer is not None else {}

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)

    @property
    def predict_split(self) -> str:
        """The split ``predict`` runs on: ``predict`` (the unlabelled inputs) when there are any, else ``test``."""
        return "test" if self.predict_inputs is None else "predict"

    def predict_ids(self) -> list | None:
        """An id of every predict sample for ``predictions.csv`` (``sample_ids``); None: its index."""
        if not self.splits:
            self.setup()
        return self.sample_ids.get(self.predict_split)

    def predict_labels(self) -> Tensor | None:
        """The predict split's labels: the test split's, None for unlabelled inputs."""
        if not self.splits:
            self.setup()
        return self.splits["test"][1] if self.predict_split == "test" else None

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.predict_split, train=False)
