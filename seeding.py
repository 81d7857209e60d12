"""Every seed of a run, derived in one place from the run's ``seed_everything`` value.

A run draws from several random streams: the batch order of each epoch, the global RNGs at each epoch start
(dropout, width sampling), one generator per augmented sample and NeuMeta's evaluation noise per width. Each is
seeded by a pure function of ``(seed, key)``, so a resumed run, a run on another process count and an
uninterrupted run draw the same numbers (Lightning does not restore RNG states itself).

Plain Python and torch, no Lightning: datamodules, LightningModules and models all import it.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch
from torch import Tensor

STREAM = 1_000_003  # a prime: the streams of seeds s and s + 1 do not overlap for keys below it
SAMPLE = 1_000_033


def global_seed() -> int:
    """The seed given to ``seed_everything`` (LightningCLI's ``seed_everything:``), 0 when none was set."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


def stream_seed(seed: int, key: int) -> int:
    """The seed of stream ``key`` (an epoch, a width) of a run seeded with ``seed``: ``seed * 1_000_003 + key``."""
    return seed * STREAM + key


def reseed_global_rngs(seed: int, epoch: int) -> None:
    """Seed torch's, numpy's and Python's global RNGs for ``epoch`` (mod 2**32: numpy's limit)."""
    value = stream_seed(seed, epoch) % 2**32
    torch.manual_seed(value)
    np.random.seed(value)
    random.seed(value)


def sample_keys(seed: int, epoch: int, index: Tensor) -> Tensor:
    """One seed per sample, ``(stream_seed(seed, epoch) * 1_000_033 + index) mod 2**32``: 32 bits because
    torch's CPU generator (mt19937) keeps only the low 32 bits of a seed."""
    base = stream_seed(seed, epoch) * SAMPLE % 2**32
    return (base + index.long()) % 2**32
