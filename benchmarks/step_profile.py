"""Where a training step's time goes: train.py's machinery against a plain PyTorch loop, segment by segment.

The same network, optimiser and tensors as ``benchmarks/overhead.py``. Lightning's side is timed with
``perf_counter`` marks on its own hooks (batch start/end, before/after backward, before the optimizer step) and on
the network's forward (pre-hook and hook); the plain loop marks the same points inline. Epochs alternate (a plain
epoch just before every Lightning epoch) and each segment's per-step median is taken over all epochs, so noise on
this shared machine hits both sides alike. Segments:

* ``fetch``: the end of one step to the start of the next (next batch, Lightning's batch-end and batch-start work);
* ``before forward``: batch start to the network's forward (Lightning: hooks, batch transfer, the optimizer closure);
* ``forward``: the network's forward;
* ``loss and logging``: forward end to just before backward (loss, training metrics, zero_grad);
* ``backward``;
* ``after backward``: backward end to the optimizer step;
* ``optimizer step``: the update, the LR scheduler and whatever Lightning does until batch end.

    python benchmarks/step_profile.py --config configs/fashion_mnist/baseline.yaml --epochs 4
"""

from __future__ import annotations

import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402
from overhead import cli_from_arguments, plain_validation  # noqa: E402  (benchmarks/overhead.py: the same model and data)

SEGMENTS = ["fetch", "before forward", "forward", "loss and logging", "backward", "after backward", "optimizer step"]
MARKS = ["batch_start", "forward_start", "forward_end", "backward_start", "backward_end", "step_start", "batch_end"]


def segments(marks: dict[str, float], previous_end: float | None) -> dict[str, float]:
    """Milliseconds per segment of one step from its marks (``fetch`` needs the previous step's end)."""
    times = [marks[m] for m in MARKS]
    out = {name: (b - a) * 1e3 for name, a, b in zip(SEGMENTS[1:], times[:-1], times[1:])}
    if previous_end is not None:
        out["fetch"] = (marks["batch_start"] - previous_end) * 1e3
    return out


class StepMarks(Callback):
    """Per-step segment times of a Lightning fit, from its hooks and forward hooks on the network."""

    def __init__(self, before_each_epoch) -> None:
        self.before_each_epoch = before_each_epoch
        self.times: dict[str, list[float]] = defaultdict(list)
        self._marks: dict[str, float] = {}
        self._end: float | None = None

    def setup(self, trainer, pl_module, stage) -> None:
        pl_module.net.register_forward_pre_hook(lambda *_: self._mark("forward_start"))
        pl_module.net.register_forward_hook(lambda *_: self._mark("forward_end"))

    def _mark(self, name: str) -> None:
        if name not in self._marks:  # the first forward of a step (validation forwards come after batch end)
            self._marks[name] = time.perf_counter()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.before_each_epoch()
        self._end = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._marks = {"batch_start": time.perf_counter()}

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        self._mark("backward_start")

    def on_after_backward(self, trainer, pl_module) -> None:
        self._mark("backward_end")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self._mark("step_start")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._marks["batch_end"] = time.perf_counter()
        for name, ms in segments(self._marks, self._end).items():
            self.times[name].append(ms)
        self._end = self._marks["batch_end"]
        self._marks = {"done": 0.0}  # validation forwards after the last batch mark nothing


def plain_epoch(cli: train.MorphLabCLI, net: torch.nn.Module, optimizer, times: dict[str, list[float]]) -> None:
    """One epoch of the plain loop over the same tensors, marked at the same points."""
    dm = cli.datamodule
    x_train, y_train = dm.splits["train"]
    net.train()
    order = torch.randperm(len(x_train))
    end = None
    for i in range(0, len(order), dm.batch_size):
        marks = {"batch_start": time.perf_counter()}
        idx = order[i : i + dm.batch_size]
        x, y = dm.batch_transform(x_train[idx], True), y_train[idx]
        marks["forward_start"] = time.perf_counter()
        logits = net(x)
        marks["forward_end"] = time.perf_counter()
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad()
        marks["backward_start"] = time.perf_counter()
        loss.backward()
        marks["backward_end"] = marks["step_start"] = time.perf_counter()
        optimizer.step()
        marks["batch_end"] = time.perf_counter()
        for name, ms in segments(marks, end).items():
            times[name].append(ms)
        end = marks["batch_end"]
    plain_validation(cli, net)


def main() -> None:
    with cli_from_arguments(__doc__, 4, "epoch pairs (plain, Lightning)") as (cli, config):
        torch.manual_seed(0)
        net = cli.model.build_network(cli.model.net_factory)
        optimizer = cli.model.optimizer_factory(net.parameters())
        plain: dict[str, list[float]] = defaultdict(list)
        plain_epoch(cli, net, optimizer, defaultdict(list))  # warm-up, not counted
        marks = StepMarks(before_each_epoch=lambda: plain_epoch(cli, net, optimizer, plain))
        cli.trainer.callbacks.append(marks)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    print(f"threads: {torch.get_num_threads()}  config: {config}  steps: {len(marks.times['forward'])} per side")
    print(f"| segment (median ms per step) | train.py | plain loop | difference |")
    print("|---|--:|--:|--:|")
    total_lit = total_plain = 0.0
    for name in SEGMENTS:
        lit, ref = statistics.median(marks.times[name]), statistics.median(plain[name])
        total_lit, total_plain = total_lit + lit, total_plain + ref
        print(f"| {name} | {lit:.3f} | {ref:.3f} | {lit - ref:+.3f} |")
    print(f"| sum of medians | {total_lit:.3f} | {total_plain:.3f} | {total_lit - total_plain:+.3f} |")


if __name__ == "__main__":
    main()
