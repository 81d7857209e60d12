"""Your own table: a CSV or Parquet file, one row per sample, a column of class labels.

Read with pandas (Parquet through pyarrow). The classes are the target column's distinct values, sorted (label
``i`` is ``class_names[i]``); rows without a target are dropped and counted. The test split is a seeded stratified
``test_fraction`` of the rows, the validation split is carved from the rest as for every datamodule, and everything
fitted is fitted on the non-test rows only (the training rows, validation rows included):

* numeric feature columns: a missing value becomes the training rows' median, then every column is standardised
  with the training rows' mean and standard deviation;
* ``categorical`` columns: one-hot over the categories seen in the training rows (in sorted order); a missing
  or unseen category is the all-zero vector.

A non-numeric column must be declared categorical or left out of ``features``. The same table as CSV and as
Parquet gives the same tensors, so the same splits and metrics (tests/test_table.py).
"""

import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from constraints import OpenFraction, PositiveInt
from datamodules.tensor_data import TensorDataModule, stratified_split

READERS = {".csv": pd.read_csv, ".parquet": pd.read_parquet, ".pq": pd.read_parquet}


def read_table(path: str) -> pd.DataFrame:
    """The table at ``path`` (``.csv``, ``.parquet`` or ``.pq``), or one sentence saying why not."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"data.path={path!r}: no such file.")
    reader = READERS.get(file.suffix.lower())
    if reader is None:
        raise ValueError(f"data.path={path!r}: expected a .csv, .parquet or .pq file.")
    try:
        table = reader(file)
    except pd.errors.EmptyDataError:
        table = pd.DataFrame()
    if table.empty:
        raise ValueError(f"data.path={path!r}: the table has no rows.")
    return table


class TableDataModule(TensorDataModule):
    """A CSV or Parquet table as standardised float features (see the module docstring for the policies).

    Args:
        path: the table file.
        target: the column of class labels.
        features: the feature columns (default: every column but the target).
        categorical: columns to one-hot encode (each must be among the features).
        test_fraction: share of the rows held out (stratified, ``split_seed``) as the test split.
        predict_path: a table of unlabelled rows (the same feature columns; a target column, if any, is ignored)
            that ``predict`` classifies instead of the test split, encoded with the training rows' statistics;
            ids are its rows.
        **kwargs: see ``TensorDataModule`` (batch_size defaults to 64 here).
    """

    def __init__(
        self,
        path: str,
        target: str,
        features: list[str] | None = None,
        categorical: list[str] | None = None,
        test_fraction: OpenFraction = 0.2,
        predict_path: str | None = None,
        batch_size: PositiveInt = 64,
        **kwargs,
    ) -> None:
        super().__init__(batch_size=batch_size, **kwargs)
        self.name = Path(path).stem
        table = read_table(path)
        if target not in table.columns:
            raise ValueError(f"data.target={target!r} is not a column of {path} (columns: {', '.join(map(str, table.columns))}).")
        features = [c for c in table.columns if c != target] if features is None else list(features)
        categorical = list(categorical or [])
        for column in (*features, *categorical):
            if column not in table.columns or column == target:
                raise ValueError(f"{column!r} is not a feature column of {path}.")
        not_features = sorted(set(categorical) - set(features))
        if not_features:
            raise ValueError(f"categorical column(s) {not_features} are not among data.features.")
        for column in features:
            if column not in categorical and not pd.api.types.is_numeric_dtype(table[column]):
                raise ValueError(f"column {column!r} of {path} is not numeric; list it in data.categorical (one-hot) "
                                 "or leave it out of data.features.")
        labelled = table[table[target].notna()]
        file_rows = labelled.index.to_numpy()
        labelled = labelled.reset_index(drop=True)
        self.dropped_rows = len(table) - len(labelled)
        labels = pd.Categorical(labelled[target])
        self.class_names = [str(c) for c in labels.categories]
        if len(self.class_names) < 2:
            raise ValueError(f"the target column {target!r} of {path} has {len(self.class_names)} class(es); a classifier needs two or more.")
        self.num_classes = len(self.class_names)
        y = torch.as_tensor(labels.codes.astype(np.int64))
        train, test = stratified_split(y, test_fraction, self.split_seed)
        self.features, self.categorical = features, categorical
        self.predict_path = self.predict_inputs = predict_path  # sample ids: the rows of path / predict_path
        self._fit_encoding(labelled, train.numpy())
        x = self.encode(labelled)
        self._x_train, self._x_test = x[train], x[test]
        self._y_train, self._y_test = y[train], y[test]
        self.test_rows = file_rows[test.numpy()].tolist()  # the file's row (from 0, header aside) of every test sample
        self.sample_ids["test"] = self.test_rows
        self.input_shape = (self._x_train.shape[1],)
        self.source = (f"{path}: {len(labelled):,} rows, {len(features)} feature columns ({len(categorical)} one-hot) -> "
                       f"{self.input_shape[0]} inputs; {self.dropped_rows} row(s) without a target dropped; missing "
                       "numbers: training median; missing or unseen categories: all zeros")

    def _fit_encoding(self, table: pd.DataFrame, rows: np.ndarray) -> None:
        """Per feature column, what encoding needs, from ``rows`` only: the categories seen, or the median, mean
        and standard deviation (after filling with the median)."""
        self.encoding: dict[str, tuple] = {}
        for column in self.features:
            values = table[column].iloc[rows]
            if column in self.categorical:
                self.encoding[column] = ("onehot", sorted(values.dropna().astype(str).unique()))
            else:
                numbers = values.to_numpy(dtype=np.float64, na_value=np.nan)
                median = float(np.nanmedian(numbers)) if not np.isnan(numbers).all() else 0.0
                filled = np.where(np.isnan(numbers), median, numbers)
                std = float(filled.std())
                self.encoding[column] = ("number", median, float(filled.mean()), std if std > 0 and math.isfinite(std) else 1.0)

    def encode(self, table: pd.DataFrame) -> Tensor:
        """The float feature matrix of ``table``'s rows under the fitted encoding."""
        parts = []
        for column in self.features:
            values, (kind, *fitted) = table[column], self.encoding[column]
            if kind == "onehot":
                as_text = values.astype(str).where(values.notna())
                parts.append(np.stack([(as_text == category).to_numpy(dtype=np.float32) for category in fitted[0]], axis=1))
            else:
                median, mean, std = fitted
                numbers = values.to_numpy(dtype=np.float64, na_value=np.nan)
                parts.append(((np.where(np.isnan(numbers), median, numbers) - mean) / std)[:, None].astype(np.float32))
        return torch.from_numpy(np.concatenate(parts, axis=1))

    def load(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self._x_train, self._y_train, self._x_test, self._y_test

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if self.predict_path is not None and "predict" not in self.splits:
            table = read_table(self.predict_path)
            missing = [c for c in self.features if c not in table.columns]
            if missing:
                raise ValueError(f"data.predict_path={self.predict_path!r} lacks the feature column(s) {missing}.")
            x = self.encode(table)
            self.splits["predict"] = (x, torch.zeros(len(x), dtype=torch.long))
            self.sample_ids["predict"] = list(range(len(x)))
