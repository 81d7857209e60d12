"""Callbacks that change a run's network or schedule on Lightning's hooks (each resumable via ``state_dict``), and the
Trainer's default profiler (``NullProfiler``) and progress bar (``TimedProgressBar``)."""

from callbacks.checkpoint import BestAndLastCheckpoint
from callbacks.collapse import CollapseBlocks, ProgressiveCollapse
from callbacks.connectivity import ConnectivityImages
from callbacks.deploy import DeployedValidation, DeployExport
from callbacks.predictions import PredictionsCSV
from callbacks.profiler import NullProfiler
from callbacks.progress import TimedProgressBar
from callbacks.pruning import ProgressivePruning
from callbacks.sparsity import SparsityScheduler
from callbacks.temperature import TemperatureAnnealing

__all__ = ["BestAndLastCheckpoint", "TemperatureAnnealing", "SparsityScheduler", "ProgressivePruning", "ConnectivityImages",
           "CollapseBlocks", "ProgressiveCollapse", "DeployExport", "DeployedValidation", "NullProfiler", "PredictionsCSV",
           "TimedProgressBar"]
