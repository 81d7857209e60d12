"""MorphoNet's masks, preset networks and export: the spec's equations (2.1, 2.2), parameter hooks (2.5) and an
export that predicts exactly what the hard-masked network predicts while physically removing dead units."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from models import MLP, ConvNet, MorphoCNN, MorphoMLP, MorphoTransformer
from models.accounting import count_dense_equivalent, count_nonzero
from models.masked_network import has_connection_mask
from models.masks import PRUNED_LOGIT
from models.morpho_attention import SelfAttention, gate_heads
from models.morphonet import GatedSkip, masked_conv, masked_linear
from models.morphonet_export import export_summary
from parsing import parser_refuses

OFF, ON = -5.0, 5.0


def masked(net):
    """The masked layers of a preset, in module order."""
    return [m for m in net.net.modules() if has_connection_mask(m)]


def mask(layer):
    return layer.parametrizations.weight[0]


def W(layer):
    return layer.parametrizations.weight.original


def hard_eval(model):
    model.set_mask_mode("hard")
    return model.eval()


def assert_same_logits(model, exported, x):
    with torch.no_grad():
        diff = (hard_eval(model)(x) - exported(x)).abs().max().item()
    assert diff < 1e-5, diff


def assert_plain(exported):
    assert not any(parametrize.is_parametrized(m) for m in exported.modules())
    assert not any(n.rpartition(".")[2] in ("mask_logits", "head_logits") for n, _ in exported.named_parameters())


def widths(exported) -> list[int]:
    return [m.out_features if isinstance(m, nn.Linear) else m.out_channels for m in exported.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def randomise_biases_and_bn(model, generator_seed=0):
    """Non-zero biases (both signs, so some dead units output a non-zero constant) and BN running statistics."""
    g = torch.Generator().manual_seed(generator_seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)) and m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g))
            if isinstance(m, nn.BatchNorm1d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.randn(m.num_features, generator=g))
                m.bias.copy_(torch.randn(m.num_features, generator=g))


# --- masked layers ----------------------------------------------------------------------------------------


def test_init_statistics():
    torch.manual_seed(0)
    layer = masked_linear(400, 500, init_density=0.4)
    m = mask(layer)
    assert set(m.mask_logits.unique().tolist()) == {-2.0, 2.0}
    assert m.density() == pytest.approx(0.4, abs=0.01)
    assert 1 - m.hard_mask().mean().item() == pytest.approx(0.6, abs=0.01)  # hard sparsity at init
    assert W(layer).std().item() == pytest.approx((2 / 400) ** 0.5, rel=0.02)
    assert not layer.bias.any()
    assert float(m.temperature) == 1.0 and m.mask_mode == "soft"
    assert "parametrizations.weight.0.temperature" in layer.state_dict()
    net = MorphoMLP((8,), 3, hidden=(8, 8, 5))
    skips = [m for m in net.modules() if isinstance(m, GatedSkip)]
    assert len(skips) == 2 and all(s.skip_gate.item() == 0.0 for s in skips)  # 8 -> 8 twice; 8 -> 5 has none
    assert not any(isinstance(m, GatedSkip) for m in MorphoMLP((8,), 3, hidden=(8, 8), skip=False).modules())


def test_forward_is_the_explicit_formula_and_temperature_acts():
    torch.manual_seed(1)
    layer = masked_linear(7, 5, 0.4)
    m = mask(layer)
    with torch.no_grad():
        m.mask_logits.normal_(0, 2)
        layer.bias.normal_()
    x = torch.randn(4, 7)
    m.set_temperature(0.7)
    M, b = m.mask_logits, layer.bias
    torch.testing.assert_close(layer(x), x @ (W(layer) * torch.sigmoid(M / 0.7)).T + b)
    soft_07 = layer(x)
    m.set_temperature(2.0)
    assert not torch.allclose(layer(x), soft_07)
    m.mask_mode = "hard"
    torch.testing.assert_close(layer(x), x @ (W(layer) * (M > 0).float()).T + b)
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="temperature"):
            m.set_temperature(bad)
    with pytest.raises(ValueError, match="soft or hard"):
        m.mask_mode = "binary"
    skip = GatedSkip(masked_linear(6, 6, 0.4))
    with torch.no_grad():
        skip.skip_gate.fill_(0.3)
    z = torch.randn(3, 6)
    inner = skip.linear
    expected = z @ (W(inner) * mask(inner).soft_mask()).T + inner.bias + torch.sigmoid(torch.tensor(0.3)) * z
    torch.testing.assert_close(skip(z), expected)
    with pytest.raises(ValueError, match="in == out"):
        GatedSkip(nn.Linear(3, 4))


def test_penalty_and_prune():
    torch.manual_seed(2)
    m = mask(masked_linear(30, 20, 0.4))
    with torch.no_grad():
        m.mask_logits.normal_(0, 3)
    m.set_temperature(0.5)
    penalty = m.mask_penalty()
    assert penalty.requires_grad
    torch.testing.assert_close(penalty, torch.sigmoid(m.mask_logits / 0.5).mean())
    before = m.mask_logits.detach().clone()
    selected = torch.sigmoid(before / 0.5) < 0.3
    assert 0 < int(selected.sum()) < before.numel()
    assert m.prune_(0.3) == int(selected.sum())
    assert torch.all(m.mask_logits[selected] == PRUNED_LOGIT)
    assert torch.equal(m.mask_logits[~selected], before[~selected])
    assert m.prune_(0.3) == 0  # nothing new
    with pytest.raises(ValueError, match="threshold"):
        m.prune_(1.5)


def test_conv_mask_is_shared_across_input_channels_and_stride_works():
    torch.manual_seed(3)
    conv = masked_conv(3, 4, kernel_size=3, stride=2, init_density=0.4)
    m = mask(conv)
    assert m.mask_logits.shape == (4, 1, 3, 3) and W(conv).shape == (4, 3, 3, 3) and m.weights_per_mask_entry == 3
    with torch.no_grad():
        m.mask_logits.normal_(0, 2)
        conv.bias.normal_()
    x = torch.randn(2, 3, 9, 9)
    expected = F.conv2d(x, W(conv) * torch.sigmoid(m.mask_logits), conv.bias, stride=2, padding=1)
    torch.testing.assert_close(conv(x), expected)
    assert conv(x).shape == (2, 4, 5, 5)
    m.mask_mode = "hard"
    hard = conv.weight
    off = (m.mask_logits <= 0).squeeze(1)
    assert torch.all(hard.permute(1, 0, 2, 3)[:, off] == 0)  # an off entry zeroes that tap for every input channel
    assert count_nonzero(conv) == int((hard != 0).sum()) + 4
    assert count_dense_equivalent(conv) == 4 * 3 * 9 + 4
    with pytest.raises(ValueError, match="kernel_size and stride"):
        masked_conv(3, 4, 0, 1, 0.4)


def test_attention_ignores_padded_keys_and_head_gates_scale_scores():
    torch.manual_seed(4)
    attn = SelfAttention(16, 4).eval()
    gate = gate_heads(attn)
    assert gate.head_logits.shape == (4,)
    x = torch.randn(2, 7, 16)
    keep = torch.ones(2, 7, dtype=torch.bool)
    keep[0, 4:] = False
    changed = x.clone()
    changed[0, 4:] = 100 * torch.randn(3, 16)
    out, out_changed = attn(x, keep), attn(changed, keep)
    torch.testing.assert_close(out[0, :4], out_changed[0, :4], rtol=0, atol=1e-6)
    torch.testing.assert_close(out[1], out_changed[1])
    assert torch.isfinite(attn(x, torch.zeros(2, 7, dtype=torch.bool))).all()  # fully padded: no NaN
    # the gate multiplies head h's scores by s_h (the explicit formula), and s_h -> 0 attends uniformly
    with torch.no_grad():
        gate.head_logits.copy_(torch.tensor([0.5, -1.0, 2.0, 0.0]))
    gate.set_temperature(0.5)
    qkv = F.linear(x, attn.qkv.parametrizations.weight.original, attn.qkv.parametrizations.bias.original)
    q, k, v = qkv.view(2, 7, 3, 4, 4).permute(2, 0, 3, 1, 4)
    scores = q @ k.transpose(-2, -1) / 2.0 * torch.sigmoid(gate.head_logits / 0.5).view(1, -1, 1, 1)
    expected = attn.proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 7, 16))
    torch.testing.assert_close(attn(x), expected)
    with torch.no_grad():
        gate.head_logits.fill_(-1e4)
    v = attn.qkv(x)[..., 32:]
    torch.testing.assert_close(attn(x), attn.proj(v.mean(1, keepdim=True).expand_as(v)))


def test_transformer_logits_are_invariant_to_padding():
    torch.manual_seed(5)
    net = MorphoTransformer((12,), 3, vocab_size=50, d_model=16, n_heads=2, ff_dim=8).eval()
    ids = torch.randint(1, 50, (2, 6))
    short = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    padded_ids = torch.cat([ids, torch.randint(0, 50, (2, 4))], 1)
    padded = {"input_ids": padded_ids, "attention_mask": torch.cat([torch.ones_like(ids), torch.zeros(2, 4, dtype=torch.long)], 1)}
    torch.testing.assert_close(net(short), net(padded), rtol=0, atol=1e-5)
    assert net.example_input()["input_ids"].shape == (1, 12)
    with pytest.raises(ValueError, match="vocab_size"):
        net(torch.randn(2, 6, 4))
    dense = MorphoTransformer((5, 4), 2, vocab_size=None, d_model=8, n_heads=2, ff_dim=8)
    assert dense(torch.randn(3, 5, 4)).shape == (3, 2)


# --- networks ---------------------------------------------------------------------------------------------


REFUSED = [  # single-field values the argument parser refuses (called from Python, the annotations check nothing)
    (MorphoMLP, dict(hidden="[]")), (MorphoMLP, dict(hidden="[8, 0]")), (MorphoMLP, dict(init_density=1.5)),
    (MorphoMLP, dict(dropout=1.0)), (MorphoCNN, dict(channels="[]")), (MorphoCNN, dict(hidden=0)),
    (MorphoCNN, dict(kernel_size=0)), (MorphoCNN, dict(init_density=-0.1)), (MorphoTransformer, dict(n_layers=0)),
    (MorphoTransformer, dict(ff_dim=0)), (MorphoTransformer, dict(dropout=1.0)), (MorphoTransformer, dict(vocab_size=0)),
    (MorphoTransformer, dict(max_len=0)), (MLP, dict(hidden="[4, -1]")), (MLP, dict(activation="elu")),
    (MLP, dict(dropout=-0.5)), (ConvNet, dict(channels="[0]")), (ConvNet, dict(hidden=-1)), (ConvNet, dict(dropout=1.0)),
]


@pytest.mark.parametrize(("cls", "bad"), REFUSED, ids=[f"{c.__name__}-{next(iter(b))}={next(iter(b.values()))}" for c, b in REFUSED])
def test_the_parser_refuses_out_of_range_arguments(cls, bad):
    assert parser_refuses(cls, **bad)


def test_the_parser_accepts_in_range_arguments():
    assert not parser_refuses(MorphoMLP, hidden="[8]", init_density=1.0, dropout=0.0)
    assert not parser_refuses(MorphoCNN, channels="[4, 8]", hidden=3, kernel_size=5, init_density=0.0)
    assert not parser_refuses(MorphoTransformer, vocab_size="null", n_layers=1, ff_dim=1, dropout=0.0)
    assert not parser_refuses(MLP, hidden="[]", activation="prelu")
    assert not parser_refuses(ConvNet, channels="[]", hidden=0)


def test_heads_must_divide_the_width():
    with pytest.raises(ValueError, match="model.net.d_model .* multiple of model.net.n_heads"):
        MorphoTransformer((6,), 2, vocab_size=20, d_model=10, n_heads=4)


def test_presets_are_plain_networks_with_masks():
    """The presets are ``MaskedNetwork`` on plain layers: the masked layers are nn.Linear / nn.Conv2d, the output
    layer is not masked, and the transformer's attentions are plain ``SelfAttention`` with gated query rows."""
    mlp = MorphoMLP((4,), 3, hidden=(8, 8))
    assert [type(m).__bases__[0] for m in masked(mlp)] == [nn.Linear, nn.Linear] and not has_connection_mask(mlp.net[-1])
    cnn = MorphoCNN((1, 8, 8), 3, channels=(2, 3), hidden=4)
    assert [type(m).__bases__[0] for m in masked(cnn)] == [nn.Conv2d, nn.Conv2d, nn.Linear]
    tr = MorphoTransformer((6,), 2, vocab_size=20, d_model=8, n_heads=2, ff_dim=4)
    names = [n for n, m in tr.net.named_modules() if has_connection_mask(m)]
    assert names == ["blocks.0.ff1", "blocks.0.ff2", "blocks.1.ff1", "blocks.1.ff2"]
    assert all(parametrize.is_parametrized(b.attn.qkv, "bias") for b in tr.net.blocks)


def test_parameter_hooks_match_the_plain_mlp():
    torch.manual_seed(6)
    morpho = MorphoMLP((2,), 2)
    assert count_dense_equivalent(morpho) == 2_338 == count_dense_equivalent(MLP((2,), 2, hidden=[64, 32]))
    randomise_biases_and_bn(morpho)
    morpho.set_mask_mode("hard")
    layers = masked(morpho)
    expected = sum(int((W(l) * mask(l).hard_mask() != 0).sum()) + l.bias.numel() for l in layers) + 32 * 2 + 2
    assert count_nonzero(morpho) == expected
    assert sum(p.numel() for p in morpho.parameters()) == 2_338 + 2 * 64 + 64 * 32  # + mask logits (upstream "total")
    skip = MorphoMLP((3,), 2, hidden=(4, 4))  # a skip gate: one non-zero entry, not part of the dense architecture
    assert count_dense_equivalent(skip) == count_dense_equivalent(MLP((3,), 2, hidden=[4, 4]))


@pytest.mark.parametrize("make", [
    lambda: MorphoMLP((2,), 2, hidden=(8, 8), batch_norm=True),
    lambda: MorphoCNN((1, 8, 8), 3, channels=(2, 3), hidden=4),
    lambda: MorphoTransformer((6,), 2, vocab_size=20, d_model=8, n_heads=2, ff_dim=4),
])
def test_mask_and_weight_parameters_partition_the_parameters(make):
    net = make()
    masks, weights = net.mask_parameters(), net.weight_parameters()
    assert masks and weights and not {id(p) for p in masks} & {id(p) for p in weights}
    assert {id(p) for p in masks} | {id(p) for p in weights} == {id(p) for p in net.parameters()}
    assert sum(p.numel() for p in masks) + sum(p.numel() for p in weights) == sum(p.numel() for p in net.parameters())


def test_network_interface():
    torch.manual_seed(7)
    net = MorphoTransformer((6,), 2, vocab_size=20, d_model=8, n_heads=2, ff_dim=4, n_layers=2)
    net.set_temperature(0.5)
    assert all(float(m.temperature) == 0.5 for m in [*net.morpho_layers(), *net.attentions()])
    assert len(net.morpho_layers()) == 4 and len(net.attentions()) == 2
    expected = sum(l.soft_mask().mean() for l in net.morpho_layers()) + sum(a.head_scale().mean() for a in net.attentions())
    torch.testing.assert_close(net.mask_penalty(), expected)
    cnn = MorphoCNN((3, 8, 8), 2, channels=(4,), hidden=5)
    layers = cnn.morpho_layers()
    on = int((layers[0].mask_logits > 0).sum()) * 3 + int((layers[1].mask_logits > 0).sum())
    assert cnn.weighted_density() == pytest.approx(on / (4 * 9 * 3 + 64 * 5))
    torch.testing.assert_close(cnn.kept_fraction(), torch.tensor(cnn.weighted_density()))
    with torch.no_grad():
        for l in layers:
            l.mask_logits.normal_(0, 3)
    expected_pruned = sum(int((l.soft_mask() < 0.2).sum()) for l in layers)
    assert cnn.prune_(0.2) == expected_pruned
    cnn.set_mask_mode("hard")
    assert all(l.mask_mode == "hard" for l in layers)
    with pytest.raises(ValueError, match="soft or hard"):
        cnn.set_mask_mode("on")


# --- export -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_norm", [False, True])
@pytest.mark.parametrize("density, threshold", [(0.1, None), (0.4, 0.2), (0.8, 0.45)])
def test_mlp_export_matches_the_hard_masked_model(batch_norm, density, threshold):
    torch.manual_seed(8)
    net = MorphoMLP((3,), 4, hidden=(24, 12, 12, 6), init_density=density, batch_norm=batch_norm, dropout=0.1)
    randomise_biases_and_bn(net)
    if threshold is not None:  # trained-looking logits, then the final prune
        with torch.no_grad():
            for layer in net.morpho_layers():
                layer.mask_logits.normal_(0, 1.5)
        net.set_temperature(0.5)
        assert net.prune_(threshold) > 0
    exported = net.export()
    assert_plain(exported)
    assert_same_logits(net, exported, torch.randn(64, 3))
    assert any(isinstance(m, GatedSkip) for m in exported.modules())  # the 12 -> 12 layer keeps its gated skip
    summary = export_summary(net, exported)
    assert summary["params_exported"] == sum(p.numel() for p in exported.parameters())
    skips_and_norms = sum(p.numel() for m in exported.modules() if isinstance(m, (GatedSkip, nn.BatchNorm1d))
                          for p in m.parameters(recurse=False))
    assert summary["params_exported"] == sum(l["in_after"] * l["out_after"] + l["out_after"] for l in summary["layers"]) + skips_and_norms
    if summary["units_removed"]:
        assert summary["params_exported"] < summary["dense_equivalent"] + skips_and_norms
    if density == 0.1:
        assert summary["units_removed"] > 0  # with 3 inputs at density 0.1 most first-layer units are dead


def test_mlp_export_removes_dead_rows_and_columns_exactly():
    torch.manual_seed(9)
    net = MorphoMLP((5,), 3, hidden=(8, 6), init_density=1.0, skip=False)
    randomise_biases_and_bn(net)
    first, second = masked(net)
    output = net.net[-1]
    with torch.no_grad():
        mask(first).mask_logits[0:2] = OFF  # units 0, 1: constant relu(b)
        first.bias[0], first.bias[1] = 1.5, -0.5  # one non-zero constant (folded), one zero
        mask(second).mask_logits[:, 2:4] = OFF  # units 2, 3 of the first layer: read by nobody
        mask(second).mask_logits[4] = OFF  # second-layer unit 4: constant
        second.bias[4] = 0.7
        output.weight[:, 5] = 0  # second-layer unit 5: read by nobody
    exported = net.export()
    assert widths(exported) == [4, 4, 3]
    assert_plain(exported)
    assert_same_logits(net, exported, torch.randn(32, 5))
    assert sum(p.numel() for p in exported.parameters()) == 5 * 4 + 4 + 4 * 4 + 4 + 4 * 3 + 3
    # nothing removable: the exported model's real non-zero count is the hooks' count of the hard-masked model
    full = MorphoMLP((5,), 3, hidden=(8, 6), init_density=1.0)
    randomise_biases_and_bn(full)
    assert count_nonzero(full.export()) == count_nonzero(full.hard_plain())
    assert widths(full.export()) == [8, 6, 3]


@pytest.mark.parametrize("batch_norm", [False, True])
def test_skip_connected_units_are_removed_with_their_chain(batch_norm):
    """A skip ties unit j of a layer's input to unit j of its output: the chain goes when it is constant (its
    own diagonal weight keeps a constant constant) or read by nobody but itself; a fed chain stays."""
    torch.manual_seed(10)
    net = MorphoMLP((4,), 2, hidden=(6, 6, 5), init_density=1.0, skip=True, batch_norm=batch_norm)
    randomise_biases_and_bn(net)
    first, second, third = (mask(m) for m in masked(net))
    gated = next(m for m in net.modules() if isinstance(m, GatedSkip))
    with torch.no_grad():
        gated.skip_gate.fill_(0.4)
        masked(net)[0].bias[1] = 0.8
        first.mask_logits[1] = OFF  # chain 1: constant (first-layer row empty, second-layer row reads only unit 1)
        second.mask_logits[1] = OFF
        second.mask_logits[1, 1] = ON
        second.mask_logits[:, 3] = OFF  # chain 3: dead end (only the diagonal reads unit 3, and nothing reads it next)
        second.mask_logits[3, 3] = ON
        third.mask_logits[:, 3] = OFF
        first.mask_logits[4] = OFF  # constant in the first layer, but its skip partner is fed and read: kept
        first.mask_logits[5] = OFF  # chain 5: a constant head but a fed tail: kept
        third.mask_logits[:, 5] = OFF
    exported = net.export()
    assert widths(exported) == [4, 4, 5, 2]
    skip = next(m for m in exported.modules() if isinstance(m, GatedSkip))
    assert skip.linear.weight.shape == (4, 4)
    assert_same_logits(net, exported, torch.randn(32, 4))


def test_a_layer_tied_to_the_input_keeps_its_units():
    net = MorphoMLP((6,), 2, hidden=(6, 4), init_density=1.0, skip=True)
    first, second = (mask(m) for m in masked(net))
    with torch.no_grad():
        first.mask_logits[0] = OFF
        second.mask_logits[:, 0] = OFF
    exported = net.export()
    assert widths(exported) == [6, 4, 2]
    assert_same_logits(net, exported, torch.randn(8, 6))


def test_cnn_export_removes_dead_filters_and_folds_constants():
    torch.manual_seed(11)
    net = MorphoCNN((2, 10, 10), 3, channels=(4, 5), hidden=6, init_density=1.0)
    randomise_biases_and_bn(net)
    conv1, conv2, fc = masked(net)
    with torch.no_grad():
        mask(conv1).mask_logits[0], conv1.bias[0] = OFF, -1.0  # constant 0 before a conv: removed
        mask(conv1).mask_logits[1], conv1.bias[1] = OFF, 1.0  # constant 1 before a zero-padded conv: kept
        W(conv2)[:, 2] = 0  # conv1 filter 2 is read by nobody
        mask(conv2).mask_logits[2], conv2.bias[2] = OFF, 0.9  # constant map -> pooled -> folded into fc's bias
        mask(fc).mask_logits[:, 3 * 16 : 4 * 16] = OFF  # conv2 filter 3 is read by nobody
        mask(fc).mask_logits[0], fc.bias[0] = OFF, 0.6  # constant hidden unit -> folded into the output bias
    exported = net.export()
    assert widths(exported) == [2, 3, 5, 3]
    assert exported[-3].in_features == 3 * 16
    assert_plain(exported)
    assert_same_logits(net, exported, torch.randn(4, 2, 10, 10))


@pytest.mark.parametrize("density", [0.15, 0.4])
def test_cnn_export_matches_at_random_densities(density):
    torch.manual_seed(12)
    net = MorphoCNN((1, 12, 12), 4, channels=(6, 8), hidden=10, init_density=density)
    randomise_biases_and_bn(net)
    exported = net.export(prune_threshold=0.3)
    pruned = MorphoCNN((1, 12, 12), 4, channels=(6, 8), hidden=10)
    pruned.load_state_dict(net.state_dict())
    pruned.prune_(0.3)
    assert_same_logits(pruned, exported, torch.randn(6, 1, 12, 12))
    assert_plain(exported)


def test_transformer_export_folds_masks_and_head_gates():
    torch.manual_seed(13)
    net = MorphoTransformer((10,), 3, vocab_size=40, d_model=16, n_heads=4, ff_dim=8)
    net.set_temperature(0.6)
    with torch.no_grad():
        mask(net.net.blocks[0].ff2).mask_logits[:, 5] = OFF  # FF unit 5 of block 0 is read by nobody
    exported = net.export()
    assert_plain(exported)
    assert all(type(b.attn) is SelfAttention for b in exported.blocks)
    assert exported.blocks[0].ff1.out_features == 7 and exported.blocks[1].ff1.out_features == 8
    assert not any(k.endswith(("mask_logits", "head_logits")) for k in exported.state_dict())
    ids = torch.randint(0, 40, (3, 10))
    attention = torch.ones_like(ids)
    attention[0, 7:] = 0
    assert_same_logits(net, exported, {"input_ids": ids, "attention_mask": attention})


def test_export_leaves_the_model_and_the_rng_alone():
    torch.manual_seed(14)
    net = MorphoMLP((3,), 2, hidden=(8, 8))
    state = {k: v.clone() for k, v in net.state_dict().items()}
    rng = torch.get_rng_state()
    exported = net.export(prune_threshold=0.9)  # prunes a copy: every hidden unit dies
    export_summary(net, exported)
    assert torch.equal(rng, torch.get_rng_state())
    assert widths(exported) == [1, 1, 2]  # a layer keeps one unit
    pruned = MorphoMLP((3,), 2, hidden=(8, 8))
    pruned.load_state_dict(net.state_dict())
    pruned.prune_(0.9)
    assert_same_logits(pruned, exported, torch.randn(4, 3))
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in state.items())
    assert net.morpho_layers()[0].mask_mode == "soft"


def test_prune_to_density_switches_off_the_weakest_connections_first():
    torch.manual_seed(0)
    net = MorphoMLP((10,), 3, hidden=[20, 20], init_density=0.9)
    with torch.no_grad():
        for layer in net.morpho_layers():
            layer.mask_logits.copy_(torch.randn_like(layer.mask_logits).abs() + 0.1)  # all on, distinct strengths
    weakest = min(float(layer.mask_logits.min()) for layer in net.morpho_layers())
    pruned = net.prune_to_density_(0.7)
    assert pruned == round(0.3 * (200 + 400))
    assert abs(net.weighted_density() - 0.7) < 1 / 600
    survivors = torch.cat([layer.mask_logits[layer.mask_logits > 0] for layer in net.morpho_layers()])
    assert survivors.min() > weakest and net.prune_to_density_(0.8) == 0
