"""LayerCollapse invariants (spec shared/specs/layercollapse_lrunet.md E1): the collapsed Linear equals the
linearised model (slope forced to 1) to float rounding, but not the un-linearised one; the tau threshold; a
function-preserving torchvision VGG11 head conversion and its exact collapse; parameter counts; MLP round trip."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from models import CollapsibleBlock, CollapsibleMLP, collapse_chain, collapse_sequential, collapse_vgg_classifier, convert_vgg_classifier
from models.layercollapse import convert_vit_mlp, prelu_slopes

D, H, O, N = 64, 256, 64, 512
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def randomise_bn(module: nn.Module, gen: torch.Generator) -> None:
    """Non-trivial running statistics and affine parameters for every BatchNorm1d."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm1d):
                n, dt = m.num_features, m.weight.dtype
                m.running_mean.copy_(torch.randn(n, generator=gen, dtype=dt))
                m.running_var.copy_(torch.rand(n, generator=gen, dtype=dt) * 1.5 + 0.5)
                m.weight.copy_(1 + 0.3 * torch.randn(n, generator=gen, dtype=dt))
                m.bias.copy_(0.3 * torch.randn(n, generator=gen, dtype=dt))


def set_slopes(module: nn.Module, value: float) -> nn.Module:
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.PReLU):
                m.weight.fill_(value)
    return module


def linearised(module: nn.Module) -> nn.Module:
    return set_slopes(copy.deepcopy(module), 1.0)


def three_layer_chain(batch_norm: bool) -> nn.Sequential:
    """Linear -> PReLU -> Dropout(0.3) -> (BN) -> Linear -> PReLU -> Dropout(0.3) -> (BN) -> Linear."""
    mods: list[nn.Module] = []
    for fin, fout in ((D, H), (H, H)):
        mods += [nn.Linear(fin, fout), nn.PReLU(1, init=0.96), nn.Dropout(0.3)]
        if batch_norm:
            mods.append(nn.BatchNorm1d(fout))
    return nn.Sequential(*mods, nn.Linear(H, O))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch_norm", [False, True])
@pytest.mark.parametrize("kind", ["block", "chain3"])
def test_collapse_equals_linearised_model_but_not_the_prelu_model(kind, batch_norm, dtype):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    if kind == "block":
        model = CollapsibleBlock(D, H, O, slope_init=0.96, dropout=0.3, batch_norm=batch_norm)
    else:
        model = three_layer_chain(batch_norm)
    model = model.to(dtype)
    randomise_bn(model, gen)
    model.eval()
    x = torch.randn(N, D, generator=gen, dtype=dtype)
    if kind == "block":
        collapsed = model.collapse()
    else:
        seq, removed = collapse_sequential(model, tau=0.05)
        assert removed == 2 and len(seq) == 1
        collapsed = seq[0]
    assert isinstance(collapsed, nn.Linear) and collapsed.weight.dtype == dtype
    assert (collapsed.in_features, collapsed.out_features) == (D, O)
    with torch.no_grad():
        y_c, y_lin, y_prelu = collapsed(x), linearised(model)(x), model(x)
    assert (y_c - y_lin).abs().max().item() < TOL[dtype]
    assert (y_c - y_prelu).abs().max().item() > 1e-3  # a = 0.96 is not 1: a no-op collapse would fail


def test_collapse_chain_direct_three_layers_with_bn_matches_formula():
    torch.manual_seed(0)
    l1, l2, l3 = nn.Linear(5, 7).double(), nn.Linear(7, 6).double(), nn.Linear(6, 3).double()
    bn = nn.BatchNorm1d(7).double().eval()
    randomise_bn(bn, torch.Generator().manual_seed(0))
    lin = collapse_chain([l1, l2, l3], [bn, None])
    x = torch.randn(11, 5, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(lin(x), l3(l2(bn(l1(x)))), rtol=0, atol=1e-12)
    with pytest.raises(ValueError):
        collapse_chain([l1, l3])


def test_threshold_logic():
    block = CollapsibleBlock(4, 8, 3)
    set_slopes(block, 0.96)
    assert block.collapsible(0.05)
    set_slopes(block, 0.94)
    assert not block.collapsible(0.05)
    mlp = CollapsibleMLP((4,), 3, hidden=(8, 8, 8), collapsible_last=2)
    (_, b0), (_, b1) = mlp.blocks()
    set_slopes(b0, 0.94), set_slopes(b1, 0.96)
    assert mlp.collapse_(0.05) == ["block1"]
    assert mlp.collapsed_structure() == ["block1"] and [n for n, _ in mlp.blocks()] == ["block0"]


@pytest.fixture(scope="module")
def vgg11():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    return torchvision.models.vgg11(weights=None).eval()


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_vgg11_head_conversion_collapse_and_parameter_counts(vgg11):
    head_before = (25088 * 4096 + 4096) + (4096 * 4096 + 4096) + (4096 * 1000 + 1000)
    head_after = 25088 * 1000 + 1000
    features = n_params(vgg11.features)
    total_before = n_params(vgg11)
    assert n_params(vgg11.classifier) == head_before and total_before == features + head_before == 132_863_336

    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))  # AdaptiveAvgPool -> 512x7x7 anyway
    with torch.no_grad():
        y_relu = vgg11(x)
        convert_vgg_classifier(vgg11)  # ReLU -> PReLU(a0 = 0): exactly the same function
        assert prelu_slopes(vgg11.classifier) == [0.0, 0.0]
        assert torch.equal(vgg11(x), y_relu)
        assert n_params(vgg11) == total_before + 2  # the two slopes

        assert collapse_vgg_classifier(vgg11, tau=0.05) == 0  # slopes 0: nothing collapses
        set_slopes(vgg11.classifier, 0.97)
        lin_head = linearised(vgg11.classifier)
        feats = torch.flatten(vgg11.avgpool(vgg11.features(x)), 1)
        y_lin, y_prelu = lin_head(feats), vgg11.classifier(feats)
        assert collapse_vgg_classifier(vgg11, tau=0.05) == 2
        assert len(vgg11.classifier) == 1 and isinstance(vgg11.classifier[0], nn.Linear)
        assert (vgg11.classifier[0].in_features, vgg11.classifier[0].out_features) == (25088, 1000)
        y_col = vgg11(x)
    # fp32 with reductions over 25088 and 4096 inputs in a different association: the rounding error scales with
    # the logit magnitude, not with each logit, and small logits near 0 would fail a pure rtol, so atol = 1e-5 x the
    # largest |logit| (measured: max |diff| 1.3e-6 at max |logit| 0.56, i.e. ~4x margin) plus rtol 1e-5.
    scale = y_lin.abs().max().item()
    torch.testing.assert_close(y_col, y_lin, rtol=1e-5, atol=1e-5 * scale)
    assert (y_col - y_prelu).abs().max().item() > 1e-3 * scale  # the slopes were 0.97, not 1
    assert n_params(vgg11.classifier) == head_after
    assert n_params(vgg11) == features + head_after == 34_309_480


def test_vit_mlp_conversion_changes_gelu_to_prelu_and_collapses():
    torchvision = pytest.importorskip("torchvision")
    mlp = torchvision.models.vision_transformer.MLPBlock(16, 64, 0.0).eval()
    convert_vit_mlp(mlp)
    assert prelu_slopes(mlp) == [pytest.approx(0.01)]
    set_slopes(mlp, 1.0)
    x = torch.randn(3, 5, 16)
    seq, removed = collapse_sequential(mlp, tau=0.05)
    assert removed == 1
    with torch.no_grad():
        torch.testing.assert_close(seq(x), mlp(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch_norm", [False, True])
def test_collapsible_mlp_structure_collapse_and_round_trip(batch_norm):
    torch.manual_seed(0)
    mlp = CollapsibleMLP((1, 28, 28), 10, hidden=(512, 512), dropout=0.2, batch_norm=batch_norm)
    names = [n for n, _ in mlp.layers.named_children()]
    assert names == ["flatten", "fc0", "act0", "drop0", "block0"]
    assert mlp.blocks()[0][1].fc1.in_features == 512 and mlp.blocks()[0][1].fc2.out_features == 10
    assert mlp.slopes() == {"block0": pytest.approx(0.01)}
    mlp.penalty().backward()  # (a - 1)^2 gives a gradient to the slope only
    assert mlp.blocks()[0][1].act.weight.grad.item() == pytest.approx(2 * (0.01 - 1))

    deep = CollapsibleMLP((1, 28, 28), 10, hidden=(64, 32, 32), dropout=0.2, batch_norm=batch_norm, collapsible_last=2)
    assert [n for n, _ in deep.layers.named_children()] == ["flatten", "fc0", "act0", "drop0", "block0", "bact0", "bdrop0", "block1"]
    randomise_bn(deep, torch.Generator().manual_seed(0))
    set_slopes(deep.layers.block0, 0.5), set_slopes(deep.layers.block1, 0.99)
    deep.eval()
    x = torch.randn(16, 1, 28, 28)
    with torch.no_grad():
        y_lin = linearised(deep.layers.block1)(deep.layers[:-1](x))
        assert deep.collapse_(0.05) == ["block1"]
        y = deep(x)
    torch.testing.assert_close(y, y_lin, rtol=1e-5, atol=1e-5)
    structure = deep.collapsed_structure()
    assert structure == ["block1"]

    fresh = CollapsibleMLP((1, 28, 28), 10, hidden=(64, 32, 32), dropout=0.2, batch_norm=batch_norm, collapsible_last=2)
    fresh.apply_structure(structure)
    fresh.load_state_dict(deep.state_dict())  # strict: keys and shapes must match exactly
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), y)
    assert fresh.collapsed_structure() == ["block1"] and list(fresh.slopes()) == ["block0"]
    with pytest.raises(ValueError):
        fresh.apply_structure(["block7"])
