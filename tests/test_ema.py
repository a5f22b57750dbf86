"""Weight EMA: e <- d e + (1 - d) w for float parameters and buffers, integer buffers copied."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cifar_ensembles.ema import ema_decay, make_ema


def make_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))


def state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def set_weights(model, seed):
    """New float parameters and BatchNorm buffers, and a new num_batches_tracked."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
        bn = model[1]
        bn.running_mean.copy_(torch.randn(4, generator=g))
        bn.running_var.copy_(torch.rand(4, generator=g) + 0.5)
        bn.num_batches_tracked.fill_(int(torch.randint(1, 1000, (1,), generator=g)))


def test_starts_as_exact_independent_copy():
    model = make_model()
    set_weights(model, 1)
    ema = make_ema(model, 0.9, 0)
    w0, e0 = state(model), state(ema.module)
    assert w0.keys() == e0.keys()
    assert all(torch.equal(w0[k], e0[k]) for k in w0)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    assert torch.equal(ema.module[0].weight, w0["0.weight"])


@pytest.mark.parametrize("d", [0.9, 0.5, 0.0])
def test_update_averages_floats_and_copies_integers(d):
    model = make_model()
    set_weights(model, 1)
    ema = make_ema(model, d, 0)
    e = state(ema.module)
    for seed in (2, 3):
        set_weights(model, seed)
        w = state(model)
        ema.update_parameters(model)
        got = state(ema.module)
        for k in w:
            if k.endswith("num_batches_tracked"):
                assert got[k].dtype == torch.int64
                assert torch.equal(got[k], w[k]), k
            else:
                expected = d * e[k] + (1 - d) * w[k]
                torch.testing.assert_close(got[k], expected, rtol=1e-6, atol=1e-7, msg=k)
        assert any(k.endswith("running_mean") for k in w) and any(k.endswith("running_var") for k in w)
        e = got


def test_running_stats_from_training_forward_are_averaged():
    model = make_model().train()
    ema = make_ema(model, 0.8, 0)
    e0 = state(ema.module)
    model(torch.randn(16, 3) * 2 + 3)  # updates running stats and num_batches_tracked
    w1 = state(model)
    assert not torch.equal(w1["1.running_mean"], e0["1.running_mean"])
    ema.update_parameters(model)
    for key in ("running_mean", "running_var"):
        expected = 0.8 * e0[f"1.{key}"] + 0.2 * w1[f"1.{key}"]
        torch.testing.assert_close(getattr(ema.module[1], key), expected)
    assert int(ema.module[1].num_batches_tracked) == 1


def test_ema_decay_formula():
    assert ema_decay(0.999, 0, 5) == 0.999
    for n in (1, 2, 10, 1000):
        assert ema_decay(0.99, 10, n) == pytest.approx(0.99 * (1 - math.exp(-n / 10)))
    assert ema_decay(0.99, 10, 0) == 0.0


def test_warmup_uses_decay_of_update_count():
    d, warmup = 0.9, 4
    model = make_model()
    set_weights(model, 1)
    ema = make_ema(model, d, warmup)
    e = state(ema.module)["0.weight"]
    for n, seed in enumerate((2, 3, 4), start=1):
        set_weights(model, seed)
        w = model[0].weight.detach().clone()
        ema.update_parameters(model)
        dn = d * (1 - math.exp(-n / warmup))
        e = dn * e + (1 - dn) * w
        torch.testing.assert_close(ema.module[0].weight, e, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("decay", [1.0, -0.1, 1.5])
def test_decay_out_of_range_raises(decay):
    with pytest.raises(ValueError):
        make_ema(make_model(), decay, 0)
