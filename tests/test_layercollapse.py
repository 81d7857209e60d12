"""LayerCollapse invariants (spec shared/specs/layercollapse_lrunet.md E1): the collapsed Linear equals the
linearised model (slope forced to 1) to float rounding, but not the un-linearised one; the tau threshold; a
function-preserving torchvision VGG11 head conversion and its exact collapse; parameter counts; MLP round trip."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from models import CollapsibleBlock, CollapsibleMLP, collapse_chain, collapse_sequential, collapse_vgg_classifier, convert_vgg_classifier
from models.layercollapse import collapse_blocks_, collapsible_blocks, collapsible_from_mlp, convert_vit_mlps_, rebuild_collapsed_
from models.mixer import MLPMixer, MixerBlock, convert_mixer_block_
from models.collapsible_vgg import CollapsibleVGG
from parsing import parser_refuses

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
                m.bias.copy_(0.3 * torch.randn(n, generator=gen, dtype=dt))


def set_slopes(module: nn.Module, value: float) -> nn.Module:
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.PReLU):
                m.weight.fill_(value)
    return module


def linearised(module: nn.Module) -> nn.Module:
    return set_slopes(copy.deepcopy(module), 1.0)


def prelu_slopes(module: nn.Module) -> list[float]:
    """Slopes of the single-parameter PReLUs in ``module``, in registration order."""
    return [float(m.weight) for m in module.modules() if isinstance(m, nn.PReLU) and m.weight.numel() == 1]


def collapse_within(net: nn.Module, tau: float) -> list[str]:
    """Collapse every block with |a - 1| < tau, as ``LayerCollapse`` does (``collapsible`` then ``collapse_blocks_``)."""
    return collapse_blocks_(net, [n for n, b in collapsible_blocks(net).items() if b.collapsible(tau)])


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


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_collapse_chain_folds_bn_as_torch_fusion_does(affine, bias):
    """BN folding is torch's Linear-BN fusion: the collapse equals ``L2(fuse_linear_bn_eval(L1, BN))`` (which
    refuses a BN without affine parameters) and the uncollapsed eval-mode chain (fp32, max |diff| <= 1e-5), also
    for BN without affine parameters, Linears without biases, and modules left in training mode (collapse always
    uses eval semantics)."""
    torch.manual_seed(0)
    l1, l2 = nn.Linear(D, H, bias=bias), nn.Linear(H, O, bias=bias)
    bn = nn.BatchNorm1d(H, affine=affine)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        if affine:
            bn.weight.normal_(1.0, 0.3), bn.bias.normal_(0.0, 0.3)
    lin = collapse_chain([l1, l2], [bn])  # l1, l2, bn in training mode
    assert l1.training and bn.training
    x = torch.randn(N, D)
    with torch.no_grad():
        y = lin(x)
        bn.eval(), l1.eval()
        if affine:
            fused = nn.utils.fusion.fuse_linear_bn_eval(l1, bn)
            assert (y - l2(fused(x))).abs().max().item() <= 1e-5
        assert (y - l2(bn(l1(x)))).abs().max().item() <= 1e-5


def test_threshold_logic():
    block = CollapsibleBlock(4, 8, 3)
    set_slopes(block, 0.96)
    assert block.collapsible(0.05)
    set_slopes(block, 0.94)
    assert not block.collapsible(0.05)
    mlp = CollapsibleMLP((4,), 3, hidden=(8, 8, 8), collapsible_last=2)
    set_slopes(mlp.layers.block0, 0.94), set_slopes(mlp.layers.block1, 0.96)
    assert collapse_within(mlp, 0.05) == ["layers.block1"]
    assert isinstance(mlp.layers.block1, nn.Linear) and list(collapsible_blocks(mlp)) == ["layers.block0"]


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


def test_vit_mlp_conversion_keeps_weights_swaps_gelu_and_collapses():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(image_size=16, patch_size=8, num_layers=3, num_heads=2, hidden_dim=16, mlp_dim=64, num_classes=5).eval()
    original = copy.deepcopy(vit.encoder.layers[2].mlp)
    assert convert_vit_mlps_(vit, last_k=2) == ["encoder.layers.encoder_layer_1.mlp", "encoder.layers.encoder_layer_2.mlp"]
    block = vit.encoder.layers[2].mlp
    assert isinstance(block, CollapsibleBlock) and isinstance(vit.encoder.layers[0].mlp, torchvision.ops.MLP)
    assert prelu_slopes(vit) == [pytest.approx(0.01)] * 2
    x = torch.randn(3, 5, 16)
    with torch.no_grad():  # same weights, PReLU(0.01) instead of GELU
        expected = original[3](nn.functional.prelu(original[0](x), torch.tensor([0.01])))
        torch.testing.assert_close(block(x), expected)
    set_slopes(vit, 0.98)
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        y_lin = linearised(vit)(images)
        names = [n for n, b in collapsible_blocks(vit).items() if b.collapsible(0.05)]
        collapse_blocks_(vit, names)
        assert all(isinstance(vit.get_submodule(n), nn.Linear) for n in names) and len(names) == 2
        torch.testing.assert_close(vit(images), y_lin, rtol=1e-5, atol=1e-5)


def test_timm_style_mlp_and_trailing_dropout_conversion():
    class TimmMlp(nn.Module):  # the attribute layout of timm.layers.Mlp
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.act, self.drop1 = nn.Linear(6, 24, bias=False), nn.GELU(), nn.Dropout(0.1)
            self.norm, self.fc2, self.drop2 = nn.Identity(), nn.Linear(24, 6), nn.Dropout(0.2)

    mlp = TimmMlp()
    converted = collapsible_from_mlp(mlp, slope_init=0.3)
    assert isinstance(converted, nn.Sequential) and converted[1].p == 0.2 and converted[0].drop.p == 0.1
    assert torch.equal(converted[0].fc1.weight, mlp.fc1.weight) and torch.equal(converted[0].fc1.bias, torch.zeros(24))
    with pytest.raises(ValueError, match="fc1/fc2"):
        collapsible_from_mlp(nn.ReLU())


def test_mixer_block_conversion_and_exact_collapse():
    torch.manual_seed(0)
    block = MixerBlock(patches=16, dim=8, token_hidden=12, channel_hidden=32).eval()
    x = torch.randn(4, 16, 8)
    token_w = block.token_mlp[0].weight.clone()
    convert_mixer_block_(block, slope_init=0.01)
    assert isinstance(block.token_mlp, CollapsibleBlock) and isinstance(block.channel_mlp, CollapsibleBlock)
    assert torch.equal(block.token_mlp.fc1.weight, token_w)
    set_slopes(block, 0.97)
    with torch.no_grad():
        y_lin, y_prelu = linearised(block)(x), block(x)
        collapse_blocks_(block, ["token_mlp", "channel_mlp"])
        y = block(x)
    assert (block.token_mlp.in_features, block.channel_mlp.in_features) == (16, 8)
    torch.testing.assert_close(y, y_lin, rtol=1e-5, atol=1e-5)
    assert (y - y_prelu).abs().max() > 1e-3

    mixer = MLPMixer((1, 28, 28), 10, patch_size=7, dim=8, depth=3, token_hidden=8, channel_hidden=16, collapsible_last=1)
    assert list(collapsible_blocks(mixer)) == ["blocks.2.token_mlp", "blocks.2.channel_mlp"]
    assert mixer(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_custom_vgg_structure_parameter_count_and_head_collapse():
    torch.manual_seed(0)
    vgg = CollapsibleVGG((3, 32, 32), 10, depth=11, hidden=64).eval()
    convs = [(3, 64), (64, 128), (128, 256), (256, 256), (256, 512), (512, 512), (512, 512), (512, 512)]
    conv_params = sum(9 * i * o + 2 * o + 1 for i, o in convs)  # weight, BN affine, one PReLU slope
    head = 512 * 64 + 64 + 1 + 2 * 64 + 64 * 10 + 10  # fc1, slope, BN, fc2
    assert n_params(vgg) == conv_params + head
    assert prelu_slopes(vgg.features) == [0.0] * 8 and vgg.classifier.slope() == pytest.approx(0.01)
    randomise_bn(vgg, torch.Generator().manual_seed(0))
    set_slopes(vgg.classifier, 0.99)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        y_lin = linearised(vgg.classifier)(vgg.features(x).flatten(1))
        collapse_blocks_(vgg, ["classifier"])
        torch.testing.assert_close(vgg(x), y_lin, rtol=1e-5, atol=1e-5)
    assert n_params(vgg) == conv_params + 512 * 10 + 10
    with pytest.raises(ValueError, match="multiples of 32"):
        CollapsibleVGG((1, 28, 28), 10)


REFUSED = [  # single-field values the argument parser refuses (called from Python, the annotations check nothing)
    (CollapsibleMLP, dict(hidden="[8, 0]")), (CollapsibleMLP, dict(dropout=1.0)), (CollapsibleMLP, dict(collapsible_last=0)),
    (CollapsibleVGG, dict(depth=12)), (CollapsibleVGG, dict(hidden=0)), (CollapsibleVGG, dict(dropout="[0.1, 0.2]")),
    (CollapsibleVGG, dict(dropout="[0.1, 0.2, 0.3, 0.4, 1.0]")), (MLPMixer, dict(patch_size=0)), (MLPMixer, dict(depth=0)),
    (MLPMixer, dict(dim=0)), (MLPMixer, dict(token_hidden=0)), (MLPMixer, dict(channel_hidden=0)),
    (MLPMixer, dict(dropout=-0.1)), (MLPMixer, dict(collapsible_last=-1)),
]


@pytest.mark.parametrize(("cls", "bad"), REFUSED, ids=[f"{c.__name__}-{next(iter(b))}={next(iter(b.values()))}" for c, b in REFUSED])
def test_the_parser_refuses_out_of_range_arguments(cls, bad):
    assert parser_refuses(cls, **bad)


def test_the_parser_accepts_in_range_arguments_and_the_constructors_check_the_relations():
    assert not parser_refuses(CollapsibleMLP, hidden="[8]", dropout=0.0, collapsible_last=1)
    assert not parser_refuses(CollapsibleVGG, depth=19, dropout="[0, 0, 0, 0, 0.5]")
    assert not parser_refuses(MLPMixer, collapsible_last=0, dropout=0.0)
    with pytest.raises(ValueError, match=r"model.net.collapsible_last \(CollapsibleMLP\) must be in \[1, len\(hidden\) = 2\]"):
        CollapsibleMLP((4,), 3, hidden=(8, 8), collapsible_last=3)
    with pytest.raises(ValueError, match=r"model.net.collapsible_last \(MLPMixer\) must be in \[0, depth = 2\]"):
        MLPMixer((1, 8, 8), 3, depth=2, collapsible_last=3)


@pytest.mark.parametrize("batch_norm", [False, True])
def test_collapsible_mlp_structure_collapse_and_round_trip(batch_norm):
    torch.manual_seed(0)
    mlp = CollapsibleMLP((1, 28, 28), 10, hidden=(512, 512), dropout=0.2, batch_norm=batch_norm)
    names = [n for n, _ in mlp.layers.named_children()]
    assert names == ["flatten", "fc0", "act0", "drop0", "block0"]
    assert mlp.layers.block0.fc1.in_features == 512 and mlp.layers.block0.fc2.out_features == 10
    assert {n: b.slope() for n, b in collapsible_blocks(mlp).items()} == {"layers.block0": pytest.approx(0.01)}

    deep = CollapsibleMLP((1, 28, 28), 10, hidden=(64, 32, 32), dropout=0.2, batch_norm=batch_norm, collapsible_last=2)
    assert [n for n, _ in deep.layers.named_children()] == ["flatten", "fc0", "act0", "drop0", "block0", "bact0", "bdrop0", "block1"]
    randomise_bn(deep, torch.Generator().manual_seed(0))
    set_slopes(deep.layers.block0, 0.5), set_slopes(deep.layers.block1, 0.99)
    deep.eval()
    x = torch.randn(16, 1, 28, 28)
    with torch.no_grad():
        y_lin = linearised(deep.layers.block1)(deep.layers[:-1](x))
        assert collapse_within(deep, 0.05) == ["layers.block1"]
        y = deep(x)
    torch.testing.assert_close(y, y_lin, rtol=1e-5, atol=1e-5)
    fresh = CollapsibleMLP((1, 28, 28), 10, hidden=(64, 32, 32), dropout=0.2, batch_norm=batch_norm, collapsible_last=2)
    rebuild_collapsed_(fresh, ["layers.block1"])
    fresh.load_state_dict(deep.state_dict())  # strict: keys and shapes must match exactly
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), y)
    assert list(collapsible_blocks(fresh)) == ["layers.block0"]
    with pytest.raises(ValueError, match="block7"):
        rebuild_collapsed_(fresh, ["layers.block7"])
    with pytest.raises(ValueError, match="not a CollapsibleBlock"):
        collapse_blocks_(fresh, ["layers.fc0"])
