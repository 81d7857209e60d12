"""Inference speed of deployed models side by side: the networks of several runs timed in one process.

A run's deployed network is its ``exported.json`` (``models.deploy``) when it wrote one, else (a Baseline) the network of its
checkpoint, rebuilt with the LightningModule class its ``config.yaml`` names. All models are timed in
interleaved rounds (machine noise hits every model alike) with ``models.latency.measure_latency``; the table
gives the median over rounds per batch size, the reference's time divided by each model's (the speed-up over
the first run), FLOPs per sample and parameters; a run that wrote ``exported.onnx`` is timed in ONNX Runtime
too, in the same rounds, beside its FLOPs ratio to the reference.

    python benchmarks/export_speed.py results/any_network/runs/mlp_dense/seed0 results/any_network/runs/mlp_unit/seed0
    python benchmarks/export_speed.py configs/fashion_mnist/resnet18.yaml results/any_network/runs/resnet18_morphonet_unit/seed0
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models.accounting import flops_per_sample  # noqa: E402
from models.latency import measure_latency  # noqa: E402
from models.deploy import load_exported, onnx_latency  # noqa: E402


def deployed_of(run_dir: Path) -> torch.nn.Module:
    """The run's exported network, or the deployed network of the checkpoint its summary names; a ``.pt`` file
    given instead of a run (``uncollapsed.json``) is that network."""
    if run_dir.suffix in (".yaml", ".yml"):
        return untrained_of(run_dir)
    if run_dir.is_file():
        return load_exported(run_dir).eval()
    exported = run_dir / "exported.json"
    if exported.exists():
        return load_exported(exported).eval()
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    module_path, _, class_name = config["model"]["class_path"].rpartition(".")
    module_class = getattr(importlib.import_module(module_path), class_name)
    checkpoint = json.loads((run_dir / "summary.json").read_text())["checkpoint"]
    return module_class.load_from_checkpoint(checkpoint, map_location="cpu").deployed_model().eval()


def untrained_of(config: Path) -> torch.nn.Module:
    """A config's deployed network before training (a Baseline's network as built): the speed of a dense
    reference does not depend on its weights, so a fresh checkout can time one without its run directory."""
    import tempfile

    import train

    with tempfile.TemporaryDirectory() as tmp:
        cli = train.main(["--config", str(config), f"--trainer.logger.init_args.save_dir={tmp}"], run=False)
    return cli.model.deployed_model().eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories, exported .pt files or configs (a "
                        "config: its network untrained, for a dense reference); the first is the reference")
    parser.add_argument("--input_shape", type=int, nargs="+", default=[1, 28, 28])
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 256])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    models = {str(run): deployed_of(run) for run in args.runs}
    onnx_files = {str(run): run / "exported.onnx" for run in args.runs if (run / "exported.onnx").is_file()}
    example = torch.randn(1, *args.input_shape)
    times: dict[str, dict[int, list[float]]] = {name: {b: [] for b in args.batch_sizes} for name in models}
    ort_times: dict[str, dict[int, list[float]]] = {name: {b: [] for b in args.batch_sizes} for name in onnx_files}
    for _ in range(args.rounds):
        for name, model in models.items():
            ms = measure_latency(model, example, args.batch_sizes, repeats=10, budget_seconds=1.0)["ms"]
            for b in args.batch_sizes:
                times[name][b].append(ms[str(b)])
            if name in onnx_files:  # the same network as exported.onnx, in ONNX Runtime, in the same round
                ms = onnx_latency(onnx_files[name], example, tuple(args.batch_sizes), repeats=10, budget_seconds=1.0)["ms"]
                for b in args.batch_sizes:
                    ort_times[name][b].append(ms[str(b)])
    reference = next(iter(models))
    print(f"threads {torch.get_num_threads()}, {args.rounds} interleaved rounds, median ms per forward pass; "
          "x ref: the reference's time / this one's (speed-up); ORT / ref: this run's ONNX Runtime time / the reference's")
    ort_header = "".join(f" ORT ms @ {b} | ORT / ref @ {b} |" for b in args.batch_sizes) if onnx_files else ""
    header = "| run | params | FLOPs/sample | FLOPs / ref | " + " | ".join(f"ms @ {b} | x ref @ {b}" for b in args.batch_sizes) + " |" + ort_header
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    reference_flops = flops_per_sample(lambda: models[reference](example))
    for name, model in models.items():
        flops = flops_per_sample(lambda: model(example))
        cells = []
        for b in args.batch_sizes:
            median = statistics.median(times[name][b])
            cells += [f"{median:.3f}", f"{statistics.median(times[reference][b]) / median:.2f}"]
        if onnx_files:
            for b in args.batch_sizes:
                if name in ort_times and reference in ort_times:
                    median = statistics.median(ort_times[name][b])
                    cells += [f"{median:.3f}", f"{median / statistics.median(ort_times[reference][b]):.2f}"]
                else:
                    cells += ["-", "-"]
        params = sum(p.numel() for p in model.parameters())
        print(f"| {name} | {params:,} | {flops:,} | {flops / reference_flops:.2f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
