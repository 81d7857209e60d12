"""LruNet (spec B1-B3, E4) and the mobile baselines (B5): parameter accounting, weight sharing, the shuffle, gradient
sharing, shapes, the released-checkpoint key layout and importer, and the baselines' small-input adaptations."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from models.accounting import count_dense_equivalent
from parsing import parser_refuses
from models.lrunet import (
    LruBlock,
    LruNet,
    channel_shuffle_between_uses,
    load_published_state_dict,
    lrunet_config_from_state_dict,
)
from models.mobile_baselines import MobileNetV1, MobileNetV2Small, ShuffleNetV1, ShuffleNetV2Small

# The N = 1 Fashion-MNIST (1 channel, width 1, 10 classes) key layout of the authors' released checkpoint
# (shared/reference/lrunet_checkpoint_keys.txt, 'module.' prefix removed; the files hold no num_batches_tracked).
PUBLISHED_N1_FMNIST = """
features.0.weight (64, 1, 3, 3)
features.1.weight (64,)
features.1.bias (64,)
features.1.running_mean (64,)
features.1.running_var (64,)
stage1.dw.weight (128, 1, 3, 3)
stage1.pw.weight (64, 16, 1, 1)
stage1.dw_bn_list.0.weight (128,)
stage1.dw_bn_list.0.bias (128,)
stage1.dw_bn_list.0.running_mean (128,)
stage1.dw_bn_list.0.running_var (128,)
stage1.pw_bn_list.0.weight (64,)
stage1.pw_bn_list.0.bias (64,)
stage1.pw_bn_list.0.running_mean (64,)
stage1.pw_bn_list.0.running_var (64,)
stage2.dw.weight (256, 1, 3, 3)
stage2.pw.weight (128, 32, 1, 1)
stage2.dw_bn_list.0.weight (256,)
stage2.dw_bn_list.0.bias (256,)
stage2.dw_bn_list.0.running_mean (256,)
stage2.dw_bn_list.0.running_var (256,)
stage2.pw_bn_list.0.weight (128,)
stage2.pw_bn_list.0.bias (128,)
stage2.pw_bn_list.0.running_mean (128,)
stage2.pw_bn_list.0.running_var (128,)
stage3.dw.weight (512, 1, 3, 3)
stage3.pw.weight (256, 64, 1, 1)
stage3.dw_bn_list.0.weight (512,)
stage3.dw_bn_list.0.bias (512,)
stage3.dw_bn_list.0.running_mean (512,)
stage3.dw_bn_list.0.running_var (512,)
stage3.pw_bn_list.0.weight (256,)
stage3.pw_bn_list.0.bias (256,)
stage3.pw_bn_list.0.running_mean (256,)
stage3.pw_bn_list.0.running_var (256,)
stage4.dw.weight (1024, 1, 3, 3)
stage4.pw.weight (512, 128, 1, 1)
stage4.dw_bn_list.0.weight (1024,)
stage4.dw_bn_list.0.bias (1024,)
stage4.dw_bn_list.0.running_mean (1024,)
stage4.dw_bn_list.0.running_var (1024,)
stage4.pw_bn_list.0.weight (512,)
stage4.pw_bn_list.0.bias (512,)
stage4.pw_bn_list.0.running_mean (512,)
stage4.pw_bn_list.0.running_var (512,)
classifier.0.weight (256, 64, 1, 1)
classifier.1.weight (256,)
classifier.1.bias (256,)
classifier.1.running_mean (256,)
classifier.1.running_var (256,)
classifier.4.weight (10, 256, 1, 1)
classifier.4.bias (10,)
"""

FMNIST, CIFAR = (1, 28, 28), (3, 32, 32)
STAGES = ("stage1", "stage2", "stage3", "stage4")


def published_layout() -> dict[str, tuple[int, ...]]:
    layout = {}
    for line in PUBLISHED_N1_FMNIST.strip().splitlines():
        key, shape = line.split(" ", 1)
        layout[key] = tuple(int(v) for v in shape.strip("()").split(",") if v.strip())
    return layout


def n_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def randomise_bn(net: nn.Module) -> nn.Module:
    """Non-trivial BN affine parameters and running statistics, so a load that dropped them would show."""
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.3)
            m.running_mean.normal_(0, 0.3)
            m.running_var.uniform_(0.5, 2.0)
    return net


# --------------------------------------------------------------------------------------------------------
# Parameter accounting (B3, E4)


def test_fmnist_n1_total_matches_published_shapes():
    # Trainable tensors of the published N = 1 F-MNIST checkpoint (running statistics excluded), by hand:
    stem = 64 * 1 * 3 * 3 + 2 * 64                                # 576 + 128
    stage1 = 128 * 9 + 64 * 16 + 2 * 128 + 2 * 64                # dw 1152, pw 1024, BNs 384
    stage2 = 256 * 9 + 128 * 32 + 2 * 256 + 2 * 128              # 2304 + 4096 + 768
    stage3 = 512 * 9 + 256 * 64 + 2 * 512 + 2 * 256              # 4608 + 16384 + 1536
    stage4 = 1024 * 9 + 512 * 128 + 2 * 1024 + 2 * 512           # 9216 + 65536 + 3072
    head = 256 * 64 + 2 * 256 + (10 * 256 + 10)                  # 16384 + 512 + 2570
    expected = stem + stage1 + stage2 + stage3 + stage4 + head
    assert expected == 130_250
    listed = sum(torch.Size(shape).numel() for key, shape in published_layout().items() if "running_" not in key)
    assert listed == expected
    net = LruNet(FMNIST, 10, reuse=1, width=1)
    assert n_params(net) == expected
    # conv-only: the same minus every BatchNorm affine (stem 128, stages 384 + 768 + 1536 + 3072, head 512)
    assert net.conv_parameters() == expected - (128 + 384 + 768 + 1536 + 3072 + 512) == 123_850


@pytest.mark.parametrize(("num_classes", "width", "shape"), [(10, 1, CIFAR), (100, 2, CIFAR), (10, 1, FMNIST)])
def test_parameter_count_linear_in_reuse(num_classes, width, shape):
    # each extra use adds BN(2P) + BN(P) affine = 6P per stage, P in (64, 128, 256, 512) x width
    per_use = sum(6 * p * width for p in (64, 128, 256, 512))
    base = LruNet(shape, num_classes, reuse=1, width=width)
    for reuse in (1, 2, 4, 14):
        net = LruNet(shape, num_classes, reuse=reuse, width=width)
        assert n_params(net) == n_params(base) + (reuse - 1) * per_use
        assert net.conv_parameters() == base.conv_parameters()
        # accounting contract: the unrolled network has N private copies of every shared dw/pw
        shared = sum(getattr(net, s).dw.weight.numel() + getattr(net, s).pw.weight.numel() for s in STAGES)
        assert count_dense_equivalent(net) == n_params(net) + (reuse - 1) * shared


@pytest.mark.parametrize("reuse", [1, 3, 14])
def test_shared_convs_and_per_use_batchnorms(reuse):
    # E4 says "distinct dw/pw weight tensors = 4 for any N": one dw and one pw per stage, i.e. 4 distinct dw
    # weights and 4 distinct pw weights (8 shared conv tensors), a number that must not grow with N.
    net = LruNet(CIFAR, 10, reuse=reuse)
    dw = {id(p) for n, p in net.named_parameters() if n.endswith(".dw.weight")}
    pw = {id(p) for n, p in net.named_parameters() if n.endswith(".pw.weight")}
    assert len(dw) == len(pw) == 4
    stage_convs = [m for s in STAGES for m in getattr(net, s).modules() if isinstance(m, nn.Conv2d)]
    assert len(stage_convs) == 8
    for s in STAGES:
        norms = [m for m in getattr(net, s).modules() if isinstance(m, nn.BatchNorm2d)]
        assert len(norms) == 2 * reuse and len({id(m) for m in norms}) == 2 * reuse


# --------------------------------------------------------------------------------------------------------
# Forward semantics (B1, B2)


def test_shuffle_permutation():
    x = torch.arange(8.0).view(1, 8, 1, 1).expand(2, 8, 3, 3)
    out = channel_shuffle_between_uses(x)
    assert out[0, :, 0, 0].tolist() == [4, 0, 5, 1, 6, 2, 7, 3]
    assert torch.equal(out[1], out[0])
    p = 16  # general rule: out[2k] = in[P/2 + k], out[2k + 1] = in[k]
    y = channel_shuffle_between_uses(torch.arange(float(p)).view(1, p, 1, 1)).flatten().tolist()
    assert y == [v for k in range(p // 2) for v in (p // 2 + k, k)]


def test_shared_conv_gradient_is_sum_over_unrolled_copies():
    torch.manual_seed(0)
    block = randomise_bn(LruBlock(16, reuse=3)).train()
    dws = [copy.deepcopy(block.dw) for _ in range(3)]
    pws = [copy.deepcopy(block.pw) for _ in range(3)]
    x = torch.randn(4, 16, 6, 6)
    target = torch.randn(4, 16, 6, 6)

    (block(x) * target).sum().backward()
    shared_grads = (block.dw.weight.grad.clone(), block.pw.weight.grad.clone())
    bn_grads = [p.grad.clone() for p in block.dw_bn_list.parameters()]
    block.zero_grad()

    u = x  # the same B1 recursion with a private conv copy per use and the block's own BNs
    for i in range(3):
        u = torch.relu(block.pw_bn_list[i](pws[i](block.dw_bn_list[i](dws[i](u)))) + u)
        if i < 2:
            u = channel_shuffle_between_uses(u)
    (u * target).sum().backward()
    torch.testing.assert_close(shared_grads[0], sum(c.weight.grad for c in dws), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shared_grads[1], sum(c.weight.grad for c in pws), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bn_grads, [p.grad for p in block.dw_bn_list.parameters()], atol=1e-5, rtol=1e-5)
    assert all(c.weight.grad.abs().sum() > 0 for c in dws)  # every use contributes


@pytest.mark.parametrize("shape", [FMNIST, (3, 28, 28), (1, 32, 32), CIFAR])
@pytest.mark.parametrize("width", [1, 2])
def test_output_shapes_and_logit_sign(shape, width):
    torch.manual_seed(0)
    x = torch.randn(3, *shape)
    parity = LruNet(shape, 7, reuse=2, width=width).eval()
    out = parity(x)
    assert out.shape == (3, 7) and (out >= 0).all()
    clean = LruNet(shape, 7, reuse=2, width=width, mode="clean").eval()
    clean.load_state_dict(parity.state_dict())  # same keys: the modes differ only by the logit ReLU
    seen = {}
    clean.classifier.register_forward_hook(lambda m, i, o: seen.update(logit_map=o))
    out_clean = clean(x)
    assert out_clean.shape == (3, 7) and (out_clean < 0).any()
    torch.testing.assert_close(out_clean, seen["logit_map"].mean((2, 3)))
    torch.testing.assert_close(out, torch.relu(seen["logit_map"]).mean((2, 3)))  # parity: ReLU, then the 2x2 average


def test_final_map_is_2x2_for_28_and_32():
    for shape in (FMNIST, CIFAR):
        net = LruNet(shape, 10)
        seen = {}
        net.classifier.register_forward_hook(lambda m, i, o: seen.update(map=o.shape))
        net.eval()(torch.randn(1, *shape))
        assert seen["map"][-2:] == (2, 2)


def test_invalid_options_are_refused():
    for bad in (dict(width=3), dict(reuse=0), dict(mode="fast"), dict(dropout=1.0)):
        assert parser_refuses(LruNet, **bad), bad
    assert not parser_refuses(LruNet, reuse=3, width=2, mode="clean", dropout=0.0)
    with pytest.raises(ValueError, match="C, H, W"):
        LruNet((784,), 10)
    with pytest.raises(ValueError, match="vanishes"):
        LruNet((3, 0, 32), 10)


# --------------------------------------------------------------------------------------------------------
# Released checkpoint layout and importer (B5 note, E4)


def test_state_dict_keys_match_published_n1():
    own = {k: tuple(v.shape) for k, v in LruNet(FMNIST, 10, reuse=1, width=1).state_dict().items()
           if not k.endswith("num_batches_tracked")}
    assert own == published_layout()
    # N = 10: the same layout with bn_list entries 0..9 (the reference file lists 0 and 9)
    expected10 = {}
    for key, shape in published_layout().items():
        if "_bn_list.0." in key:
            expected10.update({key.replace("_bn_list.0.", f"_bn_list.{i}."): shape for i in range(10)})
        else:
            expected10[key] = shape
    own10 = {k: tuple(v.shape) for k, v in LruNet(FMNIST, 10, reuse=10).state_dict().items()
             if not k.endswith("num_batches_tracked")}
    assert own10 == expected10


@pytest.mark.parametrize(("reuse", "width", "num_classes", "shape"),
                         [(1, 1, 10, FMNIST), (10, 1, 10, FMNIST), (2, 2, 100, CIFAR)])
def test_published_round_trip(reuse, width, num_classes, shape):
    torch.manual_seed(reuse)
    source = randomise_bn(LruNet(shape, num_classes, reuse=reuse, width=width)).eval()
    published = {"module." + k: v.clone() for k, v in source.state_dict().items()
                 if not k.endswith("num_batches_tracked")}
    checkpoint = {"net": published, "acc": 91.17, "epoch": 74}
    config = lrunet_config_from_state_dict(published)
    assert config == {"reuse": reuse, "width": width, "num_classes": num_classes, "in_channels": shape[0]}
    assert lrunet_config_from_state_dict(checkpoint) == config
    net = LruNet((config["in_channels"], *shape[1:]), config["num_classes"], reuse=config["reuse"],
                 width=config["width"])
    load_published_state_dict(net, published)
    x = torch.rand(2, *shape)
    assert torch.equal(net.eval()(x), source(x))


def test_importer_rejects_foreign_state_dicts():
    with pytest.raises(ValueError, match="not an LruNet"):
        lrunet_config_from_state_dict({"module.fc.weight": torch.zeros(2, 2)})
    broken = {k: v for k, v in LruNet(FMNIST, 10, reuse=2).state_dict().items() if "stage3.pw_bn_list.1." not in k}
    with pytest.raises(ValueError, match="dw_bn_list/pw_bn_list"):
        lrunet_config_from_state_dict(broken)
    with pytest.raises(ValueError, match="does not fit"):
        load_published_state_dict(LruNet(FMNIST, 10, reuse=1), LruNet(FMNIST, 10, reuse=2).state_dict())
    with pytest.raises(ValueError, match="does not fit"):
        load_published_state_dict(LruNet(FMNIST, 10), LruNet(CIFAR, 10).state_dict())  # stem weight shape


# --------------------------------------------------------------------------------------------------------
# Mobile baselines (B5)

BASELINES = [(MobileNetV1, 0.25, 1.0), (MobileNetV2Small, 0.25, 1.0), (ShuffleNetV1, 0.5, 1.0),
             (ShuffleNetV2Small, 0.25, 1.0)]
PRE_POOL = {MobileNetV1: "features", MobileNetV2Small: "features", ShuffleNetV1: "stages", ShuffleNetV2Small: "conv5"}

# Parameter counts at the B5 widths; equal to those of the reference repo's definitions (okankop/CNN-layer-reuse
# 1dd8d42), checked when this file was written against a transcription of that code.
REFERENCE_COUNTS = {
    (MobileNetV1, 0.25, 3, 10): 215_642, (MobileNetV1, 0.25, 1, 10): 215_498, (MobileNetV1, 0.4, 3, 100): 567_217,
    (MobileNetV2Small, 0.25, 3, 10): 249_122, (MobileNetV2Small, 0.25, 1, 10): 248_978,
    (MobileNetV2Small, 0.4, 3, 100): 603_248,
    (ShuffleNetV1, 0.5, 3, 10): 228_565, (ShuffleNetV1, 0.5, 1, 10): 228_349, (ShuffleNetV1, 0.75, 3, 100): 559_633,
    (ShuffleNetV2Small, 0.25, 3, 10): 211_082, (ShuffleNetV2Small, 0.25, 1, 10): 210_650,
    (ShuffleNetV2Small, 0.75, 3, 100): 568_408,
}


@pytest.mark.parametrize(("cls", "small", "large"), BASELINES, ids=lambda v: getattr(v, "__name__", str(v)))
def test_baseline_shapes_width_and_spatial_map(cls, small, large):
    torch.manual_seed(0)
    assert n_params(cls(CIFAR, 10, width=small)) < n_params(cls(CIFAR, 10, width=large))
    for shape in (FMNIST, CIFAR):
        net = cls(shape, 10, width=small).eval()
        seen = {}
        getattr(net, PRE_POOL[cls]).register_forward_hook(lambda m, i, o: seen.update(map=o.shape))
        out = net(torch.randn(2, *shape))
        assert out.shape == (2, 10) and torch.isfinite(out).all()
        assert seen["map"][-2:] == (4, 4)  # total stride 8: 32 -> 4 and 28 -> 4 (ImageNet's stride 32 would give 1x1)


@pytest.mark.parametrize(("cls", "width", "channels", "num_classes", "count"),
                         [(*key, count) for key, count in REFERENCE_COUNTS.items()],
                         ids=[f"{k[0].__name__}-{k[1]}x-{k[2]}ch-{k[3]}cls" for k in REFERENCE_COUNTS])
def test_baseline_parameter_counts_match_reference(cls, width, channels, num_classes, count):
    assert n_params(cls((channels, 32, 32), num_classes, width=width)) == count


def test_baseline_invalid_widths_raise():
    with pytest.raises(ValueError, match="width"):
        ShuffleNetV2Small(CIFAR, 10, width=0.3)
    with pytest.raises(ValueError, match="width"):  # > 0, but int(32 * 0.01) = 0 channels
        MobileNetV1(CIFAR, 10, width=0.01)
    for cls, bad in ((MobileNetV1, dict(width=0.0)), (MobileNetV2Small, dict(dropout=1.0)),
                     (ShuffleNetV1, dict(groups=4)), (ShuffleNetV2Small, dict(width=-0.5))):
        assert parser_refuses(cls, **bad), (cls, bad)
    assert not parser_refuses(ShuffleNetV1, groups=8, width=0.5)
