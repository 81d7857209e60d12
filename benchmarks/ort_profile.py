"""Where ONNX Runtime spends a deployed model's time: per-operator times from ORT's own profiler.

For every run given (its ``exported.onnx``; or an ``.onnx`` file), one CPU session with ``enable_profiling``
runs ``--runs`` batches of ``--batch`` random inputs after a warm-up, the models taking turns (``--rounds``); the
profile's node events are summed per operator type and divided by the runs. The table gives, per model, the time of a whole ``run()``, the time in
matrix products (MatMul/Gemm/Conv), in everything else (element-wise, normalisation, reshapes), and what is left
outside the nodes (the session's fixed cost: feeding inputs, allocating outputs); beside them the FLOPs per
sample from ``summary.json`` and, against the first model, the ratios of FLOPs, of matrix-product time and of
the whole run. It answers whether a model that saves FLOPs but not latency spends its time outside the FLOPs
(``summary.json``'s FLOPs count matrix products and convolutions only).

    python benchmarks/ort_profile.py results/quick/runs/baseline/seed0 results/quick/runs/morphreuse/seed0 \\
        results/quick/runs/neumeta/seed0 --batch 256
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

PRODUCTS = {"MatMul", "Gemm", "Conv", "FusedMatMul", "FusedGemm", "FusedConv", "QLinearMatMul", "MatMulInteger"}
DTYPES = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_}


def onnx_and_flops(path: Path) -> tuple[Path, float | None]:
    """The ONNX file of a run directory (or the file itself) and the run's FLOPs per sample, when recorded."""
    if path.suffix == ".onnx":
        return path, None
    summary = json.loads((path / "summary.json").read_text()) if (path / "summary.json").exists() else {}
    flops = summary.get("accounting", summary).get("flops_per_sample")
    return path / "exported.onnx", flops


def random_feed(session: ort.InferenceSession, batch: int, generator: np.random.Generator) -> dict[str, np.ndarray]:
    """A batch of ``batch`` random inputs of every input's shape and type (token ids: zeros)."""
    feed = {}
    for node in session.get_inputs():
        shape = [batch if i == 0 else (d if isinstance(d, int) else 16) for i, d in enumerate(node.shape)]
        dtype = DTYPES[node.type]
        feed[node.name] = generator.standard_normal(shape).astype(dtype) if dtype == np.float32 else np.zeros(shape, dtype)
    return feed


def open_session(path: Path, threads: int, tmp: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.log_severity_level = 3
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(tmp) / path.parent.name)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def profile_all(paths: list[Path], batch: int, runs: int, rounds: int, warmup: int, threads: int) -> list[dict]:
    """Mean milliseconds per run, per operator type and whole, for every model, from one profiled session
    each; the models take turns, ``runs / rounds`` calls at a time, so that machine noise hits them alike."""
    with tempfile.TemporaryDirectory() as tmp:
        sessions = [open_session(path, threads, tmp) for path in paths]
        feeds = [random_feed(session, batch, np.random.default_rng(0)) for session in sessions]
        for session, feed in zip(sessions, feeds):
            for _ in range(warmup):
                session.run(None, feed)
        for _ in range(rounds):
            for session, feed in zip(sessions, feeds):
                for _ in range(max(1, runs // rounds)):
                    session.run(None, feed)
        profiles = [json.loads(Path(session.end_profiling()).read_text()) for session in sessions]
    counted_runs = max(1, runs // rounds) * rounds
    results = []
    for events in profiles:
        counted = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"][-counted_runs:]
        start = counted[0]["ts"]  # the warm-up runs are in the profile too
        by_op: dict[str, float] = defaultdict(float)
        for event in events:
            if event.get("cat") == "Node" and event["name"].endswith("_kernel_time") and event["ts"] >= start:
                by_op[event["args"]["op_name"]] += event["dur"] / 1000 / counted_runs
        results.append({"run_ms": statistics.fmean(e["dur"] / 1000 for e in counted), "by_op": dict(by_op)})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", type=Path, help="run directories (with exported.onnx) or .onnx files")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=10, help="turns the models take (runs are split among them)")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    found = [onnx_and_flops(model) for model in args.models]
    for path, _ in found:
        if not path.exists():
            sys.exit(f"ort_profile.py: {path} does not exist (a run writes exported.onnx at the end of its test).")
    results = profile_all([path for path, _ in found], args.batch, args.runs, args.rounds, args.warmup, args.threads)
    rows = []
    for model, (path, flops), result in zip(args.models, found, results):
        products = sum(ms for op, ms in result["by_op"].items() if op in PRODUCTS)
        nodes = sum(result["by_op"].values())
        rows.append({"name": model.parent.name if model.name.startswith("seed") else model.stem, "flops": flops,
                     "run": result["run_ms"], "products": products, "other": nodes - products,
                     "outside": result["run_ms"] - nodes, "by_op": result["by_op"]})
    ref = rows[0]
    print(f"ONNX Runtime CPU, batch {args.batch}, {args.threads} thread(s), {args.runs} profiled runs in {args.rounds} "
          "interleaved rounds; mean ms per run")
    print("| model | FLOPs/sample | run | matrix products | other ops | outside nodes | FLOPs ratio | products ratio | run ratio |")
    print("|---|--:|--:|--:|--:|--:|--:|--:|--:|")
    for row in rows:
        flops_ratio = f"{row['flops'] / ref['flops']:.2f}" if row["flops"] and ref["flops"] else "-"
        flops = f"{row['flops']:,.0f}" if row["flops"] else "-"
        print(f"| {row['name']} | {flops} | {row['run']:.3f} | {row['products']:.3f} | {row['other']:.3f} | "
              f"{row['outside']:.3f} | {flops_ratio} | {row['products'] / ref['products']:.2f} | {row['run'] / ref['run']:.2f} |")
    print("\nper operator type (ms per run):")
    for row in rows:
        ops = sorted(row["by_op"].items(), key=lambda kv: -kv[1])
        print(f"  {row['name']}: " + ", ".join(f"{op} {ms:.3f}" for op, ms in ops))


if __name__ == "__main__":
    main()
