"""LayerCollapse invariants (spec shared/specs/layercollapse_lrunet.md E1): the collapsed Linear equals the
linearised model (slope forced to 1) to float rounding, but not the un-linearised one; the tau threshold; chains
found in torchvision / timm / the lab's networks, function-preserving ReLU conversion and exact collapse;
parameter counts; the same structure whatever the order of collapse; checkpoint rebuild."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from models import CollapsibleBlock, CollapsibleMLP, collapse_chain
from models.collapse_chains import collapse_chains_, find_chains, rebuild_collapsed_chains_, slope, to_prelu_
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
    return [float(m.weight.detach()) for m in module.modules() if isinstance(m, nn.PReLU) and m.weight.numel() == 1]


def collapse_within(net: nn.Module, tau: float) -> list[str]:
    """Collapse every PReLU chain with |a - 1| < tau, as ``LayerCollapse`` does; returns their names."""
    chains = [c for c in find_chains(net) if isinstance(net.get_submodule(c.act), nn.PReLU)]
    names = [c.name for c in chains if abs(slope(net, c) - 1.0) < tau]
    collapse_chains_(net, chains, names)
    return names


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
    with torch.no_grad():
        y_lin, y_prelu = linearised(model)(x), model(x)
        collapsed = copy.deepcopy(model)
        assert len(collapse_within(collapsed, tau=0.05)) == {"block": 1, "chain3": 2}[kind]
        y_c = collapsed(x)
    linears = [m for m in collapsed.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 1 and linears[0].weight.dtype == dtype and not any(isinstance(m, (nn.PReLU, nn.BatchNorm1d)) for m in collapsed.modules())
    assert (linears[0].in_features, linears[0].out_features) == (D, O)
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
    set_slopes(block, 0.94)
    assert collapse_within(block, 0.05) == []
    set_slopes(block, 0.96)
    assert collapse_within(block, 0.05) == ["act"]  # the network's root holds the chain: named by its activation
    mlp = CollapsibleMLP((4,), 3, hidden=(8, 8, 8), collapsible_last=2)
    set_slopes(mlp.layers.block0, 0.94), set_slopes(mlp.layers.block1, 0.96)
    assert collapse_within(mlp, 0.05) == ["layers.block1"]
    assert isinstance(mlp.layers.block1, nn.Linear) and [c.name for c in find_chains(mlp)] == ["layers.block0"]


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
    chains = find_chains(vgg11)
    assert [c.name for c in chains] == ["classifier.1", "classifier.4"]  # two chains in one owner: by activation
    with torch.no_grad():
        y_relu = vgg11(x)
        assert to_prelu_(vgg11, chains) == []  # ReLU -> PReLU(a0 = 0): exactly the same function
        assert prelu_slopes(vgg11.classifier) == [0.0, 0.0]
        assert torch.equal(vgg11(x), y_relu)
        assert n_params(vgg11) == total_before + 2  # the two slopes

        assert collapse_within(vgg11, tau=0.05) == []  # slopes 0: nothing collapses
        set_slopes(vgg11.classifier, 0.97)
        lin_head = linearised(vgg11.classifier)
        feats = torch.flatten(vgg11.avgpool(vgg11.features(x)), 1)
        y_lin, y_prelu = lin_head(feats), vgg11.classifier(feats)
        assert collapse_within(vgg11, tau=0.05) == ["classifier.1", "classifier.4"]
        assert isinstance(vgg11.classifier, nn.Linear)  # the run was the classifier's whole forward
        assert (vgg11.classifier.in_features, vgg11.classifier.out_features) == (25088, 1000)
        y_col = vgg11(x)
    # fp32 with reductions over 25088 and 4096 inputs in a different association: the rounding error scales with
    # the logit magnitude, not with each logit, and small logits near 0 would fail a pure rtol, so atol = 1e-5 x the
    # largest |logit| (measured: max |diff| 1.3e-6 at max |logit| 0.56, i.e. ~4x margin) plus rtol 1e-5.
    scale = y_lin.abs().max().item()
    torch.testing.assert_close(y_col, y_lin, rtol=1e-5, atol=1e-5 * scale)
    assert (y_col - y_prelu).abs().max().item() > 1e-3 * scale  # the slopes were 0.97, not 1
    assert n_params(vgg11.classifier) == head_after
    assert n_params(vgg11) == features + head_after == 34_309_480


def test_the_order_of_collapse_does_not_change_the_result_and_a_checkpoint_rebuilds_it():
    """A run of chains (Linear a1 Linear a2 Linear, BatchNorm between) collapsed one chain at a time, in either
    order, is the network collapsed at once; a fresh network rebuilt from the names loads its state dict."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.PReLU(1, 0.98), nn.BatchNorm1d(16), nn.Linear(16, 8),
                        nn.PReLU(1, 0.99), nn.Dropout(0.1), nn.Linear(8, 3)).eval()
    randomise_bn(net, torch.Generator().manual_seed(2))
    fresh = copy.deepcopy(net)
    chains = find_chains(net)
    assert [c.name for c in chains] == ["2", "5"]
    x = torch.randn(32, 12)
    with torch.no_grad():
        y_lin = linearised(net)(x)
        results = []
        for order in (["2", "5"], ["5", "2"], [["2", "5"]]):
            copied = copy.deepcopy(net)
            done: list[str] = []
            for step in order:
                names = step if isinstance(step, list) else [step]
                collapse_chains_(copied, chains, names, before=done)
                done += names
            results.append(copied)
            torch.testing.assert_close(copied(x), y_lin, rtol=1e-5, atol=1e-6)
        assert [type(m).__name__ for m in results[0]] == ["Flatten", "Linear"] + ["Identity"] * 6
        for other in results[1:]:
            assert [type(m) for m in other] == [type(m) for m in results[0]]
        rebuild_collapsed_chains_(fresh, chains, ["5", "2"])
        fresh.load_state_dict(results[1].state_dict())
        assert torch.equal(fresh(x), results[1](x))
    with pytest.raises(ValueError, match="collapsed already"):
        collapse_chains_(results[0], chains, ["2"], before=["2", "5"])


def test_what_is_not_a_chain():
    """A middle output read twice, a functional activation, a shared module and a per-channel PReLU: no chain."""
    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.act, self.fc2 = nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)

        def forward(self, x):
            h = self.act(self.fc1(x))
            return self.fc2(h) + h

    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)))

    shared = nn.ReLU()
    assert find_chains(Residual()) == [] and find_chains(Functional()) == []
    assert find_chains(nn.Sequential(nn.Linear(4, 4), nn.PReLU(4), nn.Linear(4, 4))) == []
    assert find_chains(nn.Sequential(nn.Sequential(nn.Linear(4, 4), shared, nn.Linear(4, 4)), shared)) == []
    assert [c.name for c in find_chains(nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 4)))] == ["1"]


def test_vit_mlp_conversion_keeps_weights_swaps_gelu_and_collapses():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(image_size=16, patch_size=8, num_layers=3, num_heads=2, hidden_dim=16, mlp_dim=64, num_classes=5).eval()
    nn.init.normal_(vit.heads.head.weight)  # torchvision starts the head at zero: the logits would say nothing
    original = copy.deepcopy(vit.encoder.layers[2].mlp)
    chains = find_chains(vit)[-2:]
    assert [c.name for c in chains] == ["encoder.layers.encoder_layer_1.mlp", "encoder.layers.encoder_layer_2.mlp"]
    assert to_prelu_(vit, chains, slope_init=0.01) == [c.name for c in chains]  # GELU -> PReLU changes the function
    block = vit.encoder.layers[2].mlp
    assert isinstance(block[1], nn.PReLU) and isinstance(vit.encoder.layers[0].mlp[1], nn.GELU)
    assert prelu_slopes(vit) == [pytest.approx(0.01)] * 2
    x = torch.randn(3, 5, 16)
    with torch.no_grad():  # same weights, PReLU(0.01) instead of GELU
        expected = original[3](nn.functional.prelu(original[0](x), torch.tensor([0.01])))
        torch.testing.assert_close(block(x), expected)
    set_slopes(vit, 0.98)
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        y_lin = linearised(vit)(images)
        assert collapse_within(vit, 0.05) == [c.name for c in chains]
        # MLPBlock ends in a Dropout: the fold sits in its first Linear, the rest is Identity
        assert [type(m).__name__ for m in vit.encoder.layers[2].mlp] == ["Linear", "Identity", "Identity", "Identity", "Dropout"]
        torch.testing.assert_close(vit(images), y_lin, rtol=1e-5, atol=1e-5)
        assert (vit(images) - y_lin).abs().max() < 1e-4 * y_lin.abs().max()


def test_timm_mlp_without_bias_converts_and_collapses():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    mlp = timm.layers.Mlp(6, 24, bias=False, drop=0.1).eval()
    fc1 = mlp.fc1.weight.clone()
    chains = find_chains(mlp)
    assert [(c.first, c.act, c.middle, c.last) for c in chains] == [("fc1", "act", ("drop1", "norm"), "fc2")]
    assert to_prelu_(mlp, chains, slope_init=0.3) == ["act"] and slope(mlp, chains[0]) == pytest.approx(0.3)
    x = torch.randn(7, 6)
    with torch.no_grad():
        assert torch.equal(mlp.fc1.weight, fc1)
        y_lin = linearised(mlp)(x)
        collapse_chains_(mlp, chains, ["act"])
        assert mlp.fc1.bias is not None and torch.count_nonzero(mlp.fc1.bias) == 0  # missing biases count as zero
        torch.testing.assert_close(mlp(x), y_lin, rtol=1e-5, atol=1e-6)


def test_mixer_block_conversion_and_exact_collapse():
    torch.manual_seed(0)
    block = MixerBlock(patches=16, dim=8, token_hidden=12, channel_hidden=32).eval()
    x = torch.randn(4, 16, 8)
    token_w = block.token_mlp[0].weight.clone()
    convert_mixer_block_(block, slope_init=0.01)
    assert isinstance(block.token_mlp[1], nn.PReLU) and isinstance(block.channel_mlp[1], nn.PReLU)
    assert torch.equal(block.token_mlp[0].weight, token_w)
    set_slopes(block, 0.97)
    with torch.no_grad():
        y_lin, y_prelu = linearised(block)(x), block(x)
        assert collapse_within(block, 0.05) == ["token_mlp", "channel_mlp"]
        y = block(x)
    assert (block.token_mlp[0].in_features, block.token_mlp[0].out_features, block.channel_mlp[0].in_features) == (16, 16, 8)
    torch.testing.assert_close(y, y_lin, rtol=1e-5, atol=1e-5)
    assert (y - y_prelu).abs().max() > 1e-3

    mixer = MLPMixer((1, 28, 28), 10, patch_size=7, dim=8, depth=3, token_hidden=8, channel_hidden=16, collapsible_last=1)
    prelu_chains = [c.name for c in find_chains(mixer) if isinstance(mixer.get_submodule(c.act), nn.PReLU)]
    assert prelu_chains == ["blocks.2.token_mlp", "blocks.2.channel_mlp"] and len(find_chains(mixer)) == 6
    assert mixer(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_custom_vgg_structure_parameter_count_and_head_collapse():
    torch.manual_seed(0)
    vgg = CollapsibleVGG((3, 32, 32), 10, depth=11, hidden=64).eval()
    convs = [(3, 64), (64, 128), (128, 256), (256, 256), (256, 512), (512, 512), (512, 512), (512, 512)]
    conv_params = sum(9 * i * o + 2 * o + 1 for i, o in convs)  # weight, BN affine, one PReLU slope
    head = 512 * 64 + 64 + 1 + 2 * 64 + 64 * 10 + 10  # fc1, slope, BN, fc2
    assert n_params(vgg) == conv_params + head
    assert prelu_slopes(vgg.features) == [0.0] * 8 and float(vgg.classifier.act.weight) == pytest.approx(0.01)
    randomise_bn(vgg, torch.Generator().manual_seed(0))
    set_slopes(vgg.classifier, 0.99)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        y_lin = linearised(vgg.classifier)(vgg.features(x).flatten(1))
        assert collapse_within(vgg, 0.05) == ["classifier"]
        assert isinstance(vgg.classifier, nn.Linear)  # a CollapsibleBlock is its chain's whole owner
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
    assert {c.name: slope(mlp, c) for c in find_chains(mlp)} == {"layers.block0": pytest.approx(0.01)}

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
    chains = find_chains(fresh)
    rebuild_collapsed_chains_(fresh, chains, ["layers.block1"])
    fresh.load_state_dict(deep.state_dict())  # strict: keys and shapes must match exactly
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), y)
    assert [c.name for c in find_chains(fresh)] == ["layers.block0"]
    with pytest.raises(ValueError, match="no collapsible chain is named"):
        rebuild_collapsed_chains_(fresh, chains, ["layers.block7"])
    with pytest.raises(ValueError, match="no collapsible chain is named"):
        collapse_chains_(fresh, chains, ["layers.fc0"])
