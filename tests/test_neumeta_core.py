"""NeuMeta core invariants (spec shared/specs/neumeta.md §9.6, unit tests 1-6): the coordinate tables, the 1/C_in
output scaling, function-preserving smoothing (and that a wrong clique breaks it), TV decrease with a
deterministic solver, functional forward = the release's two-stage gradient, and the K-sample merge."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm

from models.neumeta_inr import NeuMetaINR, coordinate_table, normalise_coordinates
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
from models.neumeta_targets import Clique, Member, NeuMetaCNN, NeuMetaHead, build_target

SHAPES = {"head": (64,), "res": (1, 8, 8), "cnn": (1, 12, 12)}
WIDTH = {"head": 64, "res": 64, "cnn": 8}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are tiny: with a second intra-op thread on a busy 2-core box, OpenMP waits turn 1 ms INR
    calls into 250 ms ones (measured), so run single-threaded and restore the setting afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_inr(layout, norm: int, **kwargs) -> NeuMetaINR:
    return NeuMetaINR(layout, norm=norm, hidden=32, layers=3, num_freqs=4, **kwargs)


class Constant(nn.Module):
    """Stands in for one INR MLP: returns the same output vector for every query."""

    def __init__(self, values: Tensor) -> None:
        super().__init__()
        self.register_buffer("values", values.float())

    def forward(self, x: Tensor) -> Tensor:
        return self.values.expand(len(x), -1)


def constant_mlps_(inr: NeuMetaINR, vectors: list[Tensor]) -> NeuMetaINR:
    for t, v in enumerate(vectors):
        inr.mlps[t] = Constant(v)
    return inr


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
# 1. coordinate tables


@pytest.mark.parametrize("kind, width, norm", [("head", 24, 64), ("cnn", 6, 32)])
def test_coordinate_table_enumerates_every_weight(kind, width, norm):
    layout = build_target(kind, SHAPES[kind], 10, width).layout
    shapes = layout.tensors(width)
    table = coordinate_table(shapes)
    expected = sum(s[0] * (s[1] if len(s) > 1 else 1) for s in shapes.values())
    assert table.num_queries == expected == table.offsets[-1]
    assert len(torch.unique(table.raw, dim=0)) == expected  # every query distinct
    x = normalise_coordinates(table.raw, norm)
    T = len(shapes)
    assert ((x[:, :3] >= 0) & (x[:, :3] < 1)).all()
    for t, (name, shape) in enumerate(shapes.items()):
        raw, xt = table.raw[table.offsets[t]:table.offsets[t + 1]], x[table.offsets[t]:table.offsets[t + 1]]
        c_out, c_in = shape[0], shape[1] if len(shape) > 1 else 1
        o, c = torch.meshgrid(torch.arange(c_out), torch.arange(c_in), indexing="ij")
        assert torch.equal(raw[:, 0], torch.full((len(raw),), float(t)))
        assert torch.equal(raw[:, 1:3], torch.stack([o.reshape(-1), c.reshape(-1)], 1).float())
        assert torch.equal(raw[:, 3:], torch.tensor([[T, c_out, c_in]] * len(raw), dtype=torch.float))
        assert torch.allclose(xt[:, 3:], torch.tensor([T / norm, c_out / norm, c_in / norm]).expand_as(xt[:, 3:]))
        assert torch.allclose(xt[:, 0], torch.full_like(xt[:, 0], t / T))
    if kind == "head":  # fc2.weight (t = 2) entry (o = 3, c = 5) at h = 24
        row = table.offsets[2] + 3 * 24 + 5
        torch.testing.assert_close(x[row], torch.tensor([2 / 4, 3 / 10, 5 / 24, 4 / 64, 10 / 64, 24 / 64]))


def test_conv_queries_use_the_middle_of_the_output_vector():
    net = NeuMetaCNN((1, 12, 12), 10, width=4)
    inr = small_inr(net.layout, norm=32)
    assert inr.output_dim == 25  # the largest kernel is 5x5
    code = torch.arange(1.0, 26.0)  # output entry i holds i + 1
    constant_mlps_(inr, [code] * inr.num_tensors)
    p = inr.generate(4)
    # 3x3 from a 25-vector: entries 8..16 (start 25 // 2 - 9 // 2), divided by C_in = 1
    torch.testing.assert_close(p["conv1.weight"], (code[8:17] / 1).reshape(3, 3).expand(4, 1, 3, 3))
    torch.testing.assert_close(p["conv2.weight"], (code / 4).reshape(5, 5).expand(8, 4, 5, 5))
    torch.testing.assert_close(p["fc.weight"], torch.full((10, 16), 1 / 16))  # entry 0 for linear weights
    torch.testing.assert_close(p["conv3.bias"], torch.ones(16))
    code = torch.arange(1.0, 32.0)  # output_dim 31: a 5x5 kernel starts at 15 - 12 = 3
    wide = constant_mlps_(small_inr(net.layout, norm=32, output_dim=31), [code] * 8)
    torch.testing.assert_close(wide.generate(4)["conv2.weight"][0, 0], (code[3:28] / 4).reshape(5, 5))


# ---------------------------------------------------------------------------------------------------------------
# 2. output scaling and the noise quirks


@pytest.mark.parametrize("kind, width, norm", [("head", 40, 64), ("res", 17, 64), ("cnn", 6, 32)])
def test_constant_inr_generates_one_over_c_in(kind, width, norm):
    inr = small_inr(build_target(kind, SHAPES[kind], 10, width).layout, norm=norm)
    constant_mlps_(inr, [torch.ones(inr.output_dim)] * inr.num_tensors)
    for sigma in (0.0, 1.0):  # index noise must not touch the divisor by default
        for name, w in inr.generate(width, sigma, torch.Generator().manual_seed(0)).items():
            c_in = w.shape[1] if w.dim() > 1 else 1
            assert torch.equal(w, torch.full_like(w, 1.0 / c_in)), name
    noisy = small_inr(inr.layout, norm=norm, noise_sizes=True)
    constant_mlps_(noisy, [torch.ones(inr.output_dim)] * inr.num_tensors)
    bias = noisy.generate(width, 1.0, torch.Generator().manual_seed(0))[next(n for n in inr.names if "bias" in n)]
    assert (bias > 1 / 1.5).all() and (bias < 1 / 0.5).all() and bias.std() > 0.05  # release: divisor U(0.5, 1.5)


def test_faithful_routing_sends_half_of_tensor_t_to_mlp_t_minus_1():
    layout = NeuMetaHead((64,), 10, width=64).layout
    for faithful in (False, True):
        inr = small_inr(layout, norm=64, faithful_routing=faithful)
        constant_mlps_(inr, [torch.full((1,), t + 1.0) for t in range(4)])  # MLP t answers t + 1
        p = inr.generate(64, 1.0, torch.Generator().manual_seed(0))
        for t, (name, w) in enumerate(p.items()):
            mlp = (w * (w.shape[1] if w.dim() > 1 else 1)).round() - 1  # which MLP answered each query
            if not faithful or t == 0:
                assert (mlp == t).all(), (faithful, name)
            else:
                assert set(mlp.unique().tolist()) == {t - 1, t}
                assert 0.35 < (mlp == t - 1).float().mean() < 0.65


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
    net = build_target(kind, SHAPES[kind], 10, WIDTH[kind], batch_norm=batch_norm)
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
    with pytest.raises(ValueError, match="not a BatchNorm"):
        fold_batchnorm_(net, [("conv1", "bn1")])
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
    assert network_tv(tensors) == 6.5 and network_tv(tensors, "sum") == 13
    with pytest.raises(ValueError, match="reduction must be one of"):
        network_tv(tensors, "max")


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
    with pytest.raises(ValueError, match="target kind must be one of"):
        build_target("vgg", (64,), 10, 8)
    with pytest.raises(ValueError, match="width must be a positive integer"):
        NeuMetaHead((64,), 10, width=0)


# ---------------------------------------------------------------------------------------------------------------
# 5. functional forward = the release's two-stage gradient


@pytest.mark.parametrize("faithful_routing", [False, True])
def test_functional_call_gradient_equals_two_stage_gradient(faithful_routing):
    torch.manual_seed(0)
    full = NeuMetaHead((64,), 10, width=64)
    smooth_(full)
    template = full.resized(40)  # the smoothed stem, fc1/fc2 at width 40 (their values are generated)
    assert torch.equal(template.stem.weight, full.stem.weight) and template.fc1.weight.shape == (40, 64)
    inr = small_inr(template.layout, norm=64, faithful_routing=faithful_routing)
    x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))

    def regulariser(params):
        return 1e-4 * sum(p.norm() for p in params.values())  # the paper's sum of Frobenius norms

    # one stage: generated tensors go straight into the target through functional_call, one backward
    params = inr.generate(40, 1.0, torch.Generator().manual_seed(5))
    logits = functional_call(template, params, (x,))
    (nn.functional.cross_entropy(logits, y) + regulariser(params)).backward()
    one = [p.grad.clone() for p in inr.parameters()]
    inr.zero_grad()

    # two stages (release): write the values into the module's parameters, back-prop the task loss to them,
    # then push those gradients into the INR with a second autograd call
    params = inr.generate(40, 1.0, torch.Generator().manual_seed(5))
    assigned = copy.deepcopy(template)
    with torch.no_grad():
        for name, value in params.items():
            assigned.get_parameter(name).copy_(value)
    loss = nn.functional.cross_entropy(assigned(x), y)
    loss.backward()
    target_grads = [assigned.get_parameter(n).grad for n in params]
    torch.autograd.backward([*params.values(), regulariser(params)], [*target_grads, torch.ones(())])
    two = [p.grad.clone() for p in inr.parameters()]

    with torch.no_grad():
        torch.testing.assert_close(assigned(x), logits, atol=1e-6, rtol=0)
        assert (template(x) - logits).abs().max() > 1e-3  # the generated tensors were really used
    assert all(g.abs().sum() > 0 for g in one)  # every INR parameter is reached (no detached path)
    for g1, g2 in zip(one, two):
        torch.testing.assert_close(g1, g2, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# 6. K-sample merge


def test_merge_with_zero_noise_is_the_clean_sample():
    torch.manual_seed(0)
    inr = small_inr(NeuMetaCNN((1, 12, 12), 10, width=6).layout, norm=32)
    with torch.no_grad():
        clean = inr.generate(6)
        for samples in (1, 3, 7):
            merged = inr.merge(6, samples, sigma=0.0)
            assert all(torch.equal(merged[k], clean[k]) for k in clean)
        assert all(torch.equal(v, clean[k]) for k, v in inr.merge(6, 1, 1.0).items())  # sample 0 is clean
        merged = inr.merge(6, 4, 1.0, torch.Generator().manual_seed(9))
        gen = torch.Generator().manual_seed(9)
        draws = [clean] + [inr.generate(6, 1.0, gen) for _ in range(3)]
        for k in clean:
            torch.testing.assert_close(merged[k], torch.stack([d[k] for d in draws]).mean(0), atol=1e-6, rtol=1e-5)
        assert max((merged[k] - clean[k]).abs().max() for k in clean) > 1e-4
    with pytest.raises(ValueError, match="samples must be >= 1"):
        inr.merge(6, 0, 1.0)


# --- resampling to another width (spec 9.4.1 warm-start targets, 9.5 "resample-only" baseline) -----------------


@pytest.mark.parametrize("kind", ["head", "res", "cnn"])
def test_resampling_is_the_identity_at_the_pretrained_width_and_has_the_layout_shapes(kind):
    torch.manual_seed(0)
    net = build_target(kind, SHAPES[kind], 10, WIDTH[kind])
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
    from models.neumeta_baselines import l1_prune_to_width

    torch.manual_seed(0)
    net = build_target(kind, SHAPES[kind], 10, WIDTH[kind]).eval()
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


def test_warm_start_fits_the_resampled_targets_at_every_training_width():
    from models.neumeta_inr import relative_mse, warm_start_

    torch.manual_seed(0)
    net = NeuMetaHead((64,), 10, width=16).eval()
    smooth_(net)
    cache: dict[int, dict[str, Tensor]] = {}

    def targets(h: int) -> dict[str, Tensor]:
        return cache.setdefault(h, resample_to_width(net, h))

    inr = small_inr(net.layout, norm=16)
    widths = [8, 12, 16]
    with torch.no_grad():
        before = {h: float(relative_mse(inr.generate(h), targets(h))) for h in widths}
    losses = warm_start_(inr, targets, widths, steps=300, lr=3e-3, sigma=0.0)
    with torch.no_grad():
        after = {h: float(relative_mse(inr.generate(h), targets(h))) for h in widths}
    assert len(losses) == 300 and all(after[h] < 0.5 * before[h] for h in widths), (before, after)
    assert sum(losses[-50:]) < 0.5 * sum(losses[:50])
    with pytest.raises(ValueError, match="steps"):
        warm_start_(inr, targets, widths, steps=0)
