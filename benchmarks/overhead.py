"""Framework overhead: train.py's machinery vs a plain PyTorch loop, same model, same tensors, one process.

Both train the MLP of ``--config`` on the datamodule's in-memory training tensors with the same batch size and
optimiser and evaluate on the same validation split every epoch. The Lightning side is exactly what
``python train.py fit --config ...`` builds (logger, checkpointing, metrics, progress bar, summaries); the plain
side is a bare loop over index batches. Epochs alternate one by one (a plain epoch runs just before every
Lightning epoch, from the timing callback) so that machine noise hits both alike; the script prints the median
seconds per epoch of each and the median of the per-pair ratios.

    python benchmarks/overhead.py --config configs/fashion_mnist/baseline.yaml --epochs 3
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402


class EpochTimer(Callback):
    """Wall time from a training epoch's start to its end (its validation and checkpoint included); with
    ``before_each``, that function runs (untimed here) just before every epoch starts."""

    def __init__(self, before_each=None) -> None:
        self.seconds: list[float] = []
        self.before_each = before_each

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self.before_each is not None:
            self.before_each()
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.seconds.append(time.perf_counter() - self._start)


def plain_epochs(cli: train.MorphLabCLI, epochs: int) -> list[float]:
    """A bare training loop over the same tensors with a fresh copy of the same network and optimiser."""
    dm = cli.datamodule
    torch.manual_seed(0)
    net = cli.model.build_network(cli.model.net_factory)
    optimizer = cli.model.optimizer_factory(net.parameters())
    x_train, y_train = dm.splits["train"]
    times = []
    for _ in range(epochs):
        start = time.perf_counter()
        net.train()
        order = torch.randperm(len(x_train))
        for i in range(0, len(order), dm.batch_size):
            idx = order[i : i + dm.batch_size]
            loss = F.cross_entropy(net(dm.batch_transform(x_train[idx], True)), y_train[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        plain_validation(cli, net)
        times.append(time.perf_counter() - start)
    return times


def plain_validation(cli: train.MorphLabCLI, net: torch.nn.Module) -> None:
    """The plain loop's validation pass: forward, argmax and the count of right answers, batch by batch."""
    dm = cli.datamodule
    x_val, y_val = dm.splits["val"]
    net.eval()
    with torch.inference_mode():
        for i in range(0, len(x_val), dm.eval_batch_size):
            net(dm.batch_transform(x_val[i : i + dm.eval_batch_size], False)).argmax(-1).eq(y_val[i : i + dm.eval_batch_size]).sum()


def build_cli(config: str, epochs: int, save_dir: str, extra: list[str]) -> train.MorphLabCLI:
    """What ``train.py fit --config CONFIG`` builds (not run), logging into ``save_dir``, its data set up."""
    cli = train.main(
        ["--config", config, f"--trainer.max_epochs={epochs}", f"--trainer.logger.init_args.save_dir={save_dir}", *extra],
        run=False,
    )
    cli.datamodule.setup("fit")
    return cli


@contextlib.contextmanager
def cli_from_arguments(doc: str, epochs: int, epochs_help: str) -> Iterator[tuple[train.MorphLabCLI, str]]:
    """(CLI, config) from the benchmark's command line (``--config``, ``--epochs``; the rest goes to train.py), the
    CLI logging into a temporary directory removed afterwards."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--config", default="configs/fashion_mnist/baseline.yaml")
    parser.add_argument("--epochs", type=int, default=epochs, help=epochs_help)
    args, extra = parser.parse_known_args()
    with tempfile.TemporaryDirectory() as tmp:
        yield build_cli(args.config, args.epochs, tmp, extra), args.config


def main() -> None:
    with cli_from_arguments(__doc__, 9, "epoch pairs (plain, Lightning) to time (pair ratios vary by 0.1-0.3 on a shared VM)") as (cli, config):
        plain_epochs(cli, 1)  # warm-up, not counted
        plain: list[float] = []
        timer = EpochTimer(before_each=lambda: plain.extend(plain_epochs(cli, 1)))
        cli.trainer.callbacks.append(timer)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    ratios = [lit / ref for lit, ref in zip(timer.seconds, plain)]
    print(f"threads: {torch.get_num_threads()}  config: {config}")
    print(f"plain PyTorch loop : {statistics.median(plain):.3f} s/epoch  (epochs: {', '.join(f'{t:.2f}' for t in plain)})")
    print(f"train.py machinery : {statistics.median(timer.seconds):.3f} s/epoch  (epochs: {', '.join(f'{t:.2f}' for t in timer.seconds)})")
    print(f"ratio (train.py / plain), median of {len(ratios)} pairs: {statistics.median(ratios):.3f}  (pairs: {', '.join(f'{r:.2f}' for r in ratios)})")


if __name__ == "__main__":
    main()
