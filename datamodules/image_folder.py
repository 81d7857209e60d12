"""Your own images: a folder in torchvision's ``ImageFolder`` layout, decoded once into uint8 tensors and cached.

Layout: one folder per class (``root/<class>/<image>``), or ``root/train/<class>/...`` with optional ``root/val`` and
``root/test`` beside it. Without ``test/`` a seeded stratified ``test_fraction`` of the training images is the test
split; without ``val/`` the validation split is carved from the training part as for every datamodule. Class names
are the training folders' names, sorted (``torchvision.datasets.folder.find_classes``); label ``i`` is
``class_names[i]``.

Every image is decoded with ``torchvision.io.decode_image`` (grey or RGB by ``channels``) and resized to
``image_size`` x ``image_size`` (antialiased; a non-square image is stretched), once: the tensors are cached in
``<root>/.morphlab-cache/`` under a key of the file list, sizes and modification times, so an unchanged folder
loads in seconds and any added, removed or touched file triggers a new decode. Policy for a file that is not a
readable image: it is skipped and counted in the ``[data]`` log line (and kept out of every split).
``predict_root`` names a folder of unlabelled images for ``predict`` (``callbacks.PredictionsCSV``).
"""

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

from constraints import OpenFraction, PositiveInt
from datamodules.tensor_data import stratified_split
from datamodules.vision import VisionDataModule

CACHE_DIR = ".morphlab-cache"
CACHE_VERSION = 1  # bump when the decoded tensors would differ for the same files
SPLIT_FOLDERS = ("train", "val", "test")


def _class_root(root: Path) -> Path:
    """The folder whose sub-folders are the classes: ``root/train`` in the split layout, else ``root``."""
    return root / "train" if (root / "train").is_dir() else root


def list_images(folder: Path, classes: dict[str, int]) -> list[tuple[str, int]]:
    """``(path, label)`` of every file with an image extension under ``folder/<class>/``, sorted by path.
    A class folder of ``classes`` missing here is allowed (a test split may lack a class); one present here but
    not in ``classes`` is refused, and so is an empty class folder."""
    present, _ = find_classes(str(folder))
    unknown = sorted(set(present) - set(classes))
    if unknown:
        raise ValueError(f"{folder} has class folder(s) {unknown} that the training folder does not have.")
    for name in present:
        if not any(f.is_file() for f in (folder / name).rglob("*")):
            raise ValueError(f"the class folder {folder / name} is empty.")
    try:
        samples = make_dataset(str(folder), {c: classes[c] for c in present}, extensions=IMG_EXTENSIONS, allow_empty=True)
    except FileNotFoundError as error:
        raise ValueError(str(error)) from None
    for name in present:
        if not any(label == classes[name] for _, label in samples):
            raise ValueError(f"the class folder {folder / name} holds no file with an image extension ({', '.join(IMG_EXTENSIONS)}).")
    return sorted(samples)


def decode(path: str, channels: int, size: int) -> Tensor | None:
    """``path`` as a uint8 ``(channels, size, size)`` tensor, or None when it is not a readable image."""
    try:
        image = decode_image(path, mode=ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB)
    except (RuntimeError, ValueError):
        return None
    if image.shape[-2:] != (size, size):
        image = TF.resize(image, [size, size], antialias=True)
    return image


class ImageFolderDataModule(VisionDataModule):
    """Images from ``root`` (see the module docstring), normalised and augmented as every image datamodule.

    Args:
        root: the image folder.
        image_size: side every image is resized to.
        channels: 1 (grey) or 3 (RGB); images of the other kind are converted.
        test_fraction: share of the images held out (stratified, ``split_seed``) as the test split when there is
            no ``test/`` folder.
        workers: decoding threads (default: the CPU count).
        predict_root: a folder of unlabelled images (any depth, no class folders) that ``predict`` classifies
            instead of the test split; decoded and cached the same way, ids are paths under it.
        **kwargs: see ``VisionDataModule`` and ``TensorDataModule``.
    """

    name = "image_folder"

    def __init__(
        self,
        root: str,
        image_size: PositiveInt = 32,
        channels: Literal[1, 3] = 3,
        test_fraction: OpenFraction = 0.2,
        workers: PositiveInt | None = None,
        predict_root: str | None = None,
        **kwargs,
    ) -> None:
        path = Path(root)
        if predict_root is not None and not Path(predict_root).is_dir():
            raise FileNotFoundError(f"data.predict_root={predict_root!r}: no such directory.")
        if not path.is_dir():
            raise FileNotFoundError(f"data.root={root!r}: no such directory.")
        try:
            self.class_names, self.class_index = find_classes(str(_class_root(path)))
        except FileNotFoundError:
            raise ValueError(f"{_class_root(path)} has no class folders (expected <root>/<class>/<image>).") from None
        if len(self.class_names) < 2:
            raise ValueError(f"{_class_root(path)} has one class folder ({self.class_names[0]}); a classifier needs two or more.")
        self.input_shape, self.num_classes = (channels, image_size, image_size), len(self.class_names)
        super().__init__(root=root, **kwargs)
        self.image_size, self.channels, self.test_fraction = image_size, channels, test_fraction
        self.workers = workers or os.cpu_count() or 1
        self.predict_root = self.predict_inputs = predict_root  # sample ids: paths under root / predict_root

    # --- decoding and cache ---------------------------------------------------------------------------------
    def _cache_key(self, samples: list[tuple[str, int]], base: str) -> str:
        digest = hashlib.sha256(json.dumps([CACHE_VERSION, self.image_size, self.channels, self.class_names]).encode())
        for file, label in samples:
            stat = os.stat(file)
            digest.update(f"{os.path.relpath(file, base)}\0{label}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        return digest.hexdigest()[:24]

    def decode_samples(self, samples: list[tuple[str, int]], base: Path, tag: str) -> tuple[Tensor, Tensor, list[str], int, bool]:
        """``(images, labels, paths relative to base, skipped, from_cache)`` of ``(file, label)`` samples, cached in
        ``base/.morphlab-cache/<tag>-<key>.pt``."""
        cache = base / CACHE_DIR / f"{tag}-{self._cache_key(samples, str(base))}.pt"
        if cache.is_file():
            saved = torch.load(cache, weights_only=True)
            return saved["x"], saved["y"], saved["paths"], saved["skipped"], True
        with ThreadPoolExecutor(self.workers) as pool:  # decode_image releases the GIL while it decodes
            images = list(tqdm(pool.map(lambda s: decode(s[0], self.channels, self.image_size), samples),
                               total=len(samples), desc=f"decoding {base / tag}", unit="img", disable=None))
        kept = [(s, image) for s, image in zip(samples, images) if image is not None]
        if not kept:
            raise ValueError(f"no file under {base / tag if tag != 'all' else base} could be decoded as an image.")
        x = torch.stack([image for _, image in kept])
        y = torch.tensor([label for (_, label), _ in kept], dtype=torch.long)
        paths = [os.path.relpath(file, base) for (file, _), _ in kept]
        skipped = len(samples) - len(kept)
        try:
            cache.parent.mkdir(exist_ok=True)
            tmp = cache.with_suffix(".part")
            torch.save({"x": x, "y": y, "paths": paths, "skipped": skipped}, tmp)
            tmp.replace(cache)
        except OSError as error:  # a read-only folder: decode again next time
            rank_zero_warn(f"could not cache the decoded images in {cache.parent} ({error}).")
        return x, y, paths, skipped, False

    def decode_folder(self, folder: Path) -> tuple[Tensor, Tensor, list[str], int, bool]:
        """``decode_samples`` of one class-per-folder directory (``root`` or one of its split folders)."""
        return self.decode_samples(list_images(folder, self.class_index), Path(self.root), folder.name)

    def load(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        root = Path(self.root)
        split_layout = (root / "train").is_dir()
        found = {split: root / split for split in SPLIT_FOLDERS if (root / split).is_dir()} if split_layout else {"train": root}
        decoded = {split: self.decode_folder(folder) for split, folder in found.items()}
        x_train, y_train, train_paths, _, _ = decoded["train"]
        if "test" in decoded:
            x_test, y_test, test_paths, _, _ = decoded["test"]
        else:
            keep, held = stratified_split(y_train, self.test_fraction, self.split_seed)
            x_test, y_test, test_paths = x_train[held], y_train[held], [train_paths[i] for i in held.tolist()]
            x_train, y_train, train_paths = x_train[keep], y_train[keep], [train_paths[i] for i in keep.tolist()]
        if "val" in decoded:
            self.given_val = decoded["val"][:2]
        self.sample_ids["test"] = test_paths
        skipped = sum(d[3] for d in decoded.values())
        cached = all(d[4] for d in decoded.values())
        self.source = (f"{', '.join(str(f) for f in found.values())}; {self.num_classes} classes; "
                       f"{'cached tensors' if cached else 'decoded'}; {skipped} unreadable file(s) skipped")
        return x_train, y_train, x_test, y_test

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if self.predict_root is not None and "predict" not in self.splits:
            root = Path(self.predict_root)
            files = sorted(str(f) for f in root.rglob("*") if f.is_file() and f.suffix.lower() in IMG_EXTENSIONS
                           and CACHE_DIR not in f.relative_to(root).parts)
            if not files:
                raise ValueError(f"data.predict_root={self.predict_root!r} holds no file with an image extension.")
            x, y, self.sample_ids["predict"], skipped, _ = self.decode_samples([(f, 0) for f in files], root, "all")
            self.splits["predict"] = (x, y)
            rank_zero_info(f"[data] {self.name}: predict {len(x):,} unlabelled images from {root} ({skipped} unreadable skipped)")
