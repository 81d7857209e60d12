"""The Trainer's default profiler: Lightning's pass-through profiler without its per-hook cost.

Lightning wraps every hook call in ``trainer.profiler.profile(name)``, about 200 a training step with morphlab's
callbacks; even ``PassThroughProfiler`` builds a generator-based context manager (and the hook's name string) for
each, about 1 us a call on these machines, ~3 % of a small MLP's step. This one hands back a single shared
``nullcontext``. ``--trainer.profiler=simple`` (or ``advanced``, ``pytorch``) replaces it as usual.
"""

from __future__ import annotations

from contextlib import nullcontext

from lightning.pytorch.profilers import PassThroughProfiler

_NOTHING = nullcontext()


class NullProfiler(PassThroughProfiler):
    """Profiles nothing, at the cost of one attribute lookup per hook."""

    def profile(self, action_name: str) -> nullcontext:  # type: ignore[override]
        return _NOTHING
