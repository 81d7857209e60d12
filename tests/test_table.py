"""TableDataModule on real data: scikit-learn's wine written as CSV and Parquet by the tests (tools/write_table.py)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import ROOT, quiet, run_cli, summary
from datamodules import TableDataModule
from tools.write_table import wine_table, write_tables

WINE = {"target": "cultivar", "categorical": ["color_band"]}


@pytest.fixture
def tables(tmp_path) -> tuple[Path, Path]:
    return write_tables(tmp_path / "tables")


def dm(path: Path, **kwargs) -> TableDataModule:
    module = TableDataModule(path=str(path), **{**WINE, **kwargs})
    module.setup("fit")
    return module


def test_csv_and_parquet_give_the_same_tensors(tables):
    csv, parquet = dm(tables[0]), dm(tables[1])
    assert csv.class_names == parquet.class_names == ["cultivar_0", "cultivar_1", "cultivar_2"]
    assert csv.input_shape == (12 + 3,)  # 12 numeric columns + 3 one-hot bands
    for split in ("train", "val", "test"):
        assert all(torch.equal(a, b) for a, b in zip(csv.splits[split], parquet.splits[split]))


def test_statistics_come_from_the_training_rows_and_missing_values_follow_the_policy(tables):
    data = dm(tables[0])
    table = wine_table()
    train_rows = sorted(set(range(len(table))) - set(data.test_rows))
    x = torch.cat([data._x_train, data._x_test])
    rows = train_rows + data.test_rows
    alcohol = table["alcohol"].to_numpy(dtype=float)
    median = np.nanmedian(alcohol[train_rows])
    filled = np.where(np.isnan(alcohol), median, alcohol)
    expected = (filled - filled[train_rows].mean()) / filled[train_rows].std()
    assert np.allclose(x[:, 0].numpy(), expected[rows], atol=1e-5)
    assert abs(float(data._x_train[:, 0].mean())) < 1e-5  # standardised on the training rows, not the test rows
    bands = x[:, -3:]  # one-hot columns in sorted order: high, low, mid
    band = table["color_band"].to_numpy()[rows]
    assert torch.equal(bands.sum(1) == 0, torch.as_tensor(pd.isna(band)))  # missing: all zeros
    assert torch.equal(bands[torch.as_tensor(band == "low"), 1], torch.ones(int((band == "low").sum())))


def test_the_test_split_is_stratified_and_seeded(tables):
    a, b, c = dm(tables[0]), dm(tables[0]), dm(tables[0], split_seed=1)
    assert a.test_rows == b.test_rows != c.test_rows
    counts = torch.bincount(torch.cat([a._y_train, a._y_test]))
    assert torch.equal(torch.bincount(a._y_test), torch.round(counts * 0.2).long())


@pytest.mark.parametrize(
    "edit, kwargs, message",
    [
        (lambda t: t.drop(columns="cultivar"), {}, r"data.target='cultivar' is not a column"),
        (None, {"categorical": []}, r"column 'color_band' .* is not numeric; list it in data.categorical"),
        (lambda t: t.assign(cultivar="cultivar_0"), {}, r"has 1 class\(es\)"),
        (lambda t: t.iloc[:0], {}, r"the table has no rows"),
        (None, {"categorical": ["colour"]}, r"'colour' is not a feature column"),
    ],
    ids=["missing target", "undeclared text column", "one class", "empty file", "unknown categorical"],
)
def test_bad_tables_are_refused_in_one_sentence(tmp_path, edit, kwargs, message):
    table = wine_table() if edit is None else edit(wine_table())
    path = tmp_path / "t.csv"
    table.to_csv(path, index=False)
    with pytest.raises(ValueError, match=message):
        dm(path, **kwargs)


def test_a_missing_file_and_a_foreign_suffix_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        dm(tmp_path / "absent.csv")
    (tmp_path / "t.xlsx").write_text("x")
    with pytest.raises(ValueError, match=r"expected a .csv, .parquet or .pq file"):
        dm(tmp_path / "t.xlsx")


def test_rows_without_a_target_are_dropped_and_counted(tmp_path):
    table = wine_table()
    table.loc[[0, 5, 9], "cultivar"] = None
    table.to_parquet(tmp_path / "t.parquet", index=False)
    data = dm(tmp_path / "t.parquet")
    assert data.dropped_rows == 3 and "3 row(s) without a target dropped" in data.source
    assert sum(len(s[0]) for s in data.splits.values()) == len(table) - 3
    assert not set(data.test_rows) & {0, 5, 9} and max(data.test_rows) < len(table)  # ids are the file's rows


def test_an_mlp_fits_on_the_parquet_table_from_the_cli(tables, tmp_path):
    cli = run_cli("fit", "--config", str(ROOT / "configs/wine_table/baseline.yaml"),
                  f"--data.init_args.path={tables[1]}", "--trainer.max_epochs=30", *quiet(tmp_path))
    result = summary(Path(cli.trainer.log_dir))
    assert result["dataset"] == "wine" and result["metrics"]["test/acc"] > 0.8

    best = cli.trainer.checkpoint_callback.best_model_path
    predicted = run_cli("predict", "--config", str(ROOT / "configs/wine_table/baseline.yaml"),
                        f"--data.init_args.path={tables[1]}", f"--ckpt_path={best}", *quiet(tmp_path, "predict"))
    rows = list(csv.DictReader(open(Path(predicted.trainer.log_dir) / "predictions.csv")))
    table = wine_table()
    assert len(rows) == 36 and {r["predicted"] for r in rows} <= {"cultivar_0", "cultivar_1", "cultivar_2"}
    assert all(table["cultivar"][int(r["sample"])] == r["label"] for r in rows)  # the sample id is the table row
    probabilities = [[float(r[f"p_cultivar_{c}"]) for c in range(3)] for r in rows]
    assert all(abs(sum(p) - 1) < 1e-5 for p in probabilities)
    accuracy = sum(r["predicted"] == r["label"] for r in rows) / len(rows)
    assert accuracy == pytest.approx(result["metrics"]["test/acc"], abs=1e-6)


def test_predict_path_classifies_unlabelled_rows_with_the_training_statistics(tables, tmp_path):
    data = dm(tables[0])
    unlabelled = wine_table().drop(columns="cultivar").iloc[data.test_rows]
    unlabelled.to_parquet(tmp_path / "new.parquet", index=False)
    with_predict = dm(tables[0], predict_path=str(tmp_path / "new.parquet"))
    assert torch.equal(with_predict.splits["predict"][0], data.splits["test"][0])  # the same rows, the same encoding
    assert with_predict.predict_labels() is None and with_predict.predict_ids() == list(range(36))
    unlabelled.drop(columns="proline").to_csv(tmp_path / "short.csv", index=False)
    with pytest.raises(ValueError, match=r"lacks the feature column\(s\) \['proline'\]"):
        dm(tables[0], predict_path=str(tmp_path / "short.csv"))
