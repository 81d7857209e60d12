"""NeuMeta smoothing and the width baselines (spec shared/specs/neumeta.md §1.1, §2, §9.4.1, §9.6 unit tests 3-4):
function-preserving smoothing (and that a wrong clique breaks it), BN folding, TV decrease with a deterministic
solver, resampling to another width and structured L1 pruning."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm

from models.neumeta_baselines import l1_prune_to_width
from models.neumeta_smoothing import (
    check_cliques,
    clique_features,
    fold_batchnorm_,
    network_tv,
    path_cost,
    permute_clique_,
    resample_to_width,
    shortest_open_path,
    smooth_,
    tensor_tv,
)
from models.neumeta_targets import Clique, Member, NeuMetaCNN, NeuMetaHead
from test_neumeta_core import SHAPES, WIDTH, make_target, one_thread  # noqa: F401 (one_thread: an autouse fixture)


def randomise_bn_(net: nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, _BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen))
                m.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
                m.weight.copy_(1 + 0.3 * torch.randn(n, generator=gen))
                m.bias.copy_(0.3 * torch.randn(n, generator=gen))


# ---------------------------------------------------------------------------------------------------------------
# 3. permutation identity


def expected_after(old: dict[str, Tensor], cliques, perms) -> dict[str, Tensor]:
    """``old`` with exactly the clique axes reordered: anything else smoothing changed is a bug."""
    new = {k: v.clone() for k, v in old.items()}
    for clique in cliques:
        for m in clique.members:
            new[m.name] = new[m.name].index_select(m.axis, perms[clique.name])
    return new


@pytest.mark.parametrize("kind", ["head", "res", "cnn"])
@pytest.mark.parametrize("batch_norm, fold_bn", [(False, True), (True, True), (True, False)])
def test_smoothing_preserves_logits_and_touches_only_clique_axes(kind, batch_norm, fold_bn):
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    net = make_target(kind, WIDTH[kind], batch_norm=batch_norm)
    randomise_bn_(net, gen)
    net.eval()
    x = torch.randn(64, *SHAPES[kind], generator=gen)
    with torch.no_grad():
        before = net(x)
    if fold_bn:
        fold_batchnorm_(net)
    old = {k: v.clone() for k, v in net.state_dict().items()}
    cliques = net.cliques()
    result = smooth_(net, fold_bn=fold_bn)
    with torch.no_grad():
        after = net(x)
    assert (after - before).abs().max() <= 1e-5
    assert torch.equal(after.argmax(1), before.argmax(1))
    assert net.has_batchnorm == (batch_norm and not fold_bn)
    assert any(not torch.equal(p, torch.arange(len(p))) for p in result.permutations.values())
    expected = expected_after(old, cliques, result.permutations)
    for key, value in net.state_dict().items():
        assert torch.equal(value, expected[key]), key
    # first layer's input axis and last layer's output axis are in no clique, hence untouched
    first, last = {"head": "stem", "res": "stem", "cnn": "conv1"}[kind], {"head": "fc2", "res": "fc", "cnn": "fc"}[kind]
    members = {(m.name, m.axis) for c in cliques for m in c.members}
    assert (f"{first}.weight", 1) not in members and (f"{last}.weight", 0) not in members
    assert (f"{last}.bias", 0) not in members and torch.equal(net.state_dict()[f"{last}.bias"], old[f"{last}.bias"])
    if batch_norm and not fold_bn:  # running statistics moved with their channels
        hidden = next(c for c in cliques if c.name in ("hidden", "conv1"))
        bn = {"head": "bn1", "res": "bn1", "cnn": "bn1"}[kind]
        perm = result.permutations[hidden.name]
        assert torch.equal(net.state_dict()[f"{bn}.running_var"], old[f"{bn}.running_var"][perm])


def test_a_broken_clique_breaks_the_function():
    """Each side of a clique alone, or the class axis, changes the logits: the identity test can fail."""
    torch.manual_seed(0)
    net = NeuMetaHead((64,), 10, width=64).eval()
    x = torch.randn(64, 64)
    with torch.no_grad():
        ref = net(x)
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    hidden = next(c for c in net.cliques() if c.name == "hidden")
    producer = Clique("rows", 64, tuple(m for m in hidden.members if m.axis == 0))
    consumer = Clique("cols", 64, tuple(m for m in hidden.members if m.axis == 1))
    classes = Clique("classes", 10, (Member("fc2.weight", 0), Member("fc2.bias", 0)))
    for clique, order in ((producer, perm), (consumer, perm), (classes, torch.arange(10).roll(1))):
        broken = copy.deepcopy(net)
        permute_clique_(broken, clique, order)
        with torch.no_grad():
            assert (broken(x) - ref).abs().max() > 1e-2, clique.name
    whole = copy.deepcopy(net)
    permute_clique_(whole, hidden, perm)
    with torch.no_grad():
        assert (whole(x) - ref).abs().max() <= 1e-5


def test_fold_batchnorm_gives_the_bn_free_architecture():
    gen = torch.Generator().manual_seed(2)
    net = NeuMetaCNN((1, 12, 12), 10, width=4, batch_norm=True)
    randomise_bn_(net, gen)
    net.train()
    x = torch.randn(8, 1, 12, 12, generator=gen)
    with torch.no_grad():
        ref = net.eval()(x)
    net.train()
    assert fold_batchnorm_(net) == ["bn1", "bn2", "bn3"]
    assert net.training and not net.has_batchnorm and net.bn_pairs() == []
    assert net.state_dict().keys() == NeuMetaCNN((1, 12, 12), 10, width=4).state_dict().keys()
    with torch.no_grad():
        assert (net.eval()(x) - ref).abs().max() <= 1e-5
    assert fold_batchnorm_(net) == []  # nothing left to fold
    with pytest.raises(ValueError, match="fold BatchNorm"):  # bn1 has h entries: no other width before folding
        NeuMetaHead((64,), 10, width=16, batch_norm=True).resized(8)


# ---------------------------------------------------------------------------------------------------------------
# 4. total variation and the solver


def test_tensor_tv_follows_the_definition():
    assert tensor_tv(torch.tensor([1.0, 3.0, 2.0])) == 3  # |3-1| + |2-3|
    assert tensor_tv(torch.tensor([[1.0, 2.0], [4.0, 0.0]])) == 10  # rows: 3 + 2, columns: 1 + 4
    kernel = torch.arange(8.0).reshape(1, 2, 2, 2)  # one output channel, two input channels
    assert tensor_tv(kernel) == 16  # only across input channels, summed over the 4 kernel positions (4 each)
    assert tensor_tv(torch.arange(4.0).reshape(1, 1, 2, 2)) == 0  # nothing inside a kernel
    tensors = {"a": torch.tensor([1.0, 3.0, 2.0]), "b": torch.tensor([[1.0, 2.0], [4.0, 0.0]])}
    assert network_tv(tensors) == 6.5


def test_smoothing_lowers_tv_of_a_random_width_64_mlp():
    torch.manual_seed(0)
    net = NeuMetaHead((64,), 10, width=64)
    n_params = len(list(net.parameters()))
    hidden = next(c for c in net.cliques() if c.name == "hidden")
    # the clique's path cost in identity order is exactly the TV its member tensors have along its axes
    w1, w2 = net.fc1.weight.detach(), net.fc2.weight.detach()
    along = torch.diff(w1, dim=0).abs().sum() + tensor_tv(net.fc1.bias) + torch.diff(w2, dim=1).abs().sum()
    d = torch.cdist(clique_features(net, hidden)[None], clique_features(net, hidden)[None], p=1)[0]
    assert path_cost(d, range(64)) == pytest.approx(float(along), rel=1e-6)

    result = smooth_(net)
    assert result.tv_after < result.tv_before
    assert result.clique_tv_after["hidden"] <= 0.9 * result.clique_tv_before["hidden"]  # >= 10 % (here ~15 %)
    assert result.clique_tv_after["stem"] < result.clique_tv_before["stem"]
    drop = sum(result.clique_tv_before[k] - result.clique_tv_after[k] for k in result.permutations)
    assert result.tv_before - result.tv_after == pytest.approx(drop / n_params, rel=1e-6)
    assert network_tv(net) == pytest.approx(result.tv_after)


def test_solver_is_deterministic_and_solves_points_on_a_line():
    gen = torch.Generator().manual_seed(3)
    points = torch.rand(50, 1, generator=gen, dtype=torch.float64)
    order = shortest_open_path(points)
    assert sorted(order.tolist()) == list(range(50))
    line = points[order, 0]
    assert (line.diff() > 0).all() or (line.diff() < 0).all()  # the optimum: sorted, cost = max - min
    features = torch.randn(64, 75, generator=gen)
    order = shortest_open_path(features)
    assert torch.equal(order, shortest_open_path(features.clone()))
    # 2-opt local optimum of the *open* path: no segment reversal (prefixes and suffixes included) shortens it
    d = torch.cdist(features[None].double(), features[None].double(), p=1)[0]
    cost = path_cost(d, order)
    for i in range(64):
        for j in range(i + 1, 64):
            flipped = torch.cat([order[:i], order[i:j + 1].flip(0), order[j + 1:]])
            assert path_cost(d, flipped) >= cost - 1e-9, (i, j)
    torch.manual_seed(0)
    net = NeuMetaHead((64,), 10, width=48)
    twin = copy.deepcopy(net)
    a, b = smooth_(net), smooth_(twin)
    assert all(torch.equal(a.permutations[k], b.permutations[k]) for k in a.permutations)
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), twin.parameters()))


def test_clique_and_permutation_checks():
    net = NeuMetaHead((64,), 10, width=8)
    with pytest.raises(ValueError, match="expected 9 entries on axis 0"):
        check_cliques(net, [Clique("bad", 9, (Member("fc1.weight", 0),))])
    with pytest.raises(ValueError, match="must be a permutation"):
        permute_clique_(net, net.cliques()[1], torch.zeros(8, dtype=torch.long))
    for width in (0, 2.5, True):  # a layout's widths (the parser checks the constructors' width)
        with pytest.raises(ValueError, match="width must be a positive integer"):
            net.layout.tensors(width)


# --- resampling to another width (spec 9.4.1 warm-start targets, 9.5 "resample-only" baseline) -----------------


@pytest.mark.parametrize("kind", ["head", "res", "cnn"])
def test_resampling_is_the_identity_at_the_pretrained_width_and_has_the_layout_shapes(kind):
    torch.manual_seed(0)
    net = make_target(kind, WIDTH[kind])
    same = resample_to_width(net, WIDTH[kind])
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in same.items())
    for h in (WIDTH[kind] // 4, WIDTH[kind] // 2 + 1, WIDTH[kind] * 2):
        resampled = resample_to_width(net, h)
        assert {k: tuple(v.shape) for k, v in resampled.items()} == net.layout.tensors(h)
        x = torch.randn(3, *SHAPES[kind])
        assert functional_call(net.resized(h), resampled, (x,)).shape == (3, 10)


def test_resampling_interpolates_linearly_and_preserves_the_consumer_sum():
    torch.manual_seed(0)
    net = NeuMetaHead((64,), 10, width=32).eval()
    with torch.no_grad():
        # hidden units that vary linearly with their index o: w_o = a + o * b, producer and consumer side alike
        a, b = torch.randn(64), torch.randn(64) * 0.1
        net.fc1.weight.copy_(a + torch.arange(32.0)[:, None] * b)
        net.fc1.bias.fill_(0.5)
        net.fc2.weight.copy_(torch.randn(10, 1).expand(10, 32))
    r = resample_to_width(net, 12)
    pos = torch.arange(12.0) * 32 / 12  # source positions o * N / h, between the pretrained units
    torch.testing.assert_close(r["fc1.weight"], a + pos[:, None] * b)
    torch.testing.assert_close(r["fc2.weight"].sum(1), net.fc2.weight.sum(1))  # x N/h keeps the sum over inputs
    assert torch.equal(r["fc2.bias"], net.fc2.bias) and torch.equal(r["fc1.bias"], torch.full((12,), 0.5))


def test_a_width_uniform_network_computes_the_same_function_at_every_resampled_width():
    torch.manual_seed(0)
    net = NeuMetaHead((64,), 10, width=32).eval()
    with torch.no_grad():  # all hidden units identical: any width h with consumer x N/h is the same function
        net.fc1.weight.copy_(torch.randn(1, 64).expand(32, 64))
        net.fc1.bias.fill_(0.1)
        net.fc2.weight.copy_(torch.randn(10, 1).expand(10, 32))
    x = torch.randn(5, 64)
    with torch.no_grad():
        y = net(x)
        for h in (8, 20, 96):
            torch.testing.assert_close(functional_call(net.resized(h), resample_to_width(net, h), (x,)), y, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="fold BatchNorm"):
        resample_to_width(NeuMetaHead((64,), 10, width=8, batch_norm=True), 4)


def _shrinking_cliques(net, h: int) -> list[tuple[str, int, str]]:
    """(clique, size at h, producer weight) for the cliques whose size changes between net.width and h."""
    sizes = {c.name: c.size for c in net.layout.cliques(h)}
    state = net.state_dict()
    return [(c.name, sizes[c.name], next(m.name for m in c.members if m.axis == 0 and state[m.name].dim() >= 2))
            for c in net.layout.cliques(net.width) if sizes[c.name] != c.size]


@pytest.mark.parametrize("kind", ["head", "res", "cnn"])
def test_l1_pruning_keeps_the_largest_channels_and_equals_the_zeroed_wide_network(kind):
    torch.manual_seed(0)
    net = make_target(kind, WIDTH[kind]).eval()
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in l1_prune_to_width(net, WIDTH[kind]).items())
    h = WIDTH[kind] // 2
    pruned = l1_prune_to_width(net, h)
    assert {k: tuple(v.shape) for k, v in pruned.items()} == net.layout.tensors(h)
    zeroed = copy.deepcopy(net)
    cliques = {c.name: c for c in net.layout.cliques(net.width)}
    for name, size, producer in _shrinking_cliques(net, h):
        weight = net.state_dict()[producer]
        kept = weight.flatten(1).abs().sum(1).topk(size).indices.sort().values
        bias = producer.replace("weight", "bias")  # 1-D, so only this clique's cut applies
        torch.testing.assert_close(pruned[bias], net.state_dict()[bias][kept])  # the largest L1 rows, in order
        dead = torch.tensor(sorted(set(range(weight.shape[0])) - set(kept.tolist())))
        with torch.no_grad():  # switch the pruned channels off in the wide network
            for m in cliques[name].members:
                if m.axis == 0:
                    zeroed.get_parameter(m.name).index_fill_(0, dead, 0.0)
    x = torch.randn(4, *SHAPES[kind])
    with torch.no_grad():
        narrow = functional_call(net.resized(h), pruned, (x,))
        torch.testing.assert_close(narrow, zeroed(x), rtol=1e-5, atol=1e-5)
        assert (narrow - net(x)).abs().max() > 1e-3  # pruning changed the function
    with pytest.raises(ValueError, match="only narrow"):
        l1_prune_to_width(net, WIDTH[kind] * 2)
