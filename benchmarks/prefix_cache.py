"""Frozen-prefix cache: seconds per training epoch of a BERT classifier with and without it, one process.

The network and data are those of ``configs/sst2/baseline.yaml`` (offline: MiniLM-L6, rt-snippets-1k): the
top two layers and the classifier train, the embeddings and the layers below are frozen. Epochs alternate
uncached / cached so that machine noise hits both; the one-time cost of building the cache is printed apart.

    python benchmarks/prefix_cache.py --epochs 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from datamodules import SST2DataModule  # noqa: E402
from models import BertClassifier  # noqa: E402


def epoch(net: BertClassifier, loader, optimizer) -> float:
    start = time.perf_counter()
    net.train()
    for inputs, labels in loader:
        loss = F.cross_entropy(net(inputs), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=2, help="epochs of each kind")
    parser.add_argument("--train_size", type=int, default=1000)
    args = parser.parse_args()
    torch.manual_seed(0)
    dm = SST2DataModule(source="auto", encoder="auto", train_size=args.train_size, batch_size=32)
    dm.prepare_data()
    dm.setup("fit")
    net = BertClassifier(dm.input_shape, 2, encoder="auto", trainable_top_layers=2)
    optimizer = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-3)
    start = time.perf_counter()
    net.prepare_cache(dm.all_inputs())
    build = time.perf_counter() - start
    cache = net._cache
    times: dict[str, list[float]] = {"uncached": [], "cached": []}
    for _ in range(args.epochs):
        for kind in ("uncached", "cached"):
            net._cache = cache if kind == "cached" else None
            times[kind].append(epoch(net, dm.train_dataloader(), optimizer))
    uncached, cached = statistics.median(times["uncached"]), statistics.median(times["cached"])
    print(f"data: {dm.name} ({len(dm.splits['train'][1])} training sentences), encoder: {net.encoder_name}, "
          f"frozen layers cached: {net.frozen_depth()} of {len(net.layers)}, threads: {torch.get_num_threads()}")
    print(f"cache build (once, {cache.shape[0]} sentences): {build:.1f} s")
    print(f"uncached: {uncached:.1f} s/epoch  (epochs: {', '.join(f'{t:.1f}' for t in times['uncached'])})")
    print(f"cached  : {cached:.1f} s/epoch  (epochs: {', '.join(f'{t:.1f}' for t in times['cached'])})")
    print(f"speed-up (uncached / cached): {uncached / cached:.2f}x")


if __name__ == "__main__":
    main()
