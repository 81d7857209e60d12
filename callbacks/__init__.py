"""Callbacks that change a run's network or schedule on Lightning's hooks (each resumable via ``state_dict``)."""

from callbacks.checkpoint import BestAndLastCheckpoint

__all__ = ["BestAndLastCheckpoint"]
