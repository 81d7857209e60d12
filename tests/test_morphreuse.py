"""MorphReuse invariants: the spec's exact parameter counts, frozen tensors, and a shared core whose gradient
is the sum of its uses."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_modules import Baseline, LoRA, MorphReuse
from models import MLP, BackboneClassifier, BertClassifier, SharedCoreMLP, ShapeSharedBert
from models.morphreuse import CoreAdapter, ShapeSharedLinear
from parsing import parser_refuses

BERT_TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


def counts(module) -> tuple[int, int]:
    p = module.accounting()["params"]
    return p["total"], p["trainable"]


@pytest.mark.parametrize(
    "shape, baseline, morphreuse, lora",
    [
        ((1, 28, 28), (669_706, 669_706), (315_713, 83_009), (681_074, 11_368)),  # MNIST / FashionMNIST
        ((3, 32, 32), (1_841_162, 1_841_162), (608_577, 83_009), (1_861_682, 20_520)),  # CIFAR-10 flattened
    ],
)
def test_vision_parity_parameter_counts_match_the_spec(shape, baseline, morphreuse, lora):
    assert counts(Baseline(net=lambda s, c: MLP(s, c, hidden=[512, 512]), input_shape=shape, num_classes=10)) == baseline
    assert counts(MorphReuse(net=lambda s, c: SharedCoreMLP(s, c), input_shape=shape, num_classes=10)) == morphreuse
    assert counts(LoRA(net=lambda s, c: MLP(s, c, hidden=[512, 512]), input_shape=shape, num_classes=10, r=4, alpha=4)) == lora


@pytest.fixture(scope="module")
def tinybert_models():
    """The three SST-2 methods on TinyBERT's architecture with random weights (no download)."""
    bert = lambda **kw: (lambda s, c: BertClassifier(s, c, encoder="random-tinybert", **kw))  # noqa: E731
    return {
        "baseline": Baseline(net=bert(trainable_top_layers=2), input_shape=(64,), num_classes=2),
        "morphreuse": MorphReuse(net=lambda s, c: ShapeSharedBert(s, c, encoder="random-tinybert"), input_shape=(64,), num_classes=2),
        "lora": LoRA(net=bert(trainable_top_layers=0), input_shape=(64,), num_classes=2, r=4, alpha=8,
                     target_modules=BERT_TARGETS, modules_to_save=["classifier"]),
        "lora_top2": LoRA(net=bert(trainable_top_layers=0), input_shape=(64,), num_classes=2, r=4, alpha=8,
                          target_modules=BERT_TARGETS, modules_to_save=["classifier"], layers_to_transform=[-2, -1], layers_pattern="layer"),
    }


def test_tinybert_parity_parameter_counts_match_the_spec(tinybert_models):
    assert counts(tinybert_models["baseline"]) == (14_350_874, 2_284_994)
    assert counts(tinybert_models["morphreuse"]) == (12_916_983, 851_103)
    assert counts(tinybert_models["lora"]) == (14_439_820, 88_946)
    assert counts(tinybert_models["lora_top2"])[1] == 44_786  # spec 1.10.6: the fair LoRA
    assert tinybert_models["morphreuse"].net.shape_groups() == {"312x312": 8, "312x1200": 2, "1200x312": 2, "312x2": 1}
    # without sharing, MorphReuse's architecture is exactly the baseline's
    assert tinybert_models["morphreuse"].accounting()["params"]["dense_equivalent"] == 14_350_874


def test_shared_weights_are_stored_once(tinybert_models):
    net = tinybert_models["morphreuse"].net
    keys = [k for k in net.state_dict() if k.startswith("shared.")]
    assert sorted(keys) == sorted(f"shared.{g}.{p}" for g in ("312x312", "312x1200", "1200x312", "312x2") for p in ("weight", "bias"))
    wrapped = [m for m in net.modules() if isinstance(m, ShapeSharedLinear)]
    assert len(wrapped) == 13 and not any(k.endswith("query.shared.weight") for k in net.state_dict())


def frozen_get_no_gradient(module, batch) -> None:
    module.net.train()
    module.net.zero_grad()
    module(batch).sum().backward()
    for name, param in module.net.named_parameters():
        if param.requires_grad:
            continue
        assert param.grad is None, f"frozen {name} received a gradient"
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.net.parameters() if p.requires_grad)


@pytest.mark.parametrize("method", ["baseline", "morphreuse", "lora"])
def test_frozen_text_tensors_get_no_gradient(tinybert_models, method):
    ids = torch.randint(1000, 2000, (3, 12))
    frozen_get_no_gradient(tinybert_models[method], {"input_ids": ids, "attention_mask": torch.ones_like(ids)})


def test_frozen_vision_tensors_get_no_gradient():
    frozen_get_no_gradient(MorphReuse(net=lambda s, c: SharedCoreMLP(s, c), input_shape=(1, 28, 28), num_classes=10), torch.randn(4, 1, 28, 28))
    lora = LoRA(net=lambda s, c: MLP(s, c), input_shape=(1, 28, 28), num_classes=10)
    frozen_get_no_gradient(lora, torch.randn(4, 1, 28, 28))
    assert all("lora_" in n for n, p in lora.net.named_parameters() if p.requires_grad)


def test_shared_core_gradient_is_the_sum_over_its_uses():
    torch.manual_seed(0)
    net = SharedCoreMLP((20,), 5, widths=[16, 16], core_dim=8, scale="vector")
    x = torch.randn(6, 20)
    net(x).square().sum().backward()
    shared = {n: p.grad.clone() for n, p in net.core.named_parameters()}

    # the same network with an independent copy of the core in every adapter
    unrolled = copy.deepcopy(net)
    unrolled.zero_grad()
    copies = []
    for adapter in unrolled.adapters:
        own = copy.deepcopy(unrolled.core)
        object.__setattr__(adapter, "core", own)
        copies.append(own)
    unrolled(x).square().sum().backward()
    for name, grad in shared.items():
        summed = sum(dict(c.named_parameters())[name].grad for c in copies)
        torch.testing.assert_close(grad, summed, rtol=1e-5, atol=1e-7)
    assert len(copies) == 3 and all(isinstance(a, CoreAdapter) for a in net.adapters)


def test_core_is_registered_once_and_adapters_only_reference_it():
    net = SharedCoreMLP((1, 28, 28), 10)
    assert all(a.core is net.core for a in net.adapters)
    assert sum(1 for k in net.state_dict() if "fc1.weight" in k) == 1
    assert sum(p.numel() for p in net.parameters()) == 315_713


def test_options_beyond_parity_change_the_trainable_count():
    trainable = lambda **kw: sum(p.numel() for p in SharedCoreMLP((1, 28, 28), 10, **kw).parameters() if p.requires_grad)  # noqa: E731
    assert trainable(scale="scalar") == 83_009 + 2
    assert trainable(scale="vector") == 83_009 + 2 * 128
    assert trainable(train_proj=True) == 315_713
    assert trainable(widths=[512, 512]) == 83_009  # a third adapter adds only frozen projections
    assert sum(p.numel() for p in SharedCoreMLP((1, 28, 28), 10, widths=[512, 512]).parameters()) == 315_713 + 2 * 65_536


def test_quirk_flags_of_the_bert_variant():
    clean = ShapeSharedBert((16,), 2, encoder="random-tinybert", gelu_on_logits=False, share_across_roles=False)
    assert clean.model.classifier.activation is False
    groups = clean.shape_groups()
    assert len(groups) == 7 and all(uses == 2 for key, uses in groups.items() if not key.startswith("classifier"))


def test_conv_frozen_backbone_loads_and_stays_fixed(tmp_path):
    trained = Baseline(net=lambda s, c: BackboneClassifier(s, c, head=lambda s2, c2: MLP(s2, c2, hidden=[32])), input_shape=(3, 32, 32), num_classes=10)
    path = tmp_path / "backbone.ckpt"
    torch.save({"state_dict": trained.state_dict()}, path)
    frozen = MorphReuse(
        net=lambda s, c: BackboneClassifier(s, c, head=lambda s2, c2: SharedCoreMLP(s2, c2), freeze_backbone=True, backbone_checkpoint=str(path)),
        input_shape=(3, 32, 32), num_classes=10,
    )
    for name, value in trained.net.backbone.state_dict().items():
        assert torch.equal(value, frozen.net.backbone.state_dict()[name]), name
    frozen.train()
    assert not frozen.net.backbone.training and frozen.net.head.training
    assert counts(frozen)[1] == 83_009
    assert isinstance(frozen.net.backbone[0], nn.Conv2d)


REFUSED = [  # single-field values the argument parser refuses (called from Python, the annotations check nothing)
    (SharedCoreMLP, dict(core_dim=0)), (SharedCoreMLP, dict(expand=0)), (SharedCoreMLP, dict(widths="[]")),
    (SharedCoreMLP, dict(widths="[512, 0]")), (SharedCoreMLP, dict(scale="matrix")), (SharedCoreMLP, dict(activation="tanh")),
    (ShapeSharedBert, dict(wrapped_top_layers=-1)), (BackboneClassifier, dict(channels="[]")),
    (BackboneClassifier, dict(channels="[32, 0]")),
]


@pytest.mark.parametrize(("cls", "bad"), REFUSED, ids=[f"{c.__name__}-{next(iter(b))}={next(iter(b.values()))}" for c, b in REFUSED])
def test_the_parser_refuses_out_of_range_arguments(cls, bad):
    assert parser_refuses(cls, **bad)


def test_the_parser_accepts_in_range_arguments():
    assert not parser_refuses(SharedCoreMLP, core_dim=1, expand=0.5, widths="[8]", scale="vector", activation="gelu")
    assert not parser_refuses(ShapeSharedBert, wrapped_top_layers=0)
    assert not parser_refuses(BackboneClassifier, channels="[8]")
