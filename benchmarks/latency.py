"""Inference latency of exported models beside a dense reference, measured the same way for every model.

Each model runs in eval mode under ``torch.inference_mode`` on random inputs of ``--input_shape``; after a
warm-up, ``--repeats`` timed calls per batch size, median reported, thread count printed. Models are measured
in interleaved rounds so that machine noise hits all of them.

    python benchmarks/latency.py runs/fashion_mnist/morphonet_intended/version_0/exported.json \\
        --dense_mlp 784 512 512 10 --input_shape 1 28 28
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models.deploy import load_exported  # noqa: E402


@torch.inference_mode()
def time_call(model: nn.Module, x: torch.Tensor, repeats: int) -> float:
    """Median seconds of ``repeats`` calls (after 3 warm-up calls)."""
    for _ in range(3):
        model(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def dense_mlp(widths: list[int]) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("exported", nargs="+", type=Path, help="exported.json files (models.deploy)")
    parser.add_argument("--dense_mlp", nargs="+", type=int, help="widths of a dense MLP reference, e.g. 784 512 512 10")
    parser.add_argument("--input_shape", nargs="+", type=int, required=True)
    parser.add_argument("--batch_sizes", nargs="+", type=int, default=[1, 256])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    models = {str(p): load_exported(p).eval() for p in args.exported}
    if args.dense_mlp:
        models[f"dense MLP {args.dense_mlp}"] = dense_mlp(args.dense_mlp).eval()
    results: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.rounds):
        for batch in args.batch_sizes:
            x = torch.randn(batch, *args.input_shape)
            for name, model in models.items():
                results.setdefault((name, batch), []).append(time_call(model, x, args.repeats))
    print(f"threads: {torch.get_num_threads()}, repeats: {args.repeats} x {args.rounds} rounds (median)")
    for name, model in models.items():
        params = sum(p.numel() for p in model.parameters())
        cells = "  ".join(f"batch {b}: {1e3 * statistics.median(results[(name, b)]):.3f} ms" for b in args.batch_sizes)
        print(f"{name}: {params:,} params  {cells}")


if __name__ == "__main__":
    main()
