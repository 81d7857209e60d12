"""Write the tested network as the files deployment reads, check them, and time them in ONNX Runtime.

``DeployExport`` is on in every ``train.py`` run (``--deploy.*``): at the end of ``test`` (which ``fit`` ends with,
on the checkpoint it reports), the deployed model (``deployed_model()``: LoRA merged, MorphoNet exported,
LayerCollapse collapsed, NeuMeta generated, the rest as trained) is traced once by ``torch.export`` and written
into the run directory (``models.deploy``):

* ``exported.json`` + ``exported.safetensors``: the PyTorch program, nothing to unpickle
  (``models.deploy.load_exported``); re-loaded and compared with the model on the first real test batch;
* ``exported.onnx`` (opset 20, dynamic batch): run in ONNX Runtime on the same batch (max |delta| <= 1e-4 and the
  same argmax, else the run stops with one sentence) and timed at batch 1 and 256 beside PyTorch's latency.

What it measured goes into ``summary.json`` under ``deploy``. ``--deploy.onnx false`` / ``--deploy.program false``
skip the files (the test suite does, except where it tests them).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from lightning_modules.summary import save_summary
from models import deploy
from models.accounting import count_nonzero

ONNX_TOLERANCE = 1e-4


def _cpu_rows(batch: Any, rows: int) -> Any:
    return pytree.tree_map(lambda t: t[:rows].detach().cpu().clone() if isinstance(t, Tensor) else t, batch)


class DeployExport(pl.Callback):
    """See the module docstring.

    Args:
        program: write and check ``exported.json`` + ``exported.safetensors``.
        onnx: write, check and time ``exported.onnx`` (needs ``program``'s trace, not its files).
        check_rows: rows of the first test batch the checks run on.
    """

    def __init__(self, program: bool = True, onnx: bool = True, check_rows: int = 64) -> None:
        if check_rows < 2:
            raise ValueError(f"deploy.check_rows must be >= 2 (a batch of 1 would fix the exported batch size), got {check_rows}.")
        self.program, self.onnx, self.check_rows = program, onnx, check_rows
        self._batch: Any = None
        self._log_dir: str | None = None

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._batch = None

    def on_test_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int,
                            dataloader_idx: int = 0) -> None:
        if self._batch is None:
            self._batch = _cpu_rows(batch[0], self.check_rows)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log_dir = trainer.log_dir  # a broadcast under DDP: every rank asks; the files are written in teardown

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """After the module wrote ``summary.json`` (its ``on_test_end``): export, check, time, add to the summary."""
        if stage != "test" or not (self.program or self.onnx) or trainer.global_rank != 0 or self._log_dir is None:
            return
        if self._batch is None or pytree.tree_leaves(self._batch)[0].shape[0] < 2:
            return  # no test batch of two rows to trace on
        log_dir, self._log_dir = Path(self._log_dir), None
        with torch.inference_mode(False):
            record = self.export(pl_module, log_dir)
        path = log_dir / "summary.json"
        if path.is_file():
            save_summary(path, {**json.loads(path.read_text()), "deploy": record})

    def export(self, module: pl.LightningModule, log_dir: Path, built: torch.nn.Module | None = None) -> dict[str, Any]:
        built = built if built is not None else module.record.take_tested_deployable()  # the one summary.json measured
        model = copy.deepcopy(built if built is not None else module.deployed_model()).cpu().eval()
        example = pytree.tree_map(lambda t: t.detach().cpu() if isinstance(t, Tensor) else t, module.example_args()[0])
        batch = self._batch
        if isinstance(batch, dict) and isinstance(example, dict):  # the model's inputs, not the pipeline's (a row uid)
            batch = {k: batch[k] for k in example}
        program = deploy.export_program(model, batch, f"the deployed {module.technique} model")
        with torch.no_grad():
            want = model(batch)
        record: dict[str, Any] = {"check_rows": int(want.shape[0]), "max_abs_logit": float(want.abs().max()),
                                  "parameter_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
                                  "buffer_bytes": sum(b.numel() * b.element_size() for b in model.buffers())}
        if self.program:
            for stem, extra in module.extra_deployables().items():
                deploy.save_program(deploy.export_program(extra.cpu().eval(), batch, stem), log_dir / stem)
            json_path, weights = deploy.save_program(program, log_dir / "exported")
            with torch.no_grad():
                got = deploy.load_exported(json_path)(batch)
            record["program"] = {"files": [json_path.name, weights.name], "bytes": weights.stat().st_size,
                                 "max_abs_diff": float((want - got).abs().max())}
        if self.onnx:
            path = deploy.save_onnx(program, log_dir / "exported.onnx")
            check = deploy.check_onnx(path, model, batch)
            if check["max_abs_diff"] > ONNX_TOLERANCE * max(record["max_abs_logit"], 1.0) or not check["argmax_agree"]:
                raise RuntimeError(f"exported.onnx of {log_dir} disagrees with PyTorch on a test batch "
                                   f"(max |delta| {check['max_abs_diff']:.3g}, argmax agree {check['argmax_agree']}).")
            record["onnx"] = {"file": path.name, "opset": deploy.OPSET, "bytes": path.stat().st_size,
                              "initializer_bytes": deploy.initializer_bytes(path), **check,
                              "latency": deploy.onnx_latency(path, example)}
        return record


class DeployedValidation(DeployExport):
    """At the end of ``fit``: score the deployed model (the network as it ships, built by ``deployed_model()`` from
    the final weights) on the whole validation split, and export it to ONNX on the first validation batch, checked
    and timed as ``DeployExport`` does. ``summary.json`` gains ``deployed = {val_acc, val_rows, nonzero, onnx}``: the same
    measures for every technique, without the test split (``compare.py tune`` adds it to every trial)."""

    def __init__(self, check_rows: int = 64) -> None:
        super().__init__(program=False, onnx=True, check_rows=check_rows)
        self._tested: torch.nn.Module | None = None
        self._right = self._rows = 0
        self._keys: list[str] | None = None  # a token model's input keys (a batch also holds a row uid), else None

    def on_validation_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int,
                                  dataloader_idx: int = 0) -> None:
        if self._batch is None and not trainer.sanity_checking:
            self._batch = _cpu_rows(batch[0], self.check_rows)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log_dir = trainer.log_dir

    # a test after the fit also scores the deployed model of the tested checkpoint: ``deployed.test_acc`` (what
    # ships, where a technique's own ``test/acc`` may average several networks, as NeuMeta's over widths does)
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._tested = copy.deepcopy(pl_module.deployed_model()).eval()
        self._right = self._rows = 0
        self._keys = self._input_keys(pl_module)

    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        with torch.no_grad():
            self._right += int((self._tested(self._inputs(batch[0])).argmax(-1) == batch[1]).sum())
        self._rows += int(batch[1].shape[0])

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Before the module writes the test's ``summary.json`` (Lightning calls callbacks first)."""
        counts = trainer.strategy.reduce(torch.tensor([self._right, self._rows], dtype=torch.float64), reduce_op="sum")
        section = pl_module.record.sections.setdefault("deployed", {})
        section.update(test_acc=float(counts[0] / counts[1].clamp(min=1)), test_rows=int(counts[1]))
        self._tested = None

    @staticmethod
    def _input_keys(pl_module: pl.LightningModule) -> list[str] | None:
        example = pl_module.example_args()[0]
        return list(example) if isinstance(example, dict) else None

    def _inputs(self, inputs: Any) -> Any:
        """The model's inputs of a batch's first element: a token batch's dict without its row uid."""
        return {k: inputs[k] for k in self._keys} if isinstance(inputs, dict) and self._keys is not None else inputs

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """After the module wrote the fit's ``summary.json`` (its ``on_fit_end``)."""
        if stage != "fit" or trainer.global_rank != 0 or self._log_dir is None or self._batch is None:
            return
        log_dir, self._log_dir = Path(self._log_dir), None
        model = copy.deepcopy(pl_module.deployed_model()).cpu().eval()
        with torch.inference_mode(False):
            record = self.export(pl_module, log_dir, model)
        right = rows = 0
        self._keys = self._input_keys(pl_module)
        with torch.no_grad():
            for batch in trainer.datamodule.val_dataloader():
                right += int((model(self._inputs(_cpu_rows(batch[0], None))).argmax(-1) == batch[1].cpu()).sum())
                rows += int(batch[1].shape[0])
        section = {"val_acc": right / max(rows, 1), "val_rows": rows, "nonzero": count_nonzero(model), "onnx": record["onnx"]}
        pl_module.record.sections["deployed"] = section  # a test after this fit keeps it in its summary, adding test_acc
        path = log_dir / "summary.json"
        if path.is_file():
            save_summary(path, {**json.loads(path.read_text()), "deployed": section})
