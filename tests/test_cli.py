"""The real entry point end to end: fit -> test round trip, exact resume, presets and composed configs."""

from __future__ import annotations

import csv

from pathlib import Path
from unittest import mock

import pytest
import torch
import yaml

import train
from conftest import ROOT, quiet, run_cli, summary
from lightning_modules import Baseline

TINY = [
    "--config", str(ROOT / "configs/moons/baseline.yaml"),
    "--model.init_args.net.init_args.dropout=0.2",  # exercises the RNG on resume
    "--trainer.log_every_n_steps=1",
]


def last_state(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")


def test_fit_then_test_round_trip(in_tmp):
    cli = run_cli("fit", *TINY, "--trainer.max_epochs=3", *quiet(in_tmp))
    run_dir = Path(cli.trainer.log_dir)
    fitted = summary(run_dir)
    assert fitted["technique"] == "baseline" and fitted["dataset"] == "moons" and fitted["epochs"] == 3
    assert fitted["params"] == {k: 2338 for k in ("total", "trainable", "nonzero", "dense_equivalent")}
    assert fitted["flops_per_sample"] == 2 * (2 * 64 + 64 * 32 + 32 * 2)
    assert 0.5 < fitted["metrics"]["test/acc"] <= 1.0 and fitted["train_seconds"] > 0
    assert (run_dir / "config.yaml").is_file() and (run_dir / "hparams.yaml").is_file()
    best = Path(cli.trainer.checkpoint_callback.best_model_path)
    assert "/" not in best.name and best.name.startswith("best-epoch")

    tested = run_cli("test", *TINY, f"--ckpt_path={best}", *quiet(in_tmp, "tested"))
    again = summary(Path(tested.trainer.log_dir))
    assert again["metrics"]["test/acc"] == fitted["metrics"]["test/acc"]
    assert again["epochs"] == fitted["epochs"] and again["stage"] == "test"

    # the checkpoint alone rebuilds the model, linked input shape and class count included
    model = Baseline.load_from_checkpoint(best)
    assert model.input_shape == (2,) and model.num_classes == 2


# the schedule of the whole 4-epoch run for its interrupted first half too (a cosine without T_max lasts each command's
# max_epochs, and a resumed run keeps the schedule of its checkpoint)
FOUR_EPOCH_COSINE = "--model.init_args.lr_scheduler.init_args.T_max=4"


def test_resume_from_last_equals_an_uninterrupted_run(in_tmp):
    tiny = [*TINY, FOUR_EPOCH_COSINE, "--test_after_fit=false"]
    straight = run_cli("fit", *tiny, "--trainer.max_epochs=4", *quiet(in_tmp / "a"))
    run_cli("fit", *tiny, "--trainer.max_epochs=2", *quiet(in_tmp / "b"))
    resumed = run_cli("fit", *tiny, "--trainer.max_epochs=4", "--ckpt_path=last", *quiet(in_tmp / "b"))
    assert Path(resumed.trainer.log_dir).name == "version_0"  # continued in the same run directory
    a, b = last_state(Path(straight.trainer.log_dir)), last_state(Path(resumed.trainer.log_dir))
    assert a["epoch"] == b["epoch"] == 3 and a["global_step"] == b["global_step"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    moments = lambda ckpt: [t for s in ckpt["optimizer_states"][0]["state"].values() for t in s.values()]  # noqa: E731
    assert all(torch.equal(x, y) for x, y in zip(moments(a), moments(b), strict=True))


@pytest.mark.parametrize("limit", ["--trainer.max_epochs=3", "--trainer.max_steps=9"])
def test_last_checkpoint_holds_the_end_of_training_without_validation_every_epoch(in_tmp, limit):
    # validation only every second epoch; max_steps 9 stops inside an epoch
    cli = run_cli("fit", *TINY, "--trainer.check_val_every_n_epoch=2", limit, "--test_after_fit=false", *quiet(in_tmp))
    last = last_state(Path(cli.trainer.log_dir))
    assert last["global_step"] == cli.trainer.global_step > 0


def test_resume_last_without_a_previous_run_says_so(in_tmp):
    with pytest.raises(FileNotFoundError, match="no checkpoints/last.ckpt"):
        run_cli("fit", *TINY, "--ckpt_path=last", *quiet(in_tmp))


# every experiment (conftest.EXPERIMENTS) is built and trained by tests/test_experiments.py; presets compose with one
PRESETS = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "configs/presets").glob("*.yaml"))


def print_config(capsys, *configs: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run_cli("fit", *(arg for c in configs for arg in ("--config", str(ROOT / c))), "--print_config")
    assert exit_info.value.code in (0, None)
    return capsys.readouterr().out


# each preset with an experiment of its technique and a line the composed config must contain
PRESET_EXPERIMENTS = {
    "configs/presets/morphreuse_parity.yaml": ("configs/fashion_mnist/morphreuse.yaml", "class_path: models.SharedCoreMLP"),
    "configs/presets/neumeta_faithful.yaml": ("configs/fashion_mnist/neumeta_head.yaml", "faithful_routing: true"),
}


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_composes_with_an_experiment(preset, capsys):
    assert preset in PRESET_EXPERIMENTS, f"add {preset} to PRESET_EXPERIMENTS"
    experiment, expected = PRESET_EXPERIMENTS[preset]
    assert expected in print_config(capsys, experiment, preset)


# --- composed configs, run names and places ----------------------------------------------------------------------
def build(*args: str) -> train.MorphLabCLI:
    """``train.main(args, run=False)``: the model, datamodule and trainer a command line builds, nothing run."""
    with mock.patch("sys.argv", ["train.py"]):
        return train.main(list(args), run=False)


MOONS = str(ROOT / "configs/moons/baseline.yaml")


def test_the_run_name_is_the_first_config_path_under_configs(tmp_path):
    baseline = str(ROOT / "configs/fashion_mnist/baseline.yaml")
    parity = str(ROOT / "configs/presets/morphreuse_parity.yaml")
    assert train.run_name(["fit", "--config", baseline, "--config", parity]) == "fashion_mnist/baseline"
    # a config given as a string is no file
    assert train.run_name(["fit", "--config={trainer: {max_epochs: 2}}", f"--config={MOONS}"]) == "moons/baseline"
    (tmp_path / "mine.yaml").write_text("trainer.max_epochs: 2\n")
    assert train.run_name(["-c", str(tmp_path / "mine.yaml")]) == "mine"  # outside a configs/ directory: its stem
    assert train.run_name(["fit", "--trainer.max_epochs=2"]) == "default"


def test_the_logger_is_named_after_the_config_and_placed_by_default_root_dir_unless_given(in_tmp):
    default = build("--config", MOONS).trainer.logger
    assert (default.save_dir, default.name) == ("runs", "moons/baseline")
    moved = build("--config", MOONS, "--trainer.default_root_dir=elsewhere").trainer.logger
    assert (moved.save_dir, moved.name) == ("elsewhere", "moons/baseline")
    given = build("--config", MOONS, "--trainer.default_root_dir=elsewhere", "--trainer.logger.init_args.save_dir=mine",
                  "--trainer.logger.init_args.name=my_name").trainer.logger
    assert (given.save_dir, given.name) == ("mine", "my_name")


def test_default_root_dir_places_a_run_that_resumes_there(in_tmp):
    args = ["--config", MOONS, "--trainer.default_root_dir=elsewhere", "--test_after_fit=false",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
    first = run_cli("fit", *args, "--trainer.max_epochs=1")
    run_dir = Path(first.trainer.log_dir)
    assert run_dir.resolve() == in_tmp / "elsewhere/moons/baseline/version_0" and not (in_tmp / "runs").exists()
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())["trainer"]
    assert saved["logger"]["init_args"]["save_dir"] == saved["default_root_dir"] == "elsewhere"
    assert saved["logger"]["init_args"]["name"] == "moons/baseline"  # the saved config is named without its path
    resumed = run_cli("fit", *args, "--trainer.max_epochs=2", "--ckpt_path=last")
    assert Path(resumed.trainer.log_dir).resolve() == run_dir.resolve() and last_state(run_dir)["epoch"] == 1


def test_a_cosine_without_t_max_lasts_the_run(in_tmp):
    from lightning_modules.schedules import CosineAnnealingLR

    def scheduler(*args: str):
        cli = build("--config", MOONS, *args)
        cli.model.trainer = cli.trainer
        return cli.model.configure_optimizers()["lr_scheduler"]["scheduler"]

    follows = scheduler("--trainer.max_epochs=7")
    assert isinstance(follows, CosineAnnealingLR) and follows.T_max == 7
    assert scheduler("--trainer.max_epochs=7", "--model.init_args.lr_scheduler.init_args.T_max=3").T_max == 3


# configs/fashion_mnist/lora.yaml written out in full: what baseline.yaml, recipes/adam_cosine.yaml and
# data/fashion_mnist.yaml compose to
SPELLED_OUT_LORA = """
seed_everything: 0
trainer:
  max_epochs: 10
  logger:
    init_args: {name: fashion_mnist/lora}
model:
  class_path: lightning_modules.LoRA
  init_args:
    net: {class_path: models.MLP, init_args: {hidden: [512, 512], activation: relu}}
    r: 4
    alpha: 4
    target_modules: all-linear
    optimizer: {class_path: torch.optim.Adam, init_args: {lr: 0.001}}
    lr_scheduler: {class_path: lightning_modules.schedules.CosineAnnealingLR}
data:
  class_path: datamodules.FashionMNISTDataModule
  init_args: {batch_size: 128, normalization: half}
"""


def test_an_experiment_built_from_fragments_resolves_to_its_spelled_out_form(tmp_path, capsys):
    (tmp_path / "lora.yaml").write_text(SPELLED_OUT_LORA)
    composed = yaml.safe_load(print_config(capsys, "configs/fashion_mnist/lora.yaml"))
    assert composed == yaml.safe_load(print_config(capsys, str(tmp_path / "lora.yaml")))
    assert composed["model"]["init_args"]["lr_scheduler"]["init_args"] == {"T_max": None, "eta_min": 0.0}


def test_after_config_a_dotted_key_changes_one_value_and_a_block_replaces_the_whole_key(tmp_path, capsys):
    base = ROOT / "configs/fashion_mnist/baseline.yaml"
    (tmp_path / "dotted.yaml").write_text(f"config: {base}\nmodel.init_args.net.init_args.hidden: [64]\n")
    (tmp_path / "block.yaml").write_text(
        f"config: {base}\nmodel:\n  class_path: lightning_modules.Baseline\n  init_args:\n"
        "    net: {class_path: models.MLP, init_args: {hidden: [64]}}\n"
    )
    dotted = yaml.safe_load(print_config(capsys, str(tmp_path / "dotted.yaml")))["model"]["init_args"]
    assert dotted["net"]["init_args"]["hidden"] == [64] and dotted["net"]["init_args"]["activation"] == "relu"
    assert dotted["lr_scheduler"]["class_path"] == "lightning_modules.schedules.CosineAnnealingLR"
    block = yaml.safe_load(print_config(capsys, str(tmp_path / "block.yaml")))["model"]["init_args"]
    assert block["net"]["init_args"]["hidden"] == [64] and block["lr_scheduler"] is None  # the base's model is gone


def test_predict_returns_one_class_per_test_sample(in_tmp):
    cli = run_cli("fit", *TINY, "--trainer.max_epochs=1", "--test_after_fit=false", *quiet(in_tmp))
    best = cli.trainer.checkpoint_callback.best_model_path
    predicted = run_cli("predict", *TINY, f"--ckpt_path={best}", *quiet(in_tmp, "predict"))
    probabilities = torch.cat(predicted.trainer.predict_loop.predictions)
    assert probabilities.shape == (120, 2) and torch.allclose(probabilities.sum(1), torch.ones(120))
    rows = list(csv.DictReader(open(Path(predicted.trainer.log_dir) / "predictions.csv")))
    assert [r["sample"] for r in rows] == [str(i) for i in range(120)] and {r["label"] for r in rows} <= {"0", "1"}
    assert [r["predicted"] for r in rows] == [str(i) for i in probabilities.argmax(1).tolist()]
    assert [float(r["p_1"]) for r in rows] == pytest.approx(probabilities[:, 1].tolist(), abs=1e-6)


@pytest.mark.slow
def test_fashion_mnist_resume_equals_uninterrupted(in_tmp):
    """The acceptance check of the foundation on real data: 2 epochs + resume to 4 == 4 epochs."""
    config = ["--config", str(ROOT / "configs/fashion_mnist/baseline.yaml"), FOUR_EPOCH_COSINE, "--test_after_fit=false",
              f"--data.init_args.root={ROOT / 'data'}"]
    straight = run_cli("fit", *config, "--trainer.max_epochs=4", *quiet(in_tmp / "a"))
    run_cli("fit", *config, "--trainer.max_epochs=2", *quiet(in_tmp / "b"))
    resumed = run_cli("fit", *config, "--trainer.max_epochs=4", "--ckpt_path=last", *quiet(in_tmp / "b"))
    a, b = last_state(Path(straight.trainer.log_dir)), last_state(Path(resumed.trainer.log_dir))
    assert a["global_step"] == b["global_step"] == 4 * 422
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key


def test_a_checkpoint_of_another_architecture_is_refused_in_one_sentence():
    # (through train.py the checkpoint's own hyper-parameters rebuild the net; an imported or hand-made checkpoint
    # without them meets whatever the config says)
    from lightning_modules import Baseline
    from models import MLP

    small = Baseline(net=lambda s, c: MLP(s, c, hidden=[8]), input_shape=(2,), num_classes=2)
    wide = Baseline(net=lambda s, c: MLP(s, c, hidden=[16]), input_shape=(2,), num_classes=2)
    with pytest.raises(ValueError, match=r"does not fit this Baseline with net MLP .*other shapes"):
        wide.load_state_dict(small.state_dict())
    small.load_state_dict(Baseline(net=lambda s, c: MLP(s, c, hidden=[8]), input_shape=(2,), num_classes=2).state_dict())


def test_a_training_mean_missing_from_the_last_epoch_is_left_out_of_the_summary():
    """A term computed at some steps only (NeuMeta's full-width reconstruction) keeps its old value in Lightning's
    callback_metrics, which a resumed run never saw: the summary reports the last epoch's means only."""
    from lightning_modules.summary import RunRecord
    from models import MLP

    module = Baseline(net=lambda s, c: MLP(s, c, hidden=[8]), input_shape=(2,), num_classes=2)
    logged = {}
    module.log = lambda name, value, **_: logged.__setitem__(name, float(value))
    module.log_epoch_mean("train/loss", torch.tensor(1.0))
    module.log_epoch_mean("train/recon", torch.tensor(3.0), weight=2.0)
    module.log_epoch_mean("train/recon", torch.tensor(6.0))
    module.on_train_epoch_end()
    assert logged == {"train/loss": 1.0, "train/recon": 4.0} and module.stale_training_means() == set()
    module.log_epoch_mean("train/loss", torch.tensor(2.0))
    module.on_train_epoch_end()
    assert module.stale_training_means() == {"train/recon"}
    record = RunRecord()
    record.collect({"train/loss": torch.tensor(2.0), "train/recon": torch.tensor(4.0)}, stale=module.stale_training_means())
    assert record.metrics == {"train/loss": 2.0}
