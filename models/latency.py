"""Inference latency of a model, measured the same way for every technique.

For each batch size ``b`` the example input (batch 1) is repeated to ``b`` rows; the model runs in eval mode under
``torch.inference_mode`` for ``warmup`` untimed calls, then is timed call by call (``time.perf_counter``) for
``repeats`` calls or until ``budget_seconds`` have passed (at least ``min_repeats`` calls), and the *median* call
time is reported: the median shrugs off the scheduler hiccups of a shared machine that a mean would absorb.
The thread count is recorded, because a latency means nothing without it.

Written by hand rather than with ``torch.utils.benchmark.Timer`` because the time budget must bound the slow
models (a BERT at batch 256) while the fast ones (a tiny MLP) still get many repeats.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn


def _repeat_batch(example: Any, batch_size: int) -> Any:
    """The batch-1 example repeated to ``batch_size`` rows (tuples/lists/dicts of tensors alike)."""
    if isinstance(example, Tensor):
        return example[:1].expand(batch_size, *example.shape[1:]).contiguous()
    if isinstance(example, (tuple, list)):
        return type(example)(_repeat_batch(e, batch_size) for e in example)
    if isinstance(example, dict):
        return {k: _repeat_batch(v, batch_size) for k, v in example.items()}
    return example


def time_calls(
    run: Callable[[Any], Any],
    example: Any,
    batch_sizes: Sequence[int] = (1, 256),
    warmup: int = 3,
    repeats: int = 20,
    min_repeats: int = 3,
    budget_seconds: float = 2.0,
    threads: int | None = None,
) -> dict[str, Any]:
    """Median wall time of ``run(batch)`` per batch size, in milliseconds, for any runtime (PyTorch, ONNX Runtime).

    Returns ``{"threads", "warmup", "repeats": {b: n}, "ms": {b: median}, "ms_per_sample": {b: median / b}}``
    with batch sizes as string keys (JSON); ``example`` (batch 1) is repeated to each batch size.
    """
    result: dict[str, Any] = {"threads": threads or torch.get_num_threads(), "warmup": warmup, "repeats": {}, "ms": {},
                              "ms_per_sample": {}}
    for batch_size in batch_sizes:
        inputs = _repeat_batch(example, batch_size)
        for _ in range(warmup):
            run(inputs)
        times: list[float] = []
        deadline = time.perf_counter() + budget_seconds
        while len(times) < repeats and (len(times) < min_repeats or time.perf_counter() < deadline):
            start = time.perf_counter()
            run(inputs)
            times.append(time.perf_counter() - start)
        median_ms = statistics.median(times) * 1e3
        key = str(batch_size)
        result["repeats"][key] = len(times)
        result["ms"][key] = round(median_ms, 4)
        result["ms_per_sample"][key] = round(median_ms / batch_size, 6)
    return result


def measure_latency(model: nn.Module, example: Any, batch_sizes: Sequence[int] = (1, 256), **timing: Any) -> dict[str, Any]:
    """``time_calls`` of ``model`` in eval mode under ``torch.inference_mode``. ``example`` is one input (a
    tensor, or a tuple of tensors passed as positional arguments) whose first dimension is the batch; on a CUDA
    device every call is followed by ``torch.cuda.synchronize`` (kernels run asynchronously)."""
    was_training = model.training
    model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def run(inputs: Any) -> None:
        model(*(inputs if isinstance(inputs, tuple) else (inputs,)))
        sync()

    try:
        with torch.inference_mode():
            return time_calls(run, example, batch_sizes, **timing)
    finally:
        model.train(was_training)
