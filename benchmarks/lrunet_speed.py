"""Training cost of layer reuse: seconds per training step and FLOPs per sample of N-LruNet for several N.

All networks train on the same random batch in one process, in interleaved rounds (machine noise hits every N
alike); the median step time is reported with the ratio to the first N and the FLOP ratio
(``torch.utils.flop_counter``), plus the projected seconds per FashionMNIST epoch (54,000 training images).

    python benchmarks/lrunet_speed.py --reuse 1 4 10 --input_shape 1 32 32
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
from models.accounting import flops_per_sample  # noqa: E402
from models.lrunet import LruNet  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reuse", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--input_shape", type=int, nargs=3, default=[1, 32, 32])
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--train_size", type=int, default=54_000, help="images per epoch for the projection")
    parser.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, *args.input_shape)
    y = torch.randint(0, 10, (args.batch_size,))
    nets = {n: LruNet(args.input_shape, 10, reuse=n, channels_last=args.channels_last) for n in args.reuse}
    optimizers = {n: torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9) for n, net in nets.items()}

    def step(n: int) -> None:
        loss = F.cross_entropy(nets[n](x), y)
        optimizers[n].zero_grad()
        loss.backward()
        optimizers[n].step()

    for n in nets:  # warm-up
        step(n)
    times: dict[int, list[float]] = {n: [] for n in nets}
    for _ in range(args.rounds):
        for n in nets:
            start = time.perf_counter()
            step(n)
            times[n].append(time.perf_counter() - start)
    one = torch.zeros(1, *args.input_shape)
    first = args.reuse[0]
    base_t, base_f = statistics.median(times[first]), None
    print(f"threads {torch.get_num_threads()}, batch {args.batch_size}, input {tuple(args.input_shape)}, "
          f"channels_last {args.channels_last}, median of {args.rounds} steps")
    print(f"{'N':>3} {'params':>9} {'MFLOPs/img':>11} {'flop ratio':>10} {'s/step':>8} {'time ratio':>10} {'s/epoch (proj.)':>16}")
    for n, net in nets.items():
        net.eval()
        flops = flops_per_sample(lambda: net(one))
        base_f = base_f or flops
        t = statistics.median(times[n])
        params = sum(p.numel() for p in net.parameters())
        print(f"{n:>3} {params:>9,} {flops / 1e6:>11.1f} {flops / base_f:>10.2f} {t:>8.3f} {t / base_t:>10.2f} "
              f"{t * args.train_size / args.batch_size:>16.0f}")


if __name__ == "__main__":
    main()
