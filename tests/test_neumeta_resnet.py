"""NeuMeta CIFAR ResNet-20 target (spec shared/specs/neumeta.md §1.1, §1.2 first row, §2.2, §2.5, §2.6): the
standard architecture and parameter count, BN folding, function-preserving smoothing over every clique of the
network, the resizable last block through ``functional_call``, and the width baselines (resampling, L1 pruning)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_modules.neumeta.evaluation import unit_activity
from models import NeuMetaResNet20
from models.neumeta_baselines import l1_prune_to_width
from models.neumeta_inr import NeuMetaINR
from models.neumeta_smoothing import check_cliques, fold_batchnorm_, network_tv, resample_to_width, smooth_

CIFAR = (3, 32, 32)
GENERATED = ("layer3.2.conv1.weight", "layer3.2.conv1.bias", "layer3.2.conv2.weight", "layer3.2.conv2.bias")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small convolutions on a shared 2-core box: one intra-op thread avoids OpenMP waits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randomise_bn_(net: nn.Module, gen: torch.Generator) -> None:
    """Random BN statistics and affine parameters, so folding and permuting them is not the identity."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, _BatchNorm):
                n = m.num_features
                m.running_mean.copy_(0.5 * torch.randn(n, generator=gen))
                m.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
                m.weight.copy_(1 + 0.3 * torch.randn(n, generator=gen))
                m.bias.copy_(0.3 * torch.randn(n, generator=gen))


def random_net(seed: int = 0, width: int = 64) -> NeuMetaResNet20:
    """A training-free ResNet-20 with randomised BN, in eval mode."""
    torch.manual_seed(seed)
    net = NeuMetaResNet20(CIFAR, 10, width=width)
    randomise_bn_(net, torch.Generator().manual_seed(seed + 100))
    return net.eval()


def folded_net(seed: int = 0) -> NeuMetaResNet20:
    net = random_net(seed)
    fold_batchnorm_(net)
    return net


def images(n: int, seed: int = 1) -> Tensor:
    return torch.randn(n, *CIFAR, generator=torch.Generator().manual_seed(seed))


def count(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


# ---------------------------------------------------------------------------------------------------------------
# architecture


def test_parameter_count_is_the_standard_resnet20():
    def conv(c_in: int, c_out: int, k: int = 3) -> int:  # bias-free conv
        return c_in * c_out * k * k

    def bn(c: int) -> int:  # gamma and beta (running statistics are buffers)
        return 2 * c

    def block(c_in: int, hidden: int, c_out: int) -> int:
        shortcut = conv(c_in, c_out, 1) + bn(c_out) if c_in != c_out else 0
        return conv(c_in, hidden) + bn(hidden) + conv(hidden, c_out) + bn(c_out) + shortcut

    def resnet20(h: int) -> int:
        stem = conv(3, 16) + bn(16)
        stage1 = 3 * block(16, 16, 16)
        stage2 = block(16, 32, 32) + 2 * block(32, 32, 32)
        stage3 = block(32, 64, 64) + block(64, 64, 64) + block(64, h, 64)
        return stem + stage1 + stage2 + stage3 + 64 * 10 + 10

    # 0.27 M: 269,722 with the parameter-free shortcut (option A) + 2,752 for the two 1x1 conv + BN shortcuts
    assert resnet20(64) == 272_474 == count(NeuMetaResNet20(CIFAR, 10))
    assert resnet20(32) == 235_546 == count(NeuMetaResNet20(CIFAR, 10, width=32))
    assert 272_474 - 235_546 == 2 * 64 * 32 * 9 + 2 * 32  # layer3.2 at h = 32: two convs and bn1 halve
    # folding trades every BN's (gamma, beta) for its conv's bias: one parameter less per BN channel
    net = NeuMetaResNet20(CIFAR, 10)
    bn_channels = sum(m.num_features for m in net.modules() if isinstance(m, _BatchNorm))
    assert bn_channels == 16 + 6 * 16 + 2 * 32 + 5 * 32 + 2 * 64 + 5 * 64  # stem, blocks, shortcuts
    assert count(NeuMetaResNet20(CIFAR, 10, batch_norm=False)) == 272_474 - bn_channels


def test_architecture_names_and_output_shape():
    net = NeuMetaResNet20(CIFAR, 10, width=40).eval()
    with torch.no_grad():
        assert net(images(4)).shape == (4, 10)
    names = dict(net.named_modules())
    for stage, channels in (("layer1", 16), ("layer2", 32), ("layer3", 64)):
        assert len(names[stage]) == 3 and names[f"{stage}.1.conv2"].out_channels == channels
    assert names["layer2.0.conv1"].stride == (2, 2) and names["layer3.0.downsample.0"].kernel_size == (1, 1)
    assert isinstance(names["layer3.0.downsample.1"], nn.BatchNorm2d) and "layer1.0.downsample.0" not in names
    assert names["layer3.2.conv1"].weight.shape == (40, 64, 3, 3)
    assert names["layer3.2.conv2"].weight.shape == (64, 40, 3, 3)
    assert names["conv1"].bias is None and names["fc"].weight.shape == (10, 64)
    assert net.layout.tensors(40) == {"layer3.2.conv1.weight": (40, 64, 3, 3), "layer3.2.conv1.bias": (40,),
                                      "layer3.2.conv2.weight": (64, 40, 3, 3), "layer3.2.conv2.bias": (64,)}
    assert net.layout.relu_producers() == ("layer3.2.conv1",)
    assert len(net.bn_pairs()) == 21 and ("layer2.0.downsample.0", "layer2.0.downsample.1") in net.bn_pairs()
    with pytest.raises(ValueError, match=r"needs image inputs \(C, H, W\)"):
        NeuMetaResNet20((3072,), 10)


def test_folding_equals_the_eval_network_and_loads_into_the_bn_free_form():
    net = random_net(0)
    x = images(8)
    with torch.no_grad():
        ref = net(x)
    folded = fold_batchnorm_(net)
    assert len(folded) == 21 and not net.has_batchnorm and net.bn_pairs() == []
    bare = NeuMetaResNet20(CIFAR, 10, batch_norm=False).eval()
    assert net.state_dict().keys() == bare.state_dict().keys()
    bare.load_state_dict(net.state_dict())
    with torch.no_grad():
        assert ref.abs().max() > 0.1  # logits of a useful size, so the tolerance means something
        torch.testing.assert_close(net(x), ref, atol=1e-5, rtol=0)
        assert torch.equal(bare(x), net(x))


# ---------------------------------------------------------------------------------------------------------------
# cliques and smoothing


@pytest.mark.parametrize("state", ["batch_norm", "bn_free", "folded"])
def test_cliques_cover_every_channel_axis_exactly_once(state):
    net = NeuMetaResNet20(CIFAR, 10, batch_norm=state == "batch_norm")
    if state == "folded":
        net = folded_net()
    cliques = net.cliques()
    check_cliques(net, cliques)  # members exist, sizes match, no (tensor, axis) twice
    sizes = {c.name: c.size for c in cliques}
    assert sizes == {"stream1": 16, "stream2": 32, "stream3": 64, "hidden": 64,
                     **{f"layer{s}.{b}.hidden": c for s, c in ((1, 16), (2, 32), (3, 64)) for b in range(3)
                        if (s, b) != (3, 2)}}
    covered = {(m.name, m.axis) for c in cliques for m in c.members}
    expected = set()
    for name, t in net.state_dict().items():
        if t.dim() == 0:  # num_batches_tracked
            continue
        if not name.startswith("fc."):  # class logits are never permuted (§2.5)
            expected.add((name, 0))
        if t.dim() >= 2 and name != "conv1.weight":  # nor the image channels
            expected.add((name, 1))
    assert covered == expected
    stream3 = next(c for c in cliques if c.name == "stream3")
    assert {(m.name, m.axis) for m in stream3.members} >= {
        ("layer3.0.downsample.0.weight", 0), ("layer3.2.conv2.weight", 0), ("layer3.1.conv1.weight", 1),
        ("layer3.2.conv1.weight", 1), ("fc.weight", 1)}


def test_only_the_last_block_hidden_clique_depends_on_the_width():
    layout = NeuMetaResNet20(CIFAR, 10).layout
    for batch_norm in (True, False):
        at_64 = {c.name: c for c in layout.cliques(64, batch_norm)}
        at_24 = {c.name: c for c in layout.cliques(24, batch_norm)}
        assert at_64.keys() == at_24.keys()
        assert [n for n in at_64 if at_64[n].size != at_24[n].size] == ["hidden"] and at_24["hidden"].size == 24
        assert all(at_64[n].members == at_24[n].members for n in at_64)


def test_smoothing_preserves_logits_and_lowers_tv():
    net = random_net(2)
    x = images(16, seed=3)
    with torch.no_grad():
        before = net(x)
    unpermuted = copy.deepcopy(net)
    fold_batchnorm_(unpermuted)
    result = smooth_(net)  # folds BN, then permutes all 12 cliques
    with torch.no_grad():
        after = net(x)
    assert len(result.folded) == 21 and len(result.permutations) == 12
    assert (after - before).abs().max() <= 1e-4 and torch.equal(after.argmax(1), before.argmax(1))
    assert result.tv_after < result.tv_before and network_tv(net) == pytest.approx(result.tv_after)
    assert all(result.clique_tv_after[k] <= result.clique_tv_before[k] for k in result.permutations)
    assert all(not torch.equal(p, torch.arange(len(p))) for p in result.permutations.values())
    # image channels and class order stay put: only the stem's output rows and fc's input columns moved
    assert torch.equal(net.conv1.weight, unpermuted.conv1.weight[result.permutations["stream1"]])
    assert torch.equal(net.fc.weight, unpermuted.fc.weight[:, result.permutations["stream3"]])
    assert torch.equal(net.fc.bias, unpermuted.fc.bias)


def test_smoothing_without_folding_permutes_the_bn_statistics_too():
    net = random_net(4)
    x = images(8, seed=5)
    with torch.no_grad():
        before = net(x)
    old_var = net.layer3[2].bn1.running_var.clone()
    result = smooth_(net, fold_bn=False)
    assert net.has_batchnorm and result.folded == []
    with torch.no_grad():
        assert (net(x) - before).abs().max() <= 1e-4
    assert torch.equal(net.layer3[2].bn1.running_var, old_var[result.permutations["hidden"]])


# ---------------------------------------------------------------------------------------------------------------
# the resizable block


@pytest.mark.parametrize("h", [16, 40])
def test_functional_call_on_the_width_64_template_equals_the_resized_network(h):
    template = folded_net(6)
    inr = NeuMetaINR(template.layout, norm=64, hidden=32, layers=3, num_freqs=4)
    assert inr.output_dim == 9  # 3x3 kernels
    with torch.no_grad():
        generated = inr.generate(h, 1.0, torch.Generator().manual_seed(h))
    assert {k: tuple(v.shape) for k, v in generated.items()} == template.layout.tensors(h)
    resized = template.resized(h)
    for name, value in template.state_dict().items():  # the fixed part is carried over unchanged
        if name not in generated:
            assert torch.equal(resized.state_dict()[name], value), name
    resized.load_state_dict(generated, strict=False)
    x = images(4, seed=7)
    with torch.no_grad(), unit_activity(template, template.layout.relu_producers()) as alive:
        through_template = functional_call(template, generated, (x,))
        assert alive["layer3.2.conv1"].shape == (h,)  # the dead-unit hook sees the generated width
        torch.testing.assert_close(through_template, resized(x), atol=1e-6, rtol=0)
        assert (through_template - template(x)).abs().max() > 1e-3  # the generated tensors were used
    with pytest.raises(ValueError, match="fold BatchNorm"):  # layer3.2.bn1 has h entries
        random_net(6).resized(h)


def test_resampling_returns_the_pretrained_tensors_at_64_and_the_layout_shapes_below():
    net = folded_net(8)
    state = net.state_dict()
    same = resample_to_width(net, 64)
    assert list(same) == list(GENERATED) and all(torch.equal(v, state[k]) for k, v in same.items())
    narrow = resample_to_width(net, 32)
    assert {k: tuple(v.shape) for k, v in narrow.items()} == net.layout.tensors(32)
    assert torch.equal(narrow["layer3.2.conv2.bias"], state["layer3.2.conv2.bias"])  # stream 3 keeps 64 channels
    torch.testing.assert_close(narrow["layer3.2.conv1.weight"], state["layer3.2.conv1.weight"][::2])  # o * 64 / 32
    torch.testing.assert_close(narrow["layer3.2.conv2.weight"], 2 * state["layer3.2.conv2.weight"][:, ::2])
    with torch.no_grad():
        assert functional_call(net, narrow, (images(2),)).shape == (2, 10)


def test_l1_pruning_equals_the_width_64_network_with_the_pruned_channels_zeroed():
    net = folded_net(9)
    state = net.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in l1_prune_to_width(net, 64).items())
    pruned = l1_prune_to_width(net, 32)
    assert {k: tuple(v.shape) for k, v in pruned.items()} == net.layout.tensors(32)
    weight = state["layer3.2.conv1.weight"]
    kept = weight.flatten(1).abs().sum(1).topk(32).indices.sort().values
    torch.testing.assert_close(pruned["layer3.2.conv1.bias"], state["layer3.2.conv1.bias"][kept])
    assert torch.equal(pruned["layer3.2.conv2.bias"], state["layer3.2.conv2.bias"])
    dead = torch.tensor(sorted(set(range(64)) - set(kept.tolist())))
    zeroed = copy.deepcopy(net)
    with torch.no_grad():  # switch the pruned hidden channels off in the wide network
        zeroed.layer3[2].conv1.weight.index_fill_(0, dead, 0.0)
        zeroed.layer3[2].conv1.bias.index_fill_(0, dead, 0.0)
        x = images(4, seed=10)
        narrow = functional_call(net, pruned, (x,))
        torch.testing.assert_close(narrow, zeroed(x), rtol=1e-5, atol=1e-5)
        assert (narrow - net(x)).abs().max() > 1e-3  # pruning changed the function
    with pytest.raises(ValueError, match="only narrow"):
        l1_prune_to_width(net, 128)
    with pytest.raises(ValueError, match="fold BatchNorm"):
        l1_prune_to_width(random_net(9), 32)
