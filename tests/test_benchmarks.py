"""The benchmark scripts compute what they print: ``morphonet_claim.py`` chooses on validation within the parameter
budget, never on test; ``export_speed.py`` builds a config's dense network to time it against runs; ``ort_profile.py``
splits ONNX Runtime's time by operator; ``step_profile.py`` splits a training step into segments on both sides."""

from __future__ import annotations

import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
from export_speed import untrained_of  # noqa: E402
from ort_profile import PRODUCTS, profile_all  # noqa: E402
from morphonet_claim import choose, by_experiment, verdict_table  # noqa: E402
from step_profile import MARKS, SEGMENTS, StepMarks, plain_epoch, segments  # noqa: E402


def rows():
    def run(experiment, seed, val, test, nonzero):
        return {"experiment": experiment, "seed": seed, "val/acc": val, "test/acc": test, "params/nonzero": nonzero}
    return [
        run("moons/dense", 0, 0.90, 0.90, 1000), run("moons/dense", 1, 0.92, 0.92, 1000),
        # best on test but worse on validation: must not be chosen
        run("moons/unit", 0, 0.88, 0.99, 400), run("moons/unit", 1, 0.88, 0.99, 400),
        run("moons/connection", 0, 0.95, 0.91, 500), run("moons/connection", 1, 0.95, 0.90, 500),
        # best on validation but over the 0.5x budget
        run("moons/wide", 0, 0.99, 0.99, 800), run("moons/wide", 1, 0.99, 0.99, 800),
    ]


def test_the_choice_is_the_best_validation_accuracy_within_the_budget():
    chosen, ratios = choose(by_experiment(rows())["moons"], max_ratio=0.5)
    assert chosen == "connection"
    assert ratios == {"unit": 0.4, "connection": 0.5, "wide": 0.8}


def test_the_verdict_compares_the_chosen_test_accuracy_with_the_dense_mlp():
    table = verdict_table(rows(), max_ratio=0.5)
    assert "- moons: connection at 0.50x, -0.50 points against the dense MLP: the claim does not hold." in table
    assert "| moons | wide | 2 |" in table and "over budget" in table
    assert "| moons | connection | 2 | 95.00 ± 0.00 | 90.50 ± 0.71 | 500 | 0.50 | yes | 1/2 |" in table
    looser = verdict_table(rows(), max_ratio=0.8)
    assert "- moons: wide at 0.80x, +8.00 points against the dense MLP: the claim holds." in looser


def test_a_config_is_timed_as_its_untrained_network():
    net = untrained_of(ROOT / "configs/moons/baseline.yaml")
    assert not net.training
    assert sum(p.numel() for p in net.parameters()) == (2 * 64 + 64) + (64 * 32 + 32) + (32 * 2 + 2)  # MLP [64, 32]


def test_the_ort_profile_splits_a_run_into_its_operators(tmp_path):
    import torch
    from torch import nn

    from models import deploy

    paths = []
    for name, activation in (("relu", nn.ReLU()), ("gelu", nn.GELU())):
        net = nn.Sequential(nn.Linear(12, 32), activation, nn.Linear(32, 3)).eval()
        x = torch.randn(2, 12)
        paths.append(deploy.save_onnx(deploy.export_program(net, x), tmp_path / name / "exported.onnx"))
    relu, gelu = profile_all(paths, batch=64, runs=20, rounds=4, warmup=2, threads=1)
    assert set(relu["by_op"]) & PRODUCTS and "Gelu" not in relu["by_op"]
    assert "Gelu" in gelu["by_op"] and set(gelu["by_op"]) & PRODUCTS
    for result in (relu, gelu):  # node times are parts of the run's time
        assert 0 < sum(result["by_op"].values()) <= 1.1 * result["run_ms"]


def test_a_step_is_split_into_segments_that_add_up_to_it():
    marks = dict(zip(MARKS, [1.0, 1.5, 2.0, 3.0, 5.0, 5.5, 7.0]))
    parts = segments(marks, previous_end=0.75)
    assert list(parts) == SEGMENTS[1:] + ["fetch"]
    assert parts["fetch"] == 250.0 and parts["backward"] == 2000.0
    assert sum(parts.values()) == (7.0 - 0.75) * 1e3  # from the previous step's end to this one's
    assert "fetch" not in segments(marks, previous_end=None)  # the first step of an epoch has no previous end


def test_the_step_profile_marks_every_segment_of_a_real_fit_and_the_plain_loop(in_tmp):
    from collections import defaultdict

    from overhead import build_cli

    cli = build_cli(str(ROOT / "configs/moons/baseline.yaml"), 2, str(in_tmp),
                    ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"])
    net = cli.model.build_network(cli.model.net_factory)
    plain = defaultdict(list)
    marks = StepMarks(before_each_epoch=lambda: plain_epoch(cli, net, cli.model.optimizer_factory(net.parameters()), plain))
    cli.trainer.callbacks.append(marks)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    steps = cli.trainer.global_step
    for side in (marks.times, plain):
        assert set(side) == set(SEGMENTS)
        assert all(len(side[name]) == steps for name in SEGMENTS if name != "fetch")
        assert len(side["fetch"]) == steps - 2  # the first step of each of the 2 epochs has no previous end
        assert all(t >= 0 for values in side.values() for t in values)
