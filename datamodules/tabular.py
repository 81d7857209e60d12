"""Small tabular benchmarks: the MorphoNet toy sets and scikit-learn's bundled real sets.

* ``moons``: ``make_moons(n_samples=600, noise=0.2, random_state=42)``.
* ``blobs5c``: despite the name not ``make_blobs`` but ``make_classification(n_samples=800, n_features=20,
  n_informative=18, n_redundant=2, n_classes=5, n_clusters_per_class=2, random_state=42)``.
* ``digits`` (1,797 x 64), ``iris``, ``wine``, ``breast_cancer``: scikit-learn's bundled copies (no download).

All: 80/20 train/test split with ``random_state=42`` (the MorphoNet protocol, spec 2.7), then standardised;
the validation split is carved from the training part as for every datamodule.
"""

from typing import Literal

import torch
from sklearn import datasets
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from torch import Tensor

from datamodules.tensor_data import TensorDataModule
from constraints import OpenFraction, PositiveInt

TabularName = Literal["moons", "blobs5c", "digits", "iris", "wine", "breast_cancer"]

# name -> (loader, number of features, number of classes); sizes are fixed so the model can be built first.
TABLES = {
    "moons": (lambda: datasets.make_moons(n_samples=600, noise=0.2, random_state=42), 2, 2),
    "blobs5c": (
        lambda: datasets.make_classification(
            n_samples=800, n_features=20, n_informative=18, n_redundant=2, n_classes=5,
            n_clusters_per_class=2, random_state=42,
        ),
        20,
        5,
    ),
    "digits": (lambda: datasets.load_digits(return_X_y=True), 64, 10),
    "iris": (lambda: datasets.load_iris(return_X_y=True), 4, 3),
    "wine": (lambda: datasets.load_wine(return_X_y=True), 13, 3),
    "breast_cancer": (lambda: datasets.load_breast_cancer(return_X_y=True), 30, 2),
}


class TabularDataModule(TensorDataModule):
    """One of the tables above as standardised float features.

    Args:
        dataset: moons, blobs5c, digits, iris, wine or breast_cancer.
        test_fraction: share of the table used as the test split.
        split_random_state: ``random_state`` of the train/test split (42 in the MorphoNet protocol).
        scaler_fit: fit the StandardScaler on the training split (``train``, no test statistics leak) or on all
            rows (``all``, what the MorphoNet code does; parity configs set it).
        **kwargs: see ``TensorDataModule`` (batch_size defaults to 64 here).
    """

    def __init__(
        self,
        dataset: TabularName = "moons",
        test_fraction: OpenFraction = 0.2,
        split_random_state: int = 42,
        scaler_fit: Literal["train", "all"] = "train",
        batch_size: PositiveInt = 64,
        **kwargs,
    ) -> None:
        super().__init__(batch_size=batch_size, **kwargs)
        self.name = dataset
        _, features, self.num_classes = TABLES[dataset]
        self.input_shape = (features,)
        self.test_fraction, self.split_random_state, self.scaler_fit = test_fraction, split_random_state, scaler_fit

    def load(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        x, y = TABLES[self.name][0]()
        x_train, x_test, y_train, y_test = train_test_split(
            x, y, test_size=self.test_fraction, random_state=self.split_random_state
        )
        scaler = StandardScaler().fit(x if self.scaler_fit == "all" else x_train)
        self.source = f"scikit-learn {self.name} (scaler fitted on {self.scaler_fit})"
        as_x = lambda a: torch.tensor(scaler.transform(a), dtype=torch.float32)  # noqa: E731
        as_y = lambda a: torch.as_tensor(a, dtype=torch.long)  # noqa: E731
        return as_x(x_train), as_y(y_train), as_x(x_test), as_y(y_test)
