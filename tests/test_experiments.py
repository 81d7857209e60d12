"""Every experiment config, two training steps each (the timm habit: one parametrized test over a shared list,
``conftest.EXPERIMENTS``).

Each case is ``train.py fit --config <experiment>`` in this process with tiny limits (``conftest.SMOKE*``: 2 training
steps, 2 validation and 2 test batches, one epoch) on real data where it exists offline (FashionMNIST, mnist5k,
scikit-learn tables, rt-snippets) and on synthetic CIFAR (named ``cifar10-synthetic``) otherwise. It checks:

* the training losses are finite and every trainable parameter received a nonzero gradient (``INTENTIONALLY_UNUSED``
  lists the exceptions, with the reason);
* the run directory is ``<save_dir>/<dir>/<name>/version_0`` and its ``summary.json`` holds every field of the
  DESIGN.md contract, with values that a wrong implementation would get wrong;
* the checkpoint that fit's test loaded into the module (best or last), loaded into a fresh module
  (``load_from_checkpoint``, as ``test --ckpt_path`` rebuilds it: structural changes are restored by
  ``on_load_checkpoint``), gives bit-identical eval logits;
* the deployed model (``deployed_model()``) predicts what the technique's own evaluation predicts on the same batch
  (``compare_deployed``; tolerances in ``TOLERANCE``).
"""

from __future__ import annotations

import copy
import inspect
import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

import models.latency
from conftest import EXPERIMENTS, ROOT, TECHNIQUES, VARIANTS, GradientProbe, resolved_config, run_cli, smoke_overrides, summary

# Parameters that may legitimately end two steps without a gradient: (technique, regex on the parameter name) -> why.
INTENTIONALLY_UNUSED: dict[tuple[str, str], str] = {}

# Deployed vs the technique's own evaluation on one batch: (atol, rtol) of the logits; predictions must be equal
# wherever the top two logits are further apart than the tolerance.
TOLERANCE = {  # measured largest differences in brackets
    "baseline": (0.0, 0.0),  # the deployed model is the network itself
    "morphreuse": (0.0, 0.0),
    "lrunet": (0.0, 0.0),
    "neumeta": (0.0, 0.0),  # the same generated tensors in a network built at deploy_width [0]
    "lora": (1e-6, 1e-5),  # (alpha / r) B A folded into W: rounding of the merge [1.7e-7 at logits of 0.3]
    "morphonet": (1e-6, 1e-5),  # hard mask folded into the weights, dead units removed [0; 1e-7 Transformer]
    "structured_pruning": (0.0, 0.0),  # the pruned network is deployed as it is
    "layercollapse": (1e-5, 1e-5),  # Linear-PReLU(1)-Linear multiplied out [7e-7 MLP; 4.8e-6 VGG-11 at logits of 5.6]
}

CONTRACT = ("technique", "dataset", "seed", "metrics", "params", "flops_per_sample", "model_bytes", "epochs",
            "train_seconds")


def _compose(path: Path) -> dict:
    """The config tree of a YAML file as jsonargparse composes it: its ``config:`` bases first, then its own keys
    (dotted keys set nested ones; a key whose value names a .yaml file gets that file's tree)."""
    raw = yaml.safe_load(path.read_text()) or {}
    tree: dict = {}
    bases = raw.pop("config", None)
    for base in [bases] if isinstance(bases, str) else bases or []:
        _merge(tree, _compose(path.parent / base))
    for key, value in raw.items():
        if isinstance(value, str) and value.endswith((".yaml", ".yml")) and (path.parent / value).is_file():
            value = _compose(path.parent / value)
        *parents, last = key.split(".")
        node = tree
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[last] = value
    return tree


def _merge(into: dict, other: dict) -> None:
    for key, value in other.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = copy.deepcopy(value)


def classes(config: str) -> dict[str, str | None]:
    """The class paths of the experiment's model, network and datamodule: from its YAML (and the files it composes),
    or, where that does not say, from the config LightningCLI resolves (``--print_config``, slower)."""
    def find(tree: Any) -> dict[str, str | None]:
        get = lambda node, key: node.get(key) if isinstance(node, dict) else None  # noqa: E731
        model = get(tree, "model")
        return {"model": get(model, "class_path"), "net": get(get(get(model, "init_args"), "net"), "class_path"),
                "data": get(get(tree, "data"), "class_path")}

    found = find(_compose(ROOT / config))
    return found if found["model"] and found["data"] else find(resolved_config(ROOT / config))


@pytest.fixture
def quick_latency(monkeypatch):
    """summary.json's latency with one timed call at batch 1 and 2 (batch 256 of a BERT costs seconds)."""
    function = models.latency.measure_latency
    quick = {"batch_sizes": (1, 2), "warmup": 0, "repeats": 1, "min_repeats": 1, "budget_seconds": 0.0}
    positional = [p for p in inspect.signature(function).parameters.values() if p.default is not p.empty]
    monkeypatch.setattr(function, "__defaults__", tuple(quick.get(p.name, p.default) for p in positional))


def smoke_args(config: str, found: dict[str, str | None], save_dir: Path) -> list[str]:
    return [
        "--config", str(ROOT / config), *smoke_overrides(found["model"], found["net"], found["data"]),
        "--trainer.callbacks+=conftest.GradientProbe",
        f"--trainer.logger.init_args.save_dir={save_dir}",  # the config's own run name is kept (checked below)
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
    ]


def logits(module: torch.nn.Module, x: Any) -> torch.Tensor:
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            return module(x)
    finally:
        module.train(was_training)


def assert_same_predictions(own: torch.Tensor, deployed: torch.Tensor, technique: str) -> float:
    """Logits within ``TOLERANCE[technique]`` and the same predicted class wherever the top two logits are further
    apart than it; returns the largest logit difference."""
    atol, rtol = TOLERANCE[technique]
    assert own.shape == deployed.shape
    far = float((own - deployed).abs().max())
    if atol == rtol == 0.0:
        assert torch.equal(own, deployed), far
        return far
    torch.testing.assert_close(deployed, own, atol=atol, rtol=rtol)
    top2 = own.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * (atol + rtol * top2[:, 0].abs())
    assert torch.equal(own.argmax(-1)[clear], deployed.argmax(-1)[clear])
    return far


def compare_deployed(module, x: Any, own: torch.Tensor) -> float:
    """The deployed model against what the technique evaluates, on the batch ``x`` (``own``: the module's eval
    logits on it); returns the largest logit difference."""
    technique = module.technique
    deployed = module.deployed_model()
    if technique == "morphonet":
        # test evaluates the soft-masked net (parity), the hard-masked net or the export (exported, = deployed);
        # the export must be the hard-masked network, made smaller
        module.net.set_mask_mode("hard")
        try:
            own = logits(module.net, x)
        finally:
            module.net.set_mask_mode("soft")
    elif technique == "layercollapse":
        # test scores deployed_model() itself, which collapses nothing after two steps (slopes far from 1): it must be
        # the network; and with every selected block's slope at 1 (linear), the collapsed copy must compute what the
        # uncollapsed network computes
        assert torch.equal(logits(deployed, x), logits(module.net, x))
        linear = copy.deepcopy(module)
        with torch.no_grad():
            for chain in linear.chains.values():
                linear.net.get_submodule(chain.act).weight.fill_(1.0)
        assert set(linear.collapsible_now()) == set(linear.chains)
        own, deployed = logits(linear.net, x), linear.deployed_model()
        prelus = lambda net: sum(isinstance(m, torch.nn.PReLU) for m in net.modules())  # noqa: E731
        assert prelus(deployed) == prelus(linear.net) - len(linear.chains)  # every selected chain is one Linear now
    # baseline, morphreuse, lrunet: the network itself; lora: merged vs unmerged; neumeta: the generated weights in a
    # network of width deploy_width vs the template run with them (forward)
    return assert_same_predictions(own, logits(deployed, x), technique)


def check_summary(result: dict, module, datamodule, trained: int) -> None:
    """``summary.json`` against the contract; ``trained``: the entries of the parameters that required a gradient."""
    missing = [k for k in CONTRACT if k not in result]
    assert not missing, missing
    assert result["technique"] == module.technique and result["dataset"] == datamodule.name and result["data_source"]
    assert ("synthetic" in result["dataset"]) == ("synthetic" in result["data_source"])  # a stand-in says so
    assert result["seed"] == 0 and result["epochs"] == 1 and result["stage"] == "test"
    assert isinstance(result["train_seconds"], float) and result["train_seconds"] > 0
    metrics = result["metrics"]
    for key in ("test/acc", "val/acc", "val/acc_best"):
        assert 0.0 <= metrics[key] <= 1.0, (key, metrics[key])
    assert math.isfinite(metrics["train/loss"]) and all(isinstance(v, float) for v in metrics.values())
    if "test/f1" in metrics:
        assert 0.0 <= metrics["test/f1"] <= 1.0
    params = result["params"]
    assert set(params) >= {"total", "trainable", "nonzero", "dense_equivalent"}
    assert all(isinstance(v, int) and v > 0 for v in params.values()), params
    assert params["trainable"] == trained and params["trainable"] <= params["total"]
    assert params["nonzero"] <= params["dense_equivalent"], params  # nonzero counts the deployed model
    assert isinstance(result["flops_per_sample"], int) and result["flops_per_sample"] > 0
    assert isinstance(result["model_bytes"], int) and result["model_bytes"] >= 4 * params["nonzero"]
    assert set(result["latency"]["ms"]) == {"1", "2"} and all(v > 0 for v in result["latency"]["ms"].values())


@pytest.mark.parametrize("config", EXPERIMENTS)
def test_experiment_trains_two_steps_and_keeps_its_contracts(config, tmp_path, quick_latency):
    found = classes(config)
    try:
        cli = run_cli("fit", *smoke_args(config, found, tmp_path))
    except FileNotFoundError as error:  # rt-snippets is fetched from PyPI (datamodules/sst2.py) when absent
        if found["data"] == "datamodules.SST2DataModule" and "could not be fetched" in str(error):
            pytest.skip(f"rt-snippets unavailable: {error}")
        raise
    module, datamodule, trainer = cli.model, cli.datamodule, cli.trainer
    technique = module.technique

    # two finite training steps; every trainable parameter reached by the gradient
    probe = next(c for c in trainer.callbacks if isinstance(c, GradientProbe))
    assert len(probe.losses) == 2 and all(math.isfinite(v) for v in probe.losses), probe.losses
    assert probe.backwards == 2 and probe.reached
    allowed = {pattern: why for (t, pattern), why in INTENTIONALLY_UNUSED.items() if t == technique}
    unexplained = [n for n in probe.unreached() if not any(re.fullmatch(p, n) for p in allowed)]
    assert not unexplained, f"{len(unexplained)} trainable parameter(s) without a gradient: {unexplained[:8]}"

    # the run directory follows the config's path; summary.json keeps the contract
    run_dir = Path(trainer.log_dir)
    assert run_dir.relative_to(tmp_path).as_posix() == config[len("configs/"):-len(".yaml")] + "/version_0"
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    trained = sum(p.numel() for name, p in module.named_parameters() if name in probe.trainable)
    check_summary(summary(run_dir), module, datamodule, trained)

    # the checkpoint fit's test loaded into the module, loaded into a fresh one -> identical eval logits
    x, _ = next(iter(datamodule.test_dataloader()))
    assert trainer.ckpt_path and Path(trainer.ckpt_path).parent == run_dir / "checkpoints"
    fresh = type(module).load_from_checkpoint(trainer.ckpt_path, map_location="cpu")
    assert fresh.state_dict().keys() == module.state_dict().keys()
    before, after = logits(module, x), logits(fresh, x)
    assert torch.equal(before, after), float((before - after).abs().max())

    compare_deployed(module, x, before)


def test_every_technique_has_a_small_run_for_the_slow_tests():
    """The crash/resume and DDP tests (slow) cover every technique some experiment uses."""
    import lightning_modules  # noqa: PLC0415

    used = {getattr(lightning_modules, classes(c)["model"].rsplit(".", 1)[1]).technique for c in EXPERIMENTS}
    assert used == set(TECHNIQUES) - set(VARIANTS) and set(VARIANTS.values()) <= used


def test_the_gradient_probe_names_a_parameter_the_loss_does_not_reach():
    net = torch.nn.ModuleDict({"used": torch.nn.Linear(2, 1), "unused": torch.nn.Linear(2, 1),
                               "frozen": torch.nn.Linear(2, 1).requires_grad_(False)})
    probe = GradientProbe()
    for step in range(2):
        net.zero_grad()
        (net["used"](torch.ones(1, 2)) + 0 * net["unused"](torch.ones(1, 2))).sum().backward()
        probe.on_after_backward(None, net)
    assert probe.backwards == 2 and probe.unreached() == ["unused.bias", "unused.weight"]
