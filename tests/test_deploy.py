"""The deployable (``models.deploy``, ``callbacks.DeployExport``): a torch.export program written as JSON +
safetensors and as ONNX, predicting what the model predicts, with nothing to unpickle and sharing kept."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from unittest import mock

import pytest
import torch
from torch import nn

from conftest import run_cli, summary
from test_experiments import classes, smoke_args
from models import MLP, ConvNet, LruNet, MorphoTransformer, SharedCoreMLP
from models import deploy
from models.reuse_network import ReusedNetwork

NETWORKS = {
    "mlp": (lambda: MLP((1, 8, 8), 5, hidden=[16, 16]), lambda n: torch.randn(n, 1, 8, 8)),
    "convnet": (lambda: ConvNet((1, 12, 12), 3, channels=[4, 8], hidden=6), lambda n: torch.randn(n, 1, 12, 12)),
    "transformer (token dicts)": (
        lambda: MorphoTransformer((10,), 3, vocab_size=40, d_model=16, n_heads=2, ff_dim=8).export(),
        lambda n: {"input_ids": torch.randint(0, 40, (n, 10)), "attention_mask": torch.ones(n, 10, dtype=torch.long)}),
}


def trained_looking(net: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics, so that eval mode matters; eval mode."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    return net.eval()


@pytest.mark.parametrize("name", list(NETWORKS))
def test_program_and_onnx_predict_what_the_model_predicts_at_any_batch(name, tmp_path):
    torch.manual_seed(0)
    make, batch = NETWORKS[name]
    model = trained_looking(make())
    program = deploy.export_program(model, batch(4))
    json_path, weights = deploy.save_program(program, tmp_path / "exported")
    loaded = deploy.load_exported(json_path)
    onnx_path = deploy.save_onnx(program, tmp_path / "exported.onnx")
    for rows in (2, 3, 37):  # the batch is dynamic in both files
        x = batch(rows)
        with torch.no_grad():
            want = model(x)
            assert torch.allclose(loaded(x), want, atol=1e-6, rtol=0)
        check = deploy.check_onnx(onnx_path, model, x)
        assert check["max_abs_diff"] <= 1e-5 and check["argmax_agree"] and check["rows"] == rows
    assert json.loads(json_path.read_text())["format"] == deploy.FORMAT and weights.stat().st_size > 0
    latency = deploy.onnx_latency(onnx_path, batch(1), (1, 8), warmup=1, repeats=2)
    assert set(latency["ms"]) == {"1", "8"} and latency["threads"] == torch.get_num_threads()


class Payload:
    """Unpickling this calls ``Path.touch(marker)``: what a malicious file would do with ``os.system``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_malicious_legacy_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "exported.pt"
    path.write_bytes(pickle.dumps({"format": "morphlab-exported-v1", "model": Payload(marker)}))
    pickle.loads(path.read_bytes())  # the payload works: unpickling it runs it
    assert marker.exists()
    marker.unlink()
    with pytest.raises(ValueError, match="legacy pickled model.*trust_pickle"):
        deploy.load_exported(path)
    with pytest.raises(Exception):  # torch's own safe loader refuses it too
        torch.load(path, weights_only=True)
    assert not marker.exists()


def test_python_source_planted_in_a_program_file_is_not_run(tmp_path):
    """The two fields of a serialized program that become Python code when it is loaded (guards, stack traces)
    are dropped: a file carrying code there loads, predicts, and the code never runs."""
    torch.manual_seed(1)
    model = MLP((6,), 3, hidden=[8]).eval()
    json_path, _ = deploy.save_program(deploy.export_program(model, torch.randn(4, 6)), tmp_path / "exported")
    marker = tmp_path / "ran"
    code = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    header = json.loads(json_path.read_text())
    header["program"]["guards_code"] = [f"{code} or True"]
    for node in header["program"]["graph_module"]["graph"]["nodes"]:
        node.setdefault("metadata", {})["stack_trace"] = f'File "x", line 1\n{code}\n'
    json_path.write_text(json.dumps(header))
    x = torch.randn(5, 6)
    with torch.no_grad():
        assert torch.allclose(deploy.load_exported(json_path)(x), model(x))
    assert not marker.exists()
    with pytest.raises(ValueError, match="not a morphlab program"):
        (tmp_path / "other.json").write_text("{}")
        deploy.load_exported(tmp_path / "other.json")


@pytest.mark.parametrize("make", [
    lambda: SharedCoreMLP((1, 28, 28), 10, widths=[256, 256, 256], core_dim=64),
    lambda: ReusedNetwork(MLP((1, 28, 28), 10, hidden=[128, 128, 128, 128]), variant="shape_shared"),
    lambda: LruNet((1, 28, 28), 10, reuse=4),
], ids=["morphreuse shared core", "morphreuse shape shared", "lrunet reuse 4"])
def test_sharing_survives_the_onnx_export(make, tmp_path):
    """One core / one block used N times is one initializer: the file holds the unique parameters, not N copies."""
    model = trained_looking(make())
    unique = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])  # BN statistics too
    uses = sum(p.numel() * p.element_size() for m in model.modules() for p in m.parameters(recurse=False))
    x = torch.randn(2, 1, 28, 28)
    path = deploy.save_onnx(deploy.export_program(model, x), tmp_path / "exported.onnx")
    stored = deploy.initializer_bytes(path)
    assert stored <= 1.05 * unique, (stored, unique, uses)
    assert deploy.check_onnx(path, model, x)["max_abs_diff"] <= 1e-4


def test_gelu_is_one_onnx_node(tmp_path):
    """At opset >= 20 GELU exports as one Gelu node; at 18 it was Div, Erf, Add and Mul nodes that ONNX Runtime runs
    one by one (a quarter of the MorphReuse head's ORT time at batch 256)."""
    import onnx

    model = trained_looking(SharedCoreMLP((1, 28, 28), 10))
    x = torch.randn(3, 1, 28, 28)
    path = deploy.save_onnx(deploy.export_program(model, x), tmp_path / "exported.onnx")
    ops = [node.op_type for node in onnx.load(str(path)).graph.node]
    assert ops.count("Gelu") == 2 and "Erf" not in ops, ops  # the shared core, used by both adapters
    assert deploy.check_onnx(path, model, x)["max_abs_diff"] <= 1e-4


def test_a_model_the_exporter_cannot_take_stops_with_one_sentence():
    class Branching(nn.Module):
        def forward(self, x):
            return x * 2 if bool(x.sum() > 0) else x  # Python control flow on a value

    with pytest.raises(RuntimeError, match=r"^torch.export cannot take the deployed model \(Branching\): it stops at") as info:
        deploy.export_program(Branching(), torch.randn(3, 4))
    assert "\n" not in str(info.value)


QUICK = [*(f"fashion_mnist/{name}" for name in ("baseline", "morphreuse", "lora", "morphonet_intended", "layercollapse",
                                               "neumeta_head")),
         pytest.param("fashion_mnist/lrunet", marks=pytest.mark.slow),  # 30 s: two LruNet steps on 2 cores
         pytest.param("sst2/baseline", marks=pytest.mark.slow)]  # token dicts (the row uid is not a model input)


@pytest.mark.parametrize("name", QUICK)
def test_every_quick_technique_writes_a_checked_deployable(name, tmp_path):
    """Two training steps of each technique of the quick suite, then test: the run writes exported.{json,
    safetensors,onnx}, checked on a real test batch in PyTorch and ONNX Runtime, and timed in ONNX Runtime."""
    config = f"configs/{name}.yaml"
    args = [*smoke_args(config, classes(config), tmp_path), "--deploy.program=true", "--deploy.onnx=true",
            "--deploy.check_rows=8"]
    cli = run_cli("fit", *args)
    run_dir = Path(cli.trainer.log_dir)
    record = summary(run_dir)["deploy"]
    scale = max(record["max_abs_logit"], 1.0)  # two training steps can leave logits of 1e6 (LruNet at lr 0.1)
    assert record["check_rows"] == 8 and record["program"]["max_abs_diff"] <= 1e-5 * scale
    onnx = record["onnx"]
    assert onnx["max_abs_diff"] <= 1e-4 * scale and onnx["argmax_agree"] and onnx["opset"] >= 18
    # each weight stored once (BatchNorm statistics are initializers too)
    assert onnx["initializer_bytes"] <= 1.05 * (record["parameter_bytes"] + record["buffer_bytes"])
    assert set(onnx["latency"]["ms"]) == {"1", "256"}
    for file in ("exported.json", "exported.safetensors", "exported.onnx"):
        assert (run_dir / file).is_file()
    assert not list(run_dir.glob("*.pt"))  # no pickle is written


def test_the_test_end_builds_the_deployed_model_once(tmp_path):
    """summary.json's accounting and the deployable export use one deployed model at the end of test (an export
    or a generation can be costly): fit start (accounting), fit end and test end build it, DeployExport does not."""
    from lightning_modules import Baseline, ClassificationModule

    config = "configs/fashion_mnist/baseline.yaml"
    args = [*smoke_args(config, classes(config), tmp_path), "--deploy.program=true", "--deploy.onnx=false"]
    with mock.patch.object(Baseline, "deployed_model", autospec=True, side_effect=ClassificationModule.deployed_model) as built:
        cli = run_cli("fit", *args)
    assert built.call_count == 3
    assert (Path(cli.trainer.log_dir) / "exported.json").is_file()
    assert cli.model.record.tested_deployable is None  # handed over, not kept


def test_a_token_model_takes_any_sentence_length(tmp_path):
    """Token batches are trimmed to their longest sentence: the sequence dimension of an export is dynamic too."""
    torch.manual_seed(0)
    model = trained_looking(MorphoTransformer((12,), 3, vocab_size=40, d_model=16, n_heads=2, ff_dim=8).export())
    tokens = lambda n, length: {"input_ids": torch.randint(0, 40, (n, length)),  # noqa: E731
                                "attention_mask": torch.ones(n, length, dtype=torch.long)}
    program = deploy.export_program(model, tokens(4, 9))
    onnx_path = deploy.save_onnx(program, tmp_path / "exported.onnx")
    loaded = deploy.load_exported(deploy.save_program(program, tmp_path / "exported")[0])
    for rows, length in ((2, 9), (3, 12), (5, 4)):
        x = tokens(rows, length)
        with torch.no_grad():
            assert torch.allclose(loaded(x), model(x), atol=1e-6, rtol=0)
        check = deploy.check_onnx(onnx_path, model, x)
        assert check["max_abs_diff"] <= 1e-5 and check["argmax_agree"]


@pytest.mark.parametrize("name", ["fashion_mnist/baseline", pytest.param("fashion_mnist/neumeta_head", marks=pytest.mark.slow)])
def test_deployed_validation_scores_the_network_that_ships(name, tmp_path):
    """callbacks.DeployedValidation (every tuning trial's measure): the deployed model's accuracy on the whole
    validation split at fit end, its nonzero parameters and ORT latency, and on the test batches after the test.
    Baseline: the deployed model is the module, so the test accuracy is its test/acc; NeuMeta: the generated
    network at deploy_width, so it is test/acc@h=<that width> (its test/acc averages the trained widths)."""
    config = f"configs/{name}.yaml"
    width = ["--model.init_args.deploy_width=12", "--model.init_args.test_widths=[12, 16]"] if "neumeta" in name else []
    cli = run_cli("fit", *smoke_args(config, classes(config), tmp_path), *width,
                  "--trainer.callbacks+=callbacks.DeployedValidation", "--test_ckpt=last")
    record = summary(Path(cli.trainer.log_dir))
    deployed = record["deployed"]
    model, right, rows = cli.model.deployed_model().eval(), 0, 0
    with torch.no_grad():
        for x, y in cli.datamodule.val_dataloader():
            right, rows = right + int((model(x).argmax(-1) == y).sum()), rows + len(y)
    assert deployed["val_rows"] == rows == len(cli.datamodule.val_dataloader().dataset)
    assert record["checkpoint"].endswith("last.ckpt")  # the tested weights are the fit end's
    assert deployed["val_acc"] == pytest.approx(right / rows)
    key = "test/acc@h=12" if "neumeta" in name else "test/acc"
    assert deployed["test_acc"] == pytest.approx(record["metrics"][key], abs=1e-6)
    assert deployed["nonzero"] == record["params"]["nonzero"]
    assert deployed["onnx"]["argmax_agree"] and set(deployed["onnx"]["latency"]["ms"]) == {"1", "256"}
