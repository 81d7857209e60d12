"""NeuMeta (spec shared/specs/neumeta.md): start at ``module.py``, the class ``NeuMeta`` and its training step;
``preparation.py`` (pretrain, fold BatchNorm, smooth, warm start), ``evaluation.py`` (val/test per width, baselines,
width table, collapse check) and ``plot.py`` (accuracy vs width) hold its other jobs."""

from lightning_modules.neumeta.module import NeuMeta

__all__ = ["NeuMeta"]
