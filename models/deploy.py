"""A run's deployable: files that deployment reads, none of which needs the unpickler.

``export_program(model, example)`` traces the deployed network once with ``torch.export`` (dynamic batch); from that
one program come

* ``exported.onnx`` (``save_onnx``): the ``torch.onnx`` dynamo exporter, opset 20, dynamic batch, read by ONNX
  Runtime, OpenVINO or TensorRT. ``check_onnx`` runs it in ONNX Runtime (CPU) on a batch and compares its logits
  with PyTorch's (max |delta|, argmax agreement); ``onnx_latency`` times it as ``models.latency`` times PyTorch.
  A weight used many times (a shared core, a reused block) is one initializer (``initializer_bytes``).
* ``exported.json`` + ``exported.safetensors`` (``save_program``): the same program for PyTorch, its graph as JSON
  (torch.export's own serializer) and its tensors as safetensors. ``load_exported`` parses JSON and safetensors
  only. Written by hand because ``torch.export.save``/``load`` (``.pt2``) unpickle the weights
  (``weights_only=False``); the two strings in a program that become Python code when it is loaded (guards, stack
  traces) are dropped before deserialising.

A legacy ``exported.pt`` (a pickled module, written by older versions) is refused unless ``trust_pickle=True``.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from models.latency import time_calls

# opset 20: GELU is one Gelu node (at 18 it is Div, Erf, Add and two Mul, which ONNX Runtime does not fuse back:
# 0.76 -> 0.42 ms of non-GEMM time in the MorphReuse head at batch 256, benchmarks/ort_profile.py)
OPSET = 20
FORMAT = "morphlab-program-v1"


def _batch_dims(example: Any) -> Any:
    """The batch dimension of every input dynamic; in a dict of token tensors ``(batch, sequence)`` the sequence
    dimension too (batches are trimmed to their longest sentence), up to BERT's 512 positions."""
    batch = torch.export.Dim("batch", min=1, max=65536)
    if isinstance(example, dict):
        sequence = torch.export.Dim("sequence", min=2, max=512)
        return {k: ({0: batch, 1: sequence} if t.dim() == 2 else {0: batch}) if isinstance(t, Tensor) else None
                for k, t in example.items()}
    return pytree.tree_map(lambda t: {0: batch} if isinstance(t, Tensor) else None, example)


def _operator(error: BaseException) -> str:
    text = str(error)
    found = re.search(r"(aten[.:]+\w+(?:\.\w+)?|torch\.ops\.[\w.]+|onnx::\w+)", text)
    return found.group(1) if found else text.strip().splitlines()[0][:200] if text.strip() else type(error).__name__


class _OneInput(nn.Module):
    """``model(x)`` with that one argument named: a ``forward(*args)`` (a wrapper's) gives torch.export no place to
    hang the batch's dynamic dimension."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Any) -> Any:
        return self.model(x)


@torch.inference_mode(False)  # Lightning tests in inference mode; torch.export cannot trace there
def export_program(model: nn.Module, example: Any, name: str = "the deployed model") -> torch.export.ExportedProgram:
    """``model`` (eval mode) traced by ``torch.export`` on ``example`` (a tensor or a dict batch of >= 2 rows:
    a batch of 1 would be specialised), the batch dimension dynamic. Refuses in one sentence naming the operator."""
    example = pytree.tree_map(lambda t: t.clone() if isinstance(t, Tensor) else t, example)  # no inference tensors
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.export.export(_OneInput(model).eval(), (example,), dynamic_shapes=(_batch_dims(example),))
    except Exception as error:  # torch.export raises many types; the sentence names what it could not take
        raise RuntimeError(f"torch.export cannot take {name} ({type(model).__name__}): it stops at "
                           f"{_operator(error)}; export the network without it or report the operator.") from error


# --- ONNX -----------------------------------------------------------------------------------------------------


def save_onnx(program: torch.export.ExportedProgram, path: Path) -> Path:
    """Write ``program`` as ONNX (dynamo exporter, opset ``OPSET``, the program's dynamic batch)."""
    from contextlib import redirect_stdout
    from io import StringIO

    try:
        with warnings.catch_warnings(), redirect_stdout(StringIO()):  # the exporter prints its progress
            warnings.simplefilter("ignore")
            onnx_program = torch.onnx.export(program, dynamo=True, opset_version=OPSET, optimize=True)
    except Exception as error:
        raise RuntimeError(f"the ONNX exporter cannot take the deployed model: it stops at {_operator(error)}; "
                           "export the network without it or report the operator.") from error
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx_program.save(str(path))
    return path


def initializer_bytes(path: Path) -> int:
    """Bytes of the ONNX file's initializers (its weights)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    return sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer)


def _session(path: Path, threads: int | None = None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _feed(session: Any, example: Any) -> dict[str, Any]:
    leaves = [t for t in pytree.tree_leaves(example) if isinstance(t, Tensor)]
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(leaves):
        raise ValueError(f"the ONNX model takes {len(names)} inputs ({', '.join(names)}), the batch has {len(leaves)}.")
    return {name: leaf.detach().cpu().numpy() for name, leaf in zip(names, leaves)}


@torch.inference_mode(False)
def check_onnx(path: Path, model: nn.Module, batch: Any) -> dict[str, Any]:
    """ONNX Runtime (CPU) logits vs ``model``'s on ``batch``: max |delta|, whether every argmax agrees, rows."""
    session = _session(path)
    with torch.no_grad():
        want = model.eval()(batch).float().cpu()
    got = torch.from_numpy(session.run(None, _feed(session, batch))[0]).float()
    return {
        "max_abs_diff": float((want - got).abs().max()),
        "argmax_agree": bool(torch.equal(want.argmax(-1), got.argmax(-1))),
        "rows": int(want.shape[0]),
    }


def onnx_latency(path: Path, example: Any, batch_sizes: tuple[int, ...] = (1, 256), **timing: Any) -> dict[str, Any]:
    """Median ONNX Runtime (CPU) time per call at each batch size, timed as ``models.latency`` times PyTorch, on
    as many threads as PyTorch uses."""
    session = _session(path)
    return time_calls(lambda inputs: session.run(None, _feed(session, inputs)), example, batch_sizes,
                      threads=session.get_session_options().intra_op_num_threads, **timing)


# --- PyTorch, without pickles ---------------------------------------------------------------------------------


def save_program(program: torch.export.ExportedProgram, stem: Path) -> tuple[Path, Path]:
    """Write ``stem.json`` (the graph) and ``stem.safetensors`` (parameters, buffers and constants)."""
    from safetensors.torch import save_file
    from torch._export.serde.serialize import serialize  # torch.export's serializer (its JSON graph format)

    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    artifact = serialize(program)
    tensors = {f"state.{k}": v for k, v in program.state_dict.items()}
    tensors |= {f"constant.{k}": v for k, v in program.constants.items() if isinstance(v, Tensor)}
    if len(tensors) != len(program.state_dict) + len(program.constants):
        raise ValueError("the deployed program holds a constant that is not a tensor; it cannot be saved without pickle.")
    # safetensors refuses tensors sharing memory; a shared weight is stored once per name (a shared parameter
    # is one name in the program's state dict already)
    tensors = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    header = {"format": FORMAT, "torch": torch.__version__, "parameters": list(program.graph_signature.parameters),
              "program": json.loads(artifact.exported_program)}
    json_path, weights_path = stem.with_suffix(".json"), stem.with_suffix(".safetensors")
    json_path.write_text(json.dumps(header))
    save_file(tensors, str(weights_path), metadata={"format": FORMAT})
    return json_path, weights_path


def _no_code(value: Any) -> Any:
    """The serialized program without the fields that become Python source when it is loaded."""
    if isinstance(value, dict):
        return {k: _no_code(v) for k, v in value.items() if k != "stack_trace"}
    if isinstance(value, list):
        return [_no_code(v) for v in value]
    return value


def load_program(json_path: Path) -> "DeployedProgram":
    """The network saved by ``save_program`` (a ``torch.fx.GraphModule`` inside); reads JSON and safetensors only."""
    from safetensors.torch import load_file
    from torch._export.serde.serialize import SerializedArtifact, deserialize

    json_path = Path(json_path)
    header = json.loads(json_path.read_text())
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ValueError(f"{json_path} is not a morphlab program (written by models.deploy.save_program).")
    program = _no_code(header["program"])
    program["guards_code"] = []  # guards are Python source; shapes are checked by the graph itself
    tensors = load_file(str(json_path.with_suffix(".safetensors")))
    parameters = set(header["parameters"])
    state = {k.removeprefix("state."): v for k, v in tensors.items() if k.startswith("state.")}
    state = {k: nn.Parameter(v, requires_grad=False) if k in parameters else v for k, v in state.items()}
    constants = {k.removeprefix("constant."): v for k, v in tensors.items() if k.startswith("constant.")}
    artifact = SerializedArtifact(json.dumps(program).encode(), state, constants, ((), {}))
    return DeployedProgram(deserialize(artifact).module(check_guards=False))


class DeployedProgram(nn.Module):
    """A loaded program. It was traced in eval mode and has that one mode: ``train()`` / ``eval()`` only set the
    flag (the unlifted ``torch.export`` module refuses both, which would break any code that calls ``eval()``)."""

    def __init__(self, graph_module: nn.Module) -> None:
        super().__init__()
        self.graph_module = graph_module
        self.training = False

    def train(self, mode: bool = True) -> "DeployedProgram":
        self.training = mode
        return self

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.graph_module(*args, **kwargs)


def load_exported(path: str | Path, trust_pickle: bool = False) -> nn.Module:
    """A deployable written by a run: ``exported.json`` (no pickle; ``load_program``) or, from older runs, a pickled
    ``exported.pt``, refused unless ``trust_pickle`` (unpickling runs whatever code the file names)."""
    path = Path(path)
    if path.suffix in (".json", ".safetensors"):
        return load_program(path.with_suffix(".json"))
    if path.suffix != ".pt":
        raise ValueError(f"{path}: a deployable is exported.json (+ exported.safetensors) or a legacy exported.pt.")
    if not trust_pickle:
        raise ValueError(f"{path} is a legacy pickled model: loading it would run the unpickler on code it names; "
                         "use the run's exported.json, or pass trust_pickle=True for a file you wrote yourself.")
    payload = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(payload, dict) or payload.get("format") != "morphlab-exported-v1":
        raise ValueError(f"{path} is not an exported morphlab model.")
    return payload["model"]
