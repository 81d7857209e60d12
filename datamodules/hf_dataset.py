"""A Hugging Face dataset: by name from the hub (``datasets.load_dataset``), or local (a ``save_to_disk`` folder,
``datasets.load_from_disk``; a Parquet file or a folder of them, ``load_dataset("parquet")``).

``input_column`` holds images (a ``datasets.Image`` feature, or anything PIL opens) or text; ``label_column``
the classes (a ``ClassLabel`` feature's names, else the column's sorted distinct values). ``train_split`` is the
training pool; ``test_split`` the test split when the dataset has it, else a seeded stratified ``test_fraction``
of the pool; the validation split is carved from the pool as for every datamodule.

* ``HFImageDataModule``: images become uint8 tensors (grey or RGB by ``channels``, resized to ``image_size``),
  then normalised and augmented as every image datamodule.
* ``HFTextDataModule``: sentences go through SST-2's path (``SST2DataModule``: the encoder's tokenizer, token
  batches trimmed to their longest sentence, optional ``train_size`` subset), for the same BERT networks.
"""

from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor
from torchvision.transforms.v2 import functional as TF

from constraints import OpenFraction, PositiveInt
from datamodules.sst2 import SST2DataModule
from datamodules.tensor_data import stratified_split
from datamodules.vision import VisionDataModule


def open_dataset(dataset: str, config_name: str | None = None) -> Any:
    """A ``DatasetDict`` (or ``Dataset``) for ``dataset``: a ``save_to_disk`` folder, Parquet file(s), or a hub name."""
    import datasets  # noqa: PLC0415 (slow import, only here)

    path = Path(dataset)
    if path.is_dir() and any((path / f).is_file() for f in ("dataset_dict.json", "dataset_info.json", "state.json")):
        return datasets.load_from_disk(str(path))
    parquet = [str(path)] if path.suffix == ".parquet" else sorted(map(str, path.glob("*.parquet"))) if path.is_dir() else []
    if parquet:
        return datasets.load_dataset("parquet", data_files={"train": parquet})
    if path.exists():
        raise ValueError(f"data.dataset={dataset!r} is neither a save_to_disk folder nor Parquet file(s).")
    try:
        return datasets.load_dataset(dataset, config_name)
    except Exception as error:  # offline, unknown name, hub error: one sentence
        raise FileNotFoundError(f"data.dataset={dataset!r} is not a local dataset and could not be loaded from the "
                                f"Hugging Face hub ({type(error).__name__}: {str(error).splitlines()[0][:160]}).") from None


class HFSplits:
    """The pool and test columns of a dataset and its class names (shared by the image and the text module)."""

    def __init__(self, dataset: str, config_name: str | None, input_column: str, label_column: str,
                 train_split: str, test_split: str, test_fraction: float, split_seed: int) -> None:
        import datasets  # noqa: PLC0415

        opened = open_dataset(dataset, config_name)
        splits = opened if isinstance(opened, datasets.DatasetDict) else datasets.DatasetDict({train_split: opened})
        if train_split not in splits:
            raise ValueError(f"data.train_split={train_split!r} is not a split of {dataset} (splits: {', '.join(splits)}).")
        pool = splits[train_split]
        for column in (input_column, label_column):
            if column not in pool.column_names:
                raise ValueError(f"{column!r} is not a column of {dataset} (columns: {', '.join(pool.column_names)}).")
        feature = pool.features[label_column]
        if isinstance(feature, datasets.ClassLabel):
            self.class_names = list(feature.names)
            to_index = lambda values: [int(v) for v in values]  # noqa: E731
        else:
            self.class_names = sorted({str(v) for v in pool[label_column]})
            index = {name: i for i, name in enumerate(self.class_names)}
            to_index = lambda values: [index[str(v)] for v in values]  # noqa: E731
        if len(self.class_names) < 2:
            raise ValueError(f"the label column {label_column!r} of {dataset} has one class; a classifier needs two or more.")
        pool_y = torch.tensor(to_index(pool[label_column]), dtype=torch.long)
        if test_split in splits:
            test = splits[test_split]
            self.pool, self.test = pool[input_column], test[input_column]
            self.pool_y, self.test_y = pool_y, torch.tensor(to_index(test[label_column]), dtype=torch.long)
            self.how = f"test split {test_split!r}"
        else:
            keep, held = stratified_split(pool_y, test_fraction, split_seed)
            column = pool[input_column]
            self.pool, self.test = [column[i] for i in keep.tolist()], [column[i] for i in held.tolist()]
            self.pool_y, self.test_y = pool_y[keep], pool_y[held]
            self.how = f"no {test_split!r} split: a stratified {test_fraction:.0%} of {train_split!r} (split_seed={split_seed})"
        self.source = f"{dataset} ({train_split!r} as the pool, {self.how})"


def dataset_name(dataset: str) -> str:
    """The name results use: a local dataset's folder or file stem, a hub name with ``/`` as ``_``."""
    return Path(dataset).stem if Path(dataset).exists() else dataset.replace("/", "_")


def image_tensor(image: Any, channels: int, size: int) -> Tensor:
    """A PIL image (or a path PIL opens) as uint8 ``(channels, size, size)``."""
    from PIL import Image  # noqa: PLC0415

    image = Image.open(image) if isinstance(image, (str, Path)) else image
    x = TF.pil_to_tensor(image.convert("L" if channels == 1 else "RGB"))
    return TF.resize(x, [size, size], antialias=True) if x.shape[-2:] != (size, size) else x


class HFImageDataModule(VisionDataModule):
    """Images and labels of a Hugging Face dataset (see the module docstring).

    Args:
        dataset: a hub name, a ``save_to_disk`` folder, or Parquet file(s).
        input_column, label_column: the image and the label columns.
        config_name: the hub dataset's configuration, if it has several.
        train_split, test_split: split names; without ``test_split`` a stratified ``test_fraction`` is held out.
        image_size, channels: every image is resized to ``image_size`` squared, grey (1) or RGB (3).
        **kwargs: see ``VisionDataModule`` and ``TensorDataModule``.
    """

    def __init__(
        self,
        dataset: str,
        input_column: str = "image",
        label_column: str = "label",
        config_name: str | None = None,
        train_split: str = "train",
        test_split: str = "test",
        test_fraction: OpenFraction = 0.2,
        image_size: PositiveInt = 32,
        channels: Literal[1, 3] = 3,
        **kwargs,
    ) -> None:
        self.input_shape = (channels, image_size, image_size)  # VisionDataModule's normalisation reads the channels
        super().__init__(**kwargs)
        self.hf = HFSplits(dataset, config_name, input_column, label_column, train_split, test_split, test_fraction,
                           self.split_seed)
        self.class_names, self.num_classes = self.hf.class_names, len(self.hf.class_names)
        self.name = dataset_name(dataset)
        self.image_size, self.channels = image_size, channels

    def load(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        as_x = lambda images: torch.stack([image_tensor(i, self.channels, self.image_size) for i in images])  # noqa: E731
        self.source = self.hf.source
        return as_x(self.hf.pool), self.hf.pool_y, as_x(self.hf.test), self.hf.test_y


class HFTextDataModule(SST2DataModule):
    """Sentences and labels of a Hugging Face dataset, tokenised as SST-2 (see the module docstring).

    Args:
        dataset, input_column, label_column, config_name, train_split, test_split, test_fraction: as
            ``HFImageDataModule`` (``input_column`` defaults to ``text``).
        train_size: training sentences drawn from the pool (None: all of it).
        **kwargs: see ``SST2DataModule`` (encoder, max_length, batch_size, ...).
    """

    def __init__(
        self,
        dataset: str,
        input_column: str = "text",
        label_column: str = "label",
        config_name: str | None = None,
        train_split: str = "train",
        test_split: str = "test",
        test_fraction: OpenFraction = 0.2,
        train_size: PositiveInt | None = None,
        **kwargs,
    ) -> None:
        super().__init__(source="rt-snippets", train_size=train_size, **kwargs)  # source: unused, prepare_data below
        self.hf = HFSplits(dataset, config_name, input_column, label_column, train_split, test_split, test_fraction,
                           self.split_seed)
        self.class_names, self.num_classes = self.hf.class_names, len(self.hf.class_names)
        self.dataset_name = dataset_name(dataset)

    def prepare_data(self) -> None:
        if self._texts is not None:
            return
        as_text = lambda column: [str(t) for t in column]  # noqa: E731
        self._texts = as_text(self.hf.pool), self.hf.pool_y, as_text(self.hf.test), self.hf.test_y
        self.name, self.source = self.dataset_name, self.hf.source
