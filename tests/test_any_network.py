"""Every technique that works on any network, on networks of every family: technique x network.

For each combination the LightningModule is built around the network (random init), takes two training steps
(Lightning, real optimisers) and then must keep its contracts:

* the export invariant: the deployed network predicts what the technique's own model predicts (hard masks for
  MorphoNet, the unmerged adapters for LoRA) within 1e-5 of the logits' scale, and it is a plain network
  (no parametrization, no mask logits, no adapter left);
* accounting: the deployed network has at most as many non-zero parameters as the model it came from, and for
  MorphoNet ``unit`` with gates closed, fewer FLOPs than the dense network;
* a checkpoint round trip: a fresh module loaded from the saved checkpoint gives bit-identical logits.

Combinations that cannot work are refusals, tested as such (``REFUSALS``).
"""

from __future__ import annotations

import functools
import math
import re
import urllib.error

import pytest
import torch
from lightning.pytorch import Trainer
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.data import DataLoader, TensorDataset

from lightning_modules import LayerCollapse, LoRA, MorphoNet, MorphReuse
from models import MLP, TimmNet, TorchvisionNet
from models.accounting import count_dense_equivalent, count_nonzero, flops_per_sample
from models.morphreuse import CoreAdapter, ShapeSharedLinear
from models.bert import BertClassifier
from models.targets import output_layer

NETWORKS = {
    # name: (factory, input shape, LoRA target_modules or LoRA arguments)
    "lab-mlp": (functools.partial(MLP, hidden=(64, 64, 64)), (1, 28, 28), "all-linear"),
    "tv-resnet18": (functools.partial(TorchvisionNet, name="resnet18"), (1, 28, 28), r"model\.layer\d\.\d\.conv\d"),
    "tv-mobilenet_v3_small": (functools.partial(TorchvisionNet, name="mobilenet_v3_small"), (1, 28, 28),
                              ["classifier.0"]),
    "timm-vit": (functools.partial(TimmNet, name="vit_tiny_patch16_224", kwargs={"patch_size": 7, "depth": 2}),
                 (1, 28, 28), ["qkv", "fc1", "fc2"]),
    # timm initialises the Mixer's classifier to zero: frozen, it would pass no gradient to the adapters
    "timm-mixer": (functools.partial(TimmNet, name="mixer_s16_224"), (3, 32, 32),
                   {"target_modules": ["fc1", "fc2"], "modules_to_save": ["head"]}),
    # a BERT-shaped random encoder (transformers' BertForSequenceClassification, 4 layers, 312 wide), token dicts
    "hf-bert": (functools.partial(BertClassifier, encoder="random-tinybert", cache_frozen_prefix=False), (16,),
                {"target_modules": ["query", "value"], "modules_to_save": ["classifier"]}),
}
TECHNIQUES = {
    "morphonet-connection": lambda targets: (MorphoNet, {"granularity": "connection", "target_modules": "all",
                                                          "init_density": 0.5}),
    "morphonet-unit": lambda targets: (MorphoNet, {"granularity": "unit", "target_modules": "all",
                                                    "init_density": 0.5}),
    "layercollapse": lambda targets: (LayerCollapse, {"target_modules": "all"}),
    "morphreuse-shape": lambda targets: (MorphReuse, {"variant": "shape_shared", "target_modules": "all-linear"}),
    "morphreuse-core": lambda targets: (MorphReuse, {"variant": "shared_core", "target_modules": "all-linear",
                                                     "core_dim": 16}),
    "lora": lambda targets: (LoRA, {"r": 2, **(targets if isinstance(targets, dict) else {"target_modules": targets})}),
}
NUM_CLASSES = 10
CANNOT = {  # (technique, network): the refusal's words
    # token dicts: the lab's own text networks are the way (models.MorphoTransformer, models.ShapeSharedBert)
    **{(t, "hf-bert"): "BertClassifier takes token dicts" for t in
       ("morphonet-connection", "morphonet-unit", "morphreuse-shape", "morphreuse-core")},
    # a BERT FFN's two Linears sit in two modules (BertIntermediate, BertOutput); the BertLayer that joins them is
    # not fx-traceable (it iterates over tuple outputs), so nothing proves the middle feeds only the second Linear
    ("layercollapse", "hf-bert"): "BertClassifier has no collapsible chain",
    ("layercollapse", "tv-resnet18"): "TorchvisionNet(resnet18) has no collapsible chain",
    # a ResNet's only Linear is its classifier, which all-linear leaves out; MobileNetV3's two have two shapes
    ("morphreuse-shape", "tv-resnet18"): "selects no Linear layer of TorchvisionNet(resnet18)",
    ("morphreuse-core", "tv-resnet18"): "selects no Linear layer of TorchvisionNet(resnet18)",
    ("morphreuse-core", "tv-mobilenet_v3_small"): "selects one Linear layer of TorchvisionNet(mobilenet_v3_small)",
    ("morphreuse-shape", "tv-mobilenet_v3_small"): "no two target layers of TorchvisionNet(mobilenet_v3_small) have the same shape",
}


def inputs(network: str, n: int, generator: torch.Generator) -> torch.Tensor | list[dict[str, torch.Tensor]]:
    """``n`` random samples for ``network``: images, or token-id dicts (as the SST-2 datamodule gives them)."""
    shape = NETWORKS[network][1]
    if network != "hf-bert":
        return torch.randn(n, *shape, generator=generator)
    ids = torch.randint(1000, 5000, (n, *shape), generator=generator)
    return [{"input_ids": row, "attention_mask": torch.ones_like(row)} for row in ids]


def build(technique: str, network: str) -> nn.Module:
    factory, shape, lora_targets = NETWORKS[network]
    cls, kwargs = TECHNIQUES[technique](lora_targets)
    torch.manual_seed(0)
    module = cls(factory, shape, NUM_CLASSES, **kwargs)
    with torch.no_grad():  # timm and torchvision start some classifiers at zero: the invariants would compare zeros
        head = module.net.get_submodule(output_layer(module.net))
        if not isinstance(module, LoRA) and not head.weight.any():  # (LoRA: peft's modules_to_save trains it)
            head.weight.normal_(0.0, 0.1)
    return module


def own_logits(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What the technique's own (undeployed) model predicts: hard masks for MorphoNet."""
    module.eval()
    if isinstance(module, MorphoNet):
        module.net.set_mask_mode("hard")
    if isinstance(module, LayerCollapse):  # slopes at 1: the network is what its collapse must compute
        with torch.no_grad():
            for chain in module.chains.values():
                module.net.get_submodule(chain.act).weight.fill_(1.0)
    with torch.no_grad():
        return module.net(x)


@pytest.mark.parametrize("network", NETWORKS)
@pytest.mark.parametrize("technique", TECHNIQUES)
def test_technique_on_network(technique, network, tmp_path):
    if (technique, network) in CANNOT:
        with pytest.raises(ValueError, match=re.escape(CANNOT[technique, network])) as error:
            build(technique, network)
        assert "\n" not in str(error.value)
        return
    module = build(technique, network)
    shape = NETWORKS[network][1]
    generator = torch.Generator().manual_seed(1)
    data = list(zip(inputs(network, 16, generator), torch.randint(0, NUM_CLASSES, (16,), generator=generator)))
    before = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    trainer = Trainer(max_steps=2, limit_val_batches=0, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, DataLoader(data, batch_size=8))
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
    changed = [n for n, p in module.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert changed, "two training steps changed no trainable parameter"

    x = inputs(network, 4, generator)
    x = x if isinstance(x, torch.Tensor) else torch.utils.data.default_collate(x)
    want = own_logits(module, x)
    deployed = module.deployed_model().eval()
    with torch.no_grad():
        got = deployed(x)
    assert (got - want).abs().max() <= 1e-5 * max(1.0, float(want.abs().max()))
    assert not any(parametrize.is_parametrized(m) for m in deployed.modules())
    assert not any(k in n for n, _ in deployed.named_parameters() for k in ("mask_logits", "lora_"))

    reference = module.net.hard_plain() if isinstance(module, MorphoNet) else module.net
    assert count_nonzero(deployed) <= count_nonzero(reference) + sum(
        p.numel() for n, p in module.net.named_parameters() if "lora_" in n)
    if technique.startswith("morphreuse"):  # the shared tensors are stored once and used by several layers
        stored = sum(p.numel() for p in deployed.parameters())
        assert count_dense_equivalent(deployed) > stored and module.net.uses()
        assert all(isinstance(deployed.net.get_submodule(n), (ShapeSharedLinear, CoreAdapter)) for n in module.net.targets)
    if technique == "layercollapse":  # every chain collapsed: fewer parameters, fewer FLOPs
        assert sum(p.numel() for p in deployed.parameters()) < sum(p.numel() for p in module.net.parameters())
    if technique in ("morphonet-unit", "layercollapse"):
        run = lambda net: flops_per_sample(lambda: net(x), batch_size=len(x))  # noqa: E731
        assert run(deployed) < run(reference), "closed unit gates removed no FLOPs"
        with torch.inference_mode():  # where Lightning's test loop exports: the same network
            in_test = module.deployed_model()
        assert [p.shape for p in in_test.parameters()] == [p.shape for p in deployed.parameters()]

    path = tmp_path / "round_trip.ckpt"
    trainer.save_checkpoint(path)
    fresh = build(technique, network)
    # the hyperparameters hold the test's functools.partial, which only a full unpickle restores (our own file)
    fresh.load_state_dict(torch.load(path, map_location="cpu", weights_only=False)["state_dict"])
    assert torch.equal(own_logits(fresh, x), want)


REFUSALS = {
    "nothing matched": (lambda: MorphoNet(functools.partial(MLP, hidden=(8,)), (1, 28, 28), 10, target_modules=["conv"]),
                        "selects no Linear / Conv2d layer of MLP"),
    "attention heads only": (
        lambda: MorphoNet(NETWORKS["timm-vit"][0], (1, 28, 28), 10, target_modules=["qkv"], granularity="unit"),
        "no output channel of the target layers of TimmNet(vit_tiny_patch16_224) can be gated exactly"),
    "token-dict network": (
        lambda: MorphoNet(functools.partial(BertClassifier, encoder="random-tinybert", cache_frozen_prefix=False),
                          (16,), 2),
        "BertClassifier takes token dicts: use models.MorphoTransformer"),
    "Morpho* with targets": (
        lambda: MorphoNet(functools.partial(__import__("models").MorphoMLP, hidden=(8,)), (1, 28, 28), 10,
                          granularity="unit"),
        "holds its own connection masks"),
    "MorphReuse preset with targets": (
        lambda: MorphReuse(functools.partial(__import__("models").SharedCoreMLP), (1, 28, 28), 10, target_modules=["fc"]),
        "SharedCoreMLP shares its weights by construction: drop model.init_args.target_modules"),
    "MorphReuse token-dict network": (
        lambda: MorphReuse(functools.partial(BertClassifier, encoder="random-tinybert", cache_frozen_prefix=False),
                           (16,), 2),
        "BertClassifier takes token dicts: use models.ShapeSharedBert"),
    "unknown torchvision name": (lambda: TorchvisionNet((1, 28, 28), 10, name="resnet7"),
                                 "'resnet7' is not a torchvision model"),
    "unknown timm name": (lambda: TimmNet((1, 28, 28), 10, name="vit_nonexistent"), "'vit_nonexistent' is not a timm model"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_refusal_in_one_sentence(case):
    make, message = REFUSALS[case]
    with pytest.raises(ValueError) as error:
        make()
    assert message in str(error.value) and "\n" not in str(error.value)


def test_pretrained_weights_that_cannot_be_fetched_stop_the_run(monkeypatch):
    """Offline, a pretrained name never trains from random init: one sentence says the weights are missing.
    (The downloads are made to fail here, so that the test neither downloads nor waits for retries online.)"""
    import huggingface_hub.constants
    import torchvision.models._api

    def unreachable(*args, **kwargs):
        raise urllib.error.URLError("no route to download.pytorch.org (test)")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", unreachable)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    for make in (lambda: TorchvisionNet((1, 28, 28), 10, name="resnet18", weights="DEFAULT"),
                 lambda: TimmNet((1, 28, 28), 10, name="resnet18", pretrained=True)):
        with pytest.raises(RuntimeError, match="pretrained weights .* could not be fetched"):
            make()


@pytest.mark.parametrize("network", ["lab-mlp", "tv-resnet18", "tv-mobilenet_v3_small"])
def test_structured_pruning_meets_its_flop_budget_and_survives_a_checkpoint(network, tmp_path):
    """torch-pruning's magnitude pruner, the baseline: pruned at epoch 1 to <= 40 % of the dense FLOPs, trained on,
    and rebuilt from its checkpoint with the pruned shapes and identical logits."""
    from lightning_modules import StructuredPruning

    factory, shape, _ = NETWORKS[network]
    make = lambda: StructuredPruning(factory, shape, NUM_CLASSES, flops_ratio=0.4, prune_epoch=1)  # noqa: E731
    torch.manual_seed(0)
    module = make()
    dense_flops = module.flops_dense
    data = TensorDataset(torch.randn(16, *shape), torch.randint(0, NUM_CLASSES, (16,)))
    trainer = Trainer(max_epochs=2, limit_val_batches=0, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, DataLoader(data, batch_size=8))
    x = torch.randn(4, *shape)
    pruned_flops = flops_per_sample(lambda: module.net.eval()(x), batch_size=len(x))
    assert pruned_flops <= 0.4 * dense_flops and module.pruned_at_epoch == 1
    assert sum(p.numel() for p in module.parameters()) < module.params_dense
    path = tmp_path / "pruned.ckpt"
    trainer.save_checkpoint(path)
    # the test built the module with a functools.partial (not a CLI class), which only a full unpickle restores
    fresh = StructuredPruning.load_from_checkpoint(path, map_location="cpu", weights_only=False)
    module.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh.net(x), module.net(x))
