"""Where a NeuMeta training step's time goes: the INR (queries x MACs per query) against the target network.

    python tools/neumeta_step_cost.py                      # the MNIST CNN protocol: width 32, H 256, F 16, batch 128
    python tools/neumeta_step_cost.py --target head --width 64 --hidden 128 --freqs 8 --batch 64

Prints, per part, the median milliseconds of a forward + backward over ``--repeats`` alternating rounds (the parts
are timed in turn in one process, so a shared machine slows them alike), the number of INR queries and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.func import functional_call

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models import NeuMetaCNN, NeuMetaHead  # noqa: E402
from models.neumeta_inr import NeuMetaINR  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", choices=["cnn", "head"], default="cnn")
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--freqs", type=int, default=16)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.manual_seed(0)
    shape = (1, 28, 28) if args.target == "cnn" else (64,)
    net = (NeuMetaCNN if args.target == "cnn" else NeuMetaHead)(shape, 10, width=args.width).requires_grad_(False)
    inr = NeuMetaINR(net.layout, norm=args.width, hidden=args.hidden, layers=args.layers, num_freqs=args.freqs)
    x, y = torch.randn(args.batch, *shape), torch.randint(0, 10, (args.batch,))
    queries = len(inr.table(args.width).raw)

    def inr_only() -> None:
        sum(t.sum() for t in inr(args.width, 1.0).values()).backward()

    fixed = {k: v.detach().clone().requires_grad_(True) for k, v in inr(args.width, 1.0).items()}

    def target_only() -> None:
        torch.nn.functional.cross_entropy(functional_call(net, fixed, (x,)), y).backward()

    def whole_step() -> None:
        torch.nn.functional.cross_entropy(functional_call(net, inr(args.width, 1.0), (x,)), y).backward()

    parts = {"INR generate": inr_only, "target forward": target_only, "whole step": whole_step}
    times = {name: [] for name in parts}
    for part in parts.values():
        part()  # warm-up
    for _ in range(args.repeats):
        for name, part in parts.items():
            inr.zero_grad(set_to_none=True)
            start = time.perf_counter()
            part()
            times[name].append(1000 * (time.perf_counter() - start))
    print(f"{args.target} width {args.width}: {queries:,} INR queries per step, INR {sum(p.numel() for p in inr.parameters()):,} "
          f"parameters (H {args.hidden}, L {args.layers}, F {args.freqs}), batch {args.batch}, {torch.get_num_threads()} threads")
    whole = statistics.median(times["whole step"])
    for name, values in times.items():
        median = statistics.median(values)
        print(f"  {name:15s} {median:8.1f} ms (forward + backward)  {median / whole:5.2f} of the step")


if __name__ == "__main__":
    main()
