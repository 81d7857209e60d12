"""Baseline: plain supervised training of a network (MLP, ConvNet, ...), the reference every technique meets."""

from lightning_modules.base import ClassificationModule


class Baseline(ClassificationModule):
    """Cross-entropy training of ``net`` with every parameter trainable; see ``ClassificationModule``."""

    technique = "baseline"
