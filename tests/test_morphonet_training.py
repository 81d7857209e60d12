"""MorphoNet end to end through the CLI: exact resume mid-schedule, exported evaluation, summary fields."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from conftest import ROOT, quiet, resolved_config, run_cli, summary
from models.deploy import load_exported


def small_config(tmp_path: Path, mode: str = "intended", stop_after: int | None = None) -> str:
    """configs/moons/morphonet_<mode>.yaml shrunk to 6 epochs with every schedule event inside them."""
    name = "morphonet_intended" if mode == "intended" else "morphonet"
    config = resolved_config(ROOT / f"configs/moons/{name}.yaml")
    config["trainer"]["max_epochs"] = 6
    for callback in config["trainer"]["callbacks"]:
        args = callback["init_args"]
        if "warmup_epochs" in args:
            args["warmup_epochs"] = 1
        if callback["class_path"].endswith("ProgressivePruning"):
            args.update(start=0.3, every=2, threshold=0.45)  # prunes after epochs 2, 4 and 6
        if callback["class_path"].endswith("ConnectivityImages"):
            args["every_n_epochs"] = 2
    if stop_after:
        config["trainer"]["callbacks"].append({"class_path": "conftest.StopAfter", "init_args": {"epochs": stop_after}})
    path = tmp_path / f"{name}{'_stop' if stop_after else ''}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def last(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def test_interrupted_and_resumed_run_ends_with_the_same_masks(in_tmp):
    config = small_config(in_tmp)
    straight = run_cli("fit", "--config", config, "--test_after_fit=false", *quiet(in_tmp / "a"))
    run_cli("fit", "--config", small_config(in_tmp, stop_after=3), "--test_after_fit=false", *quiet(in_tmp / "b"))
    resumed = run_cli("fit", "--config", config, "--ckpt_path=last", "--test_after_fit=false", *quiet(in_tmp / "b"))
    a, b = last(Path(straight.trainer.log_dir)), last(Path(resumed.trainer.log_dir))
    assert a["global_step"] == b["global_step"]
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    for key in a["callbacks"]:
        if "Pruning" in key or "Sparsity" in key or "Temperature" in key:
            assert a["callbacks"][key] == b["callbacks"][key], key
    pruning = next(v for k, v in a["callbacks"].items() if "Pruning" in k)
    assert [epoch for epoch, _ in pruning["events"]] == [1, 3, 5]
    temperatures = [v for k, v in a["state_dict"].items() if k.endswith("temperature")]
    assert temperatures and all(float(t) == pytest.approx(0.5) for t in temperatures)


def test_intended_run_tests_the_exported_model_and_reports_it(in_tmp):
    cli = run_cli("fit", "--config", small_config(in_tmp), *quiet(in_tmp), "--deploy.program=true", "--deploy.onnx=true")
    run_dir = Path(cli.trainer.log_dir)
    result = summary(run_dir)
    info = result["morphonet"]
    assert result["technique"] == "morphonet" and info["eval_mask"] == "exported"
    assert info["hard_sparsity_start"] == pytest.approx(0.6, abs=0.05)
    # test_ckpt: last + ProgressivePruning(to_target) at the final epoch: exactly the target, to one connection
    assert info["hard_sparsity_end"] == pytest.approx(0.7, abs=1 / 2176)
    assert result["params"]["dense_equivalent"] == 2338 and result["params"]["nonzero"] < 2338
    assert result["params"]["total"] == 2338 + 2 * 64 + 64 * 32  # weights + mask logits
    exported = load_exported(run_dir / "exported.json")
    assert not any("Morpho" in type(m).__name__ for m in exported.modules())
    assert (run_dir / "connectivity.png").is_file() and (run_dir / "history.png").is_file()
    # the exported file predicts what the test split was scored on
    x, y = cli.datamodule.splits["test"]
    accuracy = (exported.eval()(x).argmax(-1) == y).float().mean().item()
    assert accuracy == pytest.approx(result["metrics"]["test/acc"], abs=1e-6)
    # and so does the ONNX file, in ONNX Runtime: checked in the run, timed beside PyTorch
    deployed = result["deploy"]
    assert deployed["program"]["max_abs_diff"] == 0.0 and deployed["onnx"]["max_abs_diff"] <= 1e-4
    assert deployed["onnx"]["argmax_agree"] and deployed["onnx"]["opset"] >= 18 and deployed["check_rows"] >= 2
    assert set(deployed["onnx"]["latency"]["ms"]) == {"1", "256"} and (run_dir / "exported.onnx").is_file()
    import onnxruntime as ort
    session = ort.InferenceSession(str(run_dir / "exported.onnx"), providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert (torch.from_numpy(logits).argmax(-1) == y).float().mean().item() == pytest.approx(result["metrics"]["test/acc"], abs=1e-6)


def test_parity_run_evaluates_the_soft_mask(in_tmp):
    cli = run_cli("fit", "--config", small_config(in_tmp, "parity"), *quiet(in_tmp))
    info = summary(Path(cli.trainer.log_dir))["morphonet"]
    assert info["mode"] == "parity" and info["eval_mask"] == "soft"
