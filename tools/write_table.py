"""Write scikit-learn's wine table (real, bundled) as CSV and Parquet in the shape of a researcher's own table: a
``cultivar`` target column of names, the ``color_intensity`` measurement replaced by a categorical ``color_band``
(low / mid / high, its training-free tertiles), and 5 % of the feature cells blanked (seed 0), so that
``datamodules.TableDataModule``'s categorical and missing-value paths run on real data (``make data-folders``).

    python tools/write_table.py --out data/tables
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.datasets import load_wine


def wine_table(missing: float = 0.05, seed: int = 0) -> pd.DataFrame:
    bunch = load_wine(as_frame=True)
    table = bunch.frame.rename(columns={"target": "cultivar"})
    table["cultivar"] = [f"cultivar_{int(c)}" for c in table["cultivar"]]
    table["color_band"] = pd.qcut(table.pop("color_intensity"), 3, labels=["low", "mid", "high"]).astype(str)
    features = [c for c in table.columns if c != "cultivar"]
    rng = np.random.default_rng(seed)
    for column in features:
        blank = rng.random(len(table)) < missing
        table[column] = table[column].astype(object if column == "color_band" else float).where(~blank, None)
    return table


def write_tables(out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    table = wine_table()
    csv, parquet = out / "wine.csv", out / "wine.parquet"
    table.to_csv(csv, index=False)
    table.to_parquet(parquet, index=False)
    return csv, parquet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="data/tables")
    csv, parquet = write_tables(Path(parser.parse_args().out))
    print(f"wrote {csv} and {parquet}")


if __name__ == "__main__":
    main()
