"""tools/neumeta_table.py: the accuracy-vs-width table of several NeuMeta runs (means, the widths where NeuMeta is
below resampling, baselines) written to a file and into a README block."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import ROOT


def fake_run(directory: Path, neumeta: list[float], resample: list[float]) -> Path:
    widths = [8, 16, 32, 40]
    rows = [{"width": h, "neumeta": a, "l1_prune": (None if h > 32 else 0.5), "resample": r, "dead": 0.0}
            for h, a, r in zip(widths, neumeta, resample)]
    summary = {"metrics": {"test/pretrained/acc": 0.95, "test/zeroed/acc": 0.1},
               "neumeta": {"train_widths": [16, 32], "full_width": 32, "accuracy_vs_width": rows}}
    directory.mkdir(parents=True)
    (directory / "summary.json").write_text(json.dumps(summary))
    return directory


def test_the_table_marks_unseen_widths_lists_where_resampling_wins_and_fills_the_readme(tmp_path):
    runs = [fake_run(tmp_path / "s0", [0.60, 0.90, 0.94, 0.93], [0.40, 0.80, 0.95, 0.92]),
            fake_run(tmp_path / "s1", [0.70, 0.92, 0.94, 0.93], [0.50, 0.82, 0.95, 0.94])]
    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- suite:nm:begin -->\nold\n<!-- suite:nm:end -->\ntail\n")
    out = tmp_path / "results" / "t.md"
    done = subprocess.run([sys.executable, str(ROOT / "tools/neumeta_table.py"), *map(str, runs), "--plot",
                           str(tmp_path / "results" / "t.png"), "--out", str(out), "--readme", str(readme), "--block", "nm"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    text = out.read_text()
    assert "| 8 (unseen) | 65.00 ± 7.07 |" in text and "| 50.00 ± 0.00 | 45.00 ± 7.07 | +20.00 ± 0.00 |" in text and "| 40 (unseen, above N) | 93.00 ± 0.00 |" in text
    assert "| 16 | 91.00 ± 1.41 |" in text  # trained width: no mark
    assert "| 40 (unseen, above N) | 93.00 ± 0.00 | - | 93.00 ± 1.41 | +0.00 ± 1.41 |" in text  # pruning cannot widen
    assert "| pretrained (h = 32) | 95.00 ± 0.00 |" in text and "| generated part zeroed | 10.00 ± 0.00 |" in text
    assert "below resampling's: 32 (-1.00)." in text  # 40: 0.93 vs mean 0.93, not below
    assert text.rstrip().endswith("![accuracy vs width](t.png)") and (tmp_path / "results" / "t.png").stat().st_size > 1000
    spliced = readme.read_text()
    assert "old" not in spliced and "| 8 (unseen) |" in spliced and "](results/t.png)" in spliced and spliced.endswith("tail\n")
