"""SAM / ASAM, frozen BatchNorm statistics and build_optimizer, checked against docs/study.md's formulas.

Expectations are computed here from the formulas on small float64 models:
SAM:  eps = rho * g / (||g|| + 1e-12)
ASAM: T = |w| + eta, eps = rho * T^2 g / (||T g|| + 1e-12), ||T^-1 eps|| = rho
with ||.|| one global L2 norm over every parameter that has a gradient.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from conftest import training_spec
from torch import nn

from cifar_ensembles.errors import UserError
from cifar_ensembles.optim import SAM, build_optimizer, frozen_bn_stats

RHO = 0.05
ASAM_ARGS = dict(eta=0.01, adaptive_params="weights")  # the official ASAM code's T = |w| + 0.01 on weights


def asam_args(adaptive: bool) -> dict:
    """ASAM's required eta and adaptive_params when `adaptive`, nothing for plain SAM."""
    return ASAM_ARGS if adaptive else {}


def optimizer_spec(**overrides):
    """config.yaml's optimizer section with `overrides`."""
    return training_spec(optimizer=overrides).optimizer


class Tiny(nn.Module):
    """Two linear layers (weights and biases) plus one parameter that never gets a gradient."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(3, 4)
        self.fc2 = nn.Linear(4, 2)
        self.unused = nn.Parameter(torch.ones(2))

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def make_model(seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    model = Tiny().double()
    with torch.no_grad():  # biases far from zero so that T = |w| + eta differs from 1 on them too
        model.fc1.bias.copy_(torch.tensor([0.7, -1.3, 2.0, -0.4], dtype=torch.float64))
        model.fc2.bias.copy_(torch.tensor([-1.5, 0.9], dtype=torch.float64))
    return model


def data(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(5, 3, generator=g, dtype=torch.float64)
    y = torch.randn(5, 2, generator=g, dtype=torch.float64)
    return x, y


def loss_fn(model, x, y):
    return ((model(x) - y) ** 2).mean()


def backward(model, x, y):
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model, x, y)
    loss.backward()
    return loss


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def global_norm(tensors) -> torch.Tensor:
    return torch.sqrt(sum((t.double() ** 2).sum() for t in tensors))


# ----------------------------------------------------------------------------- SAM perturbation


def test_sam_first_step_is_rho_times_normalized_global_gradient():
    model = make_model()
    x, y = data()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=0.1)
    backward(model, x, y)
    w0, g = snapshot(model), grads(model)
    assert "unused" not in g  # a parameter without a gradient

    opt.first_step()

    norm = global_norm(g.values())
    w1 = snapshot(model)
    for name in g:
        expected = RHO * g[name] / (norm + 1e-12)
        torch.testing.assert_close(w1[name] - w0[name], expected, rtol=1e-10, atol=1e-14)
    assert torch.equal(w1["unused"], w0["unused"])
    eps_norm = global_norm([w1[n] - w0[n] for n in g])
    assert eps_norm.item() == pytest.approx(RHO, rel=1e-9)


def test_sam_norm_is_global_not_per_parameter():
    model = make_model()
    x, y = data()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=0.1)
    backward(model, x, y)
    w0 = snapshot(model)
    opt.first_step()
    w1 = snapshot(model)
    per_param = [torch.linalg.vector_norm(w1[n] - w0[n]).item() for n in ("fc1.weight", "fc1.bias")]
    # a per-parameter normalisation would make every one of these equal to rho
    assert all(v < RHO * (1 - 1e-6) for v in per_param)


def _asam_expected(model, g, w0, rho, eta, scaled_names):
    t = {n: (w0[n].abs() + eta) if n in scaled_names else torch.ones_like(w0[n]) for n in g}
    norm = global_norm([t[n] * g[n] for n in g])
    return {n: rho * t[n] ** 2 * g[n] / (norm + 1e-12) for n in g}, t


@pytest.mark.parametrize("adaptive_params, named", [("weights", True), ("all", True), ("all", False)])
def test_asam_first_step_matches_formula(adaptive_params, named):
    rho, eta = 0.5, 0.01
    model = make_model()
    x, y = data()
    params = model.named_parameters() if named else model.parameters()
    opt = SAM(params, torch.optim.SGD, rho=rho, adaptive=True, eta=eta,
              adaptive_params=adaptive_params, lr=0.1)
    backward(model, x, y)
    w0, g = snapshot(model), grads(model)

    opt.first_step()

    w1 = snapshot(model)
    if adaptive_params == "weights":
        scaled = {n for n in g if "weight" in n}
        assert scaled == {"fc1.weight", "fc2.weight"}
    else:
        scaled = set(g)
    expected, t = _asam_expected(model, g, w0, rho, eta, scaled)
    for n in g:
        torch.testing.assert_close(w1[n] - w0[n], expected[n], rtol=1e-10, atol=1e-14)
    # ||T^-1 eps|| == rho
    scaled_eps_norm = global_norm([(w1[n] - w0[n]) / t[n] for n in g])
    assert scaled_eps_norm.item() == pytest.approx(rho, rel=1e-9)
    assert torch.equal(w1["unused"], w0["unused"])


def test_asam_weights_and_all_differ_on_biases_only_through_T():
    """'weights' leaves biases unscaled (T = 1) but they still share the one norm with the weights."""
    rho, eta = 0.5, 0.01
    steps = {}
    for mode in ("weights", "all"):
        model = make_model()
        x, y = data()
        opt = SAM(model.named_parameters(), torch.optim.SGD, rho=rho, adaptive=True, eta=eta,
                  adaptive_params=mode, lr=0.1)
        backward(model, x, y)
        w0, g = snapshot(model), grads(model)
        opt.first_step()
        steps[mode] = {n: model.get_parameter(n).detach() - w0[n] for n in g}
    g_fc1_bias = g["fc1.bias"]
    # with 'weights' the bias step is parallel to g (T = 1), with 'all' it is not
    ratio_w = steps["weights"]["fc1.bias"] / g_fc1_bias
    ratio_a = steps["all"]["fc1.bias"] / g_fc1_bias
    torch.testing.assert_close(ratio_w, ratio_w[0].expand_as(ratio_w))
    assert not torch.allclose(ratio_a, ratio_a[0].expand_as(ratio_a))
    # shared norm: the unscaled bias step uses the norm of the *whole* T g, not of g_bias alone
    assert ratio_w[0].item() < rho / torch.linalg.vector_norm(g_fc1_bias).item()


def test_asam_weights_mode_needs_names():
    model = make_model()
    with pytest.raises(ValueError, match="named_parameters"):
        SAM(model.parameters(), torch.optim.SGD, rho=0.5, adaptive=True, eta=0.01, adaptive_params="weights",
            lr=0.1)
    # plain SAM and ASAM over all parameters do not need names
    SAM(make_model().parameters(), torch.optim.SGD, rho=0.5, lr=0.1)
    SAM(make_model().parameters(), torch.optim.SGD, rho=0.5, adaptive=True, eta=0.01, adaptive_params="all",
        lr=0.1)


@pytest.mark.parametrize("kwargs", [dict(rho=-0.1), dict(eta=-1.0), dict(adaptive_params="bias"),
                                    dict(adaptive=True, eta=-1.0, adaptive_params="weights"),
                                    dict(adaptive=True, adaptive_params="bias", eta=0.01)])
def test_sam_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        SAM(make_model().named_parameters(), torch.optim.SGD, lr=0.1, **{"rho": RHO, **kwargs})


@pytest.mark.parametrize("missing", ["eta", "adaptive_params"])
def test_asam_needs_eta_and_adaptive_params(missing):
    """No default stands for a config value: ASAM without eta or adaptive_params is refused."""
    kwargs = {k: v for k, v in ASAM_ARGS.items() if k != missing}
    with pytest.raises(ValueError, match="eta and adaptive_params"):
        SAM(make_model().named_parameters(), torch.optim.SGD, rho=0.5, adaptive=True, lr=0.1, **kwargs)


def test_rho_is_keyword_only_and_required():
    params = list(make_model().parameters())
    with pytest.raises(TypeError):
        SAM(params, torch.optim.SGD, 0.05, lr=0.1)
    with pytest.raises(TypeError):
        SAM(params, torch.optim.SGD, lr=0.1)


# ----------------------------------------------------------------------------- second step


@pytest.mark.parametrize("adaptive", [False, True])
def test_second_step_restores_w_and_steps_with_perturbed_gradient(adaptive):
    lr, momentum, wd = 0.1, 0.9, 5e-4
    model = make_model()
    ref = copy.deepcopy(model)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=lr, momentum=momentum, weight_decay=wd)
    opt = SAM(model.named_parameters(), torch.optim.SGD, rho=0.5, adaptive=adaptive, **asam_args(adaptive),
              lr=lr, momentum=momentum, weight_decay=wd)

    seen_at_base_step = []
    base_step = opt.base_optimizer.step

    def recording_step(*args, **kwargs):
        seen_at_base_step.append(snapshot(model))
        return base_step(*args, **kwargs)

    opt.base_optimizer.step = recording_step

    for it in range(3):  # several iterations so that the momentum buffer matters too
        x, y = data(seed=10 + it)
        backward(model, x, y)
        w0 = snapshot(model)
        opt.first_step(zero_grad=True)
        assert all(p.grad is None or not p.grad.any() for p in model.parameters())
        assert any(not torch.equal(w0[n], p) for n, p in model.named_parameters())
        backward(model, x, y)
        g_perturbed = grads(model)
        opt.second_step(zero_grad=True)

        # weights were exactly w (bitwise) when the base optimizer stepped
        restored = seen_at_base_step[-1]
        assert all(torch.equal(restored[n], w0[n]) for n in w0)

        # reference: plain SGD from w with the gradient taken at w + eps
        for n, p in ref.named_parameters():
            assert torch.equal(p.detach(), w0[n])
            p.grad = g_perturbed.get(n)
        ref_opt.step()
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.detach(), ref.get_parameter(n).detach(), rtol=0, atol=0)
        assert torch.equal(model.unused, w0["unused"])


def test_weight_decay_is_applied_at_w_with_perturbed_gradient():
    lr, wd = 0.2, 0.01
    model = make_model()
    x, y = data()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.3, lr=lr, weight_decay=wd)
    backward(model, x, y)
    w0 = snapshot(model)
    opt.first_step(zero_grad=True)
    w_pert = snapshot(model)
    backward(model, x, y)
    g_p = grads(model)
    opt.second_step()
    for n, p in model.named_parameters():
        if n not in g_p:
            continue
        expected = w0[n] - lr * (g_p[n] + wd * w0[n])
        torch.testing.assert_close(p.detach(), expected, rtol=1e-12, atol=1e-14)
        # decaying at the perturbed point instead would give a different result
        wrong = w0[n] - lr * (g_p[n] + wd * w_pert[n])
        assert not torch.allclose(p.detach(), wrong, rtol=0, atol=1e-15)


def test_step_with_closure_equals_first_and_second_step():
    x, y = data()
    results = []
    for use_closure in (True, False):
        model = make_model()
        opt = SAM(model.named_parameters(), torch.optim.SGD, rho=0.5, adaptive=True, **ASAM_ARGS, lr=0.1,
                  momentum=0.9)
        for _ in range(2):
            backward(model, x, y)
            if use_closure:
                opt.step(lambda m=model: backward(m, x, y))
            else:
                opt.first_step(zero_grad=True)
                backward(model, x, y)
                opt.second_step()
        results.append(snapshot(model))
    assert all(torch.equal(results[0][n], results[1][n]) for n in results[0])


def test_step_without_closure_raises():
    model = make_model()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    backward(model, *data())
    with pytest.raises(ValueError):
        opt.step()


@pytest.mark.parametrize("base, kwargs", [
    (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=5e-4)),
    (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)),
    (torch.optim.Adam, dict(lr=1e-2, weight_decay=1e-3)),
])
@pytest.mark.parametrize("adaptive", [False, True])
def test_rho_zero_is_exactly_the_base_step(base, kwargs, adaptive):
    sam_model, plain_model = make_model(), make_model()
    sam = SAM(sam_model.named_parameters(), base, rho=0.0, adaptive=adaptive, **asam_args(adaptive), **kwargs)
    plain = base(plain_model.parameters(), **kwargs)
    for it in range(3):
        x, y = data(seed=20 + it)
        backward(sam_model, x, y)
        sam.step(lambda x=x, y=y: backward(sam_model, x, y))
        backward(plain_model, x, y)
        plain.step()
        for n, p in sam_model.named_parameters():
            assert torch.equal(p.detach(), plain_model.get_parameter(n).detach()), (it, n)


@pytest.mark.parametrize("adaptive", [False, True])
def test_zero_gradient_gives_no_nan(adaptive):
    model = make_model()
    opt = SAM(model.named_parameters(), torch.optim.SGD, rho=0.5, adaptive=adaptive, **asam_args(adaptive),
              lr=0.1, momentum=0.9)
    w0 = snapshot(model)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.first_step()
    for n, p in model.named_parameters():
        assert torch.isfinite(p).all()
        assert torch.equal(p.detach(), w0[n])
    opt.second_step()
    for n, p in model.named_parameters():
        assert torch.isfinite(p).all()
        assert torch.equal(p.detach(), w0[n])


@pytest.mark.parametrize("name", ["sgd", "sam", "asam"])
def test_state_dict_round_trip_resumes_exactly(name):
    """A checkpoint taken between two steps must let a fresh optimizer continue identically.

    For SAM/ASAM that needs the base optimizer's state (momentum buffers); the trainer's
    checkpoint saves `optimizer.state_dict()`.
    """
    spec = optimizer_spec(name=name, lr=0.1, momentum=0.9, weight_decay=5e-4, rho=0.05)
    x1, y1 = data(seed=31)
    x2, y2 = data(seed=32)

    def one_step(model, opt, x, y):
        backward(model, x, y)
        if isinstance(opt, SAM):
            opt.step(lambda: backward(model, x, y))
        else:
            opt.step()

    model = make_model()
    opt = build_optimizer(model, spec)
    one_step(model, opt, x1, y1)
    ckpt_model = copy.deepcopy(model.state_dict())
    ckpt_opt = copy.deepcopy(opt.state_dict())
    one_step(model, opt, x2, y2)

    resumed = make_model(seed=99)
    resumed.load_state_dict(ckpt_model)
    resumed_opt = build_optimizer(resumed, spec)
    resumed_opt.load_state_dict(ckpt_opt)
    one_step(resumed, resumed_opt, x2, y2)

    for n, p in model.named_parameters():
        torch.testing.assert_close(resumed.get_parameter(n).detach(), p.detach(), rtol=0, atol=0,
                                   msg=f"{name}: parameter {n} differs after resuming")


# ----------------------------------------------------------------------------- frozen BN stats


def bn_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2),
                         nn.BatchNorm1d(2))


def bn_buffers(model):
    return {n: b.detach().clone() for n, b in model.named_buffers()}


def test_frozen_bn_stats_leaves_running_buffers_untouched():
    model = bn_model().train()
    x = torch.randn(4, 2, 6, 6) * 3 + 1
    model(x)  # materialise the lazy layer and move the running stats away from their init
    before = bn_buffers(model)
    assert {n.rsplit(".", 1)[1] for n in before} == {"running_mean", "running_var", "num_batches_tracked"}

    with frozen_bn_stats(model):
        assert model.training
        out_frozen = model(x)
    after = bn_buffers(model)
    assert all(torch.equal(before[n], after[n]) for n in before)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert all(m.track_running_stats for m in bns)

    out_free = model(x)  # outside: batch statistics again, and the buffers move
    torch.testing.assert_close(out_frozen, out_free)  # both passes normalise with batch statistics
    updated = bn_buffers(model)
    for n in before:
        assert not torch.equal(before[n], updated[n]), n


def test_frozen_bn_stats_restores_flag_on_error_and_keeps_untracked_layers():
    model = nn.Sequential(nn.BatchNorm1d(3), nn.BatchNorm1d(3, track_running_stats=False)).train()
    with pytest.raises(RuntimeError), frozen_bn_stats(model):
        assert not model[0].track_running_stats
        raise RuntimeError("boom")
    assert model[0].track_running_stats is True
    assert model[1].track_running_stats is False


def test_frozen_bn_stats_eval_mode_still_uses_running_stats():
    bn = nn.BatchNorm1d(3)
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([1.0, -2.0, 0.5]))
        bn.running_var.copy_(torch.tensor([4.0, 0.25, 1.0]))
    bn.eval()
    x = torch.randn(5, 3)
    expected = (x - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps)
    with frozen_bn_stats(bn):
        out = bn(x)
    torch.testing.assert_close(out, expected.detach())


# ----------------------------------------------------------------------------- build_optimizer


def test_build_optimizer_types_and_settings():
    model = make_model()
    sgd = build_optimizer(model, optimizer_spec(name="sgd", lr=0.1, momentum=0.8, weight_decay=1e-4,
                                                nesterov=True))
    assert type(sgd) is torch.optim.SGD
    g = sgd.param_groups[0]
    assert (g["lr"], g["momentum"], g["weight_decay"], g["nesterov"]) == (0.1, 0.8, 1e-4, True)

    adam = build_optimizer(model, optimizer_spec(name="adam", lr=1e-4, betas=[0.8, 0.99]))
    assert type(adam) is torch.optim.Adam
    assert adam.param_groups[0]["betas"] == (0.8, 0.99)
    assert adam.param_groups[0]["lr"] == 1e-4

    sam = build_optimizer(model, optimizer_spec(name="sam", lr=0.1, rho=0.1))
    assert isinstance(sam, SAM) and type(sam.base_optimizer) is torch.optim.SGD
    assert sam.param_groups[0]["adaptive"] is False and sam.param_groups[0]["rho"] == 0.1

    asam = build_optimizer(model, optimizer_spec(name="asam", lr=1e-4, base="adam", rho=0.5, eta=0.02,
                                                 adaptive_params="all"))
    assert isinstance(asam, SAM) and type(asam.base_optimizer) is torch.optim.Adam
    g = asam.param_groups[0]
    assert g["adaptive"] is True and g["rho"] == 0.5 and g["eta"] == 0.02
    assert g["adaptive_params"] == "all"
    # config.yaml's ASAM scales the weights only (the official code)
    assert build_optimizer(model, optimizer_spec(name="asam")).param_groups[0]["adaptive_params"] == "weights"
    # every parameter is handed over
    n_params = len(list(model.parameters()))
    for opt in (sgd, adam, sam, asam):
        assert sum(len(gr["params"]) for gr in opt.param_groups) == n_params


@pytest.mark.parametrize("overrides, field", [
    (dict(name="lion"), "optimizer.name"),
    (dict(name="sam", base="rmsprop"), "optimizer.base"),
])
def test_build_optimizer_unknown_names(overrides, field):
    # the config check names the field ...
    with pytest.raises(UserError, match=field):
        optimizer_spec(**overrides)
    # ... and so does build_optimizer for a spec made without it
    spec = dataclasses.replace(optimizer_spec(name="sam"), **overrides)
    with pytest.raises(UserError, match=field):
        build_optimizer(make_model(), spec)
