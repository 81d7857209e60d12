"""NeuMeta INR invariants (spec shared/specs/neumeta.md §9.6, unit tests 1, 2, 5, 6): the coordinate tables, the
1/C_in output scaling and the noise quirks, functional forward = the release's two-stage gradient, the K-sample
merge and the width-aware warm start. Smoothing, resampling and pruning: tests/test_neumeta_smoothing.py."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call

from models.neumeta_inr import NeuMetaINR, coordinate_table, normalise_coordinates, relative_mse, warm_start_
from models.neumeta_smoothing import resample_to_width, smooth_
from models.neumeta_targets import NeuMetaCNN, NeuMetaHead, NeuMetaResidual

SHAPES = {"head": (64,), "res": (1, 8, 8), "cnn": (1, 12, 12)}
WIDTH = {"head": 64, "res": 64, "cnn": 8}
TARGETS = {"head": NeuMetaHead, "res": NeuMetaResidual, "cnn": NeuMetaCNN}


def make_target(kind: str, width: int, **kwargs) -> nn.Module:
    """The ``kind`` target on its test input shape with 10 classes."""
    return TARGETS[kind](SHAPES[kind], 10, width=width, **kwargs)


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


# ---------------------------------------------------------------------------------------------------------------
# 1. coordinate tables


@pytest.mark.parametrize("kind, width, norm", [("head", 24, 64), ("cnn", 6, 32)])
def test_coordinate_table_enumerates_every_weight(kind, width, norm):
    layout = make_target(kind, width).layout
    shapes = layout.tensors(width)
    table = coordinate_table(shapes)
    expected = sum(s[0] * (s[1] if len(s) > 1 else 1) for s in shapes.values())
    assert len(table.raw) == expected == table.offsets[-1]
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
    inr = small_inr(make_target(kind, width).layout, norm=norm)
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


def test_warm_start_fits_the_resampled_targets_at_every_training_width():
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
