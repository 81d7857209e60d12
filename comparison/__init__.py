"""The comparison harness behind compare.py: suites of runs (suite.py) and their report (report.py)."""
