"""Learning-rate schedules: cosine (with linear warm-up and floor), step, constant."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from conftest import training_spec

from cifar_ensembles.errors import UserError
from cifar_ensembles.schedules import build_scheduler

BASE_LR = 0.1


def scheduler_spec(**overrides):
    """config.yaml's scheduler section with `overrides`."""
    return training_spec(scheduler=overrides).scheduler


def make_opt(lr=BASE_LR):
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=lr, momentum=0.9)


def lrs(opt, sched, n_steps):
    """Learning rate used by each of n_steps optimizer steps, and the one after the last."""
    out = []
    for _ in range(n_steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    out.append(opt.param_groups[0]["lr"])
    return out


def cosine(t, total, hi, lo):
    return lo + (hi - lo) * (1 + math.cos(math.pi * t / total)) / 2


@pytest.mark.parametrize("min_lr", [0.0, 0.01])
def test_cosine_per_step_follows_formula_and_ends_at_floor(min_lr):
    epochs, spe = 3, 4
    opt = make_opt()
    spec = scheduler_spec(name="cosine", interval="step", min_lr=min_lr, warmup_epochs=0)
    sched = build_scheduler(opt, spec, epochs, spe)
    got = lrs(opt, sched, epochs * spe)
    expected = [cosine(t, epochs * spe, BASE_LR, min_lr) for t in range(epochs * spe + 1)]
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert got[-1] == pytest.approx(min_lr, abs=1e-12)


def test_cosine_per_epoch():
    opt = make_opt()
    sched = build_scheduler(opt, scheduler_spec(name="cosine", interval="epoch", min_lr=0.0, warmup_epochs=0),
                            5, 100)
    got = lrs(opt, sched, 5)
    assert got == pytest.approx([cosine(t, 5, BASE_LR, 0.0) for t in range(6)], abs=1e-12)


def test_cosine_with_linear_warmup():
    epochs, spe, warm, start = 4, 3, 1, 0.1
    opt = make_opt()
    spec = scheduler_spec(name="cosine", interval="step", warmup_epochs=warm, warmup_start=start,
                          min_lr=0.001)
    sched = build_scheduler(opt, spec, epochs, spe)
    got = lrs(opt, sched, epochs * spe)
    w, total = warm * spe, epochs * spe
    expected = [BASE_LR * (start + (1 - start) * t / w) for t in range(w)]
    expected += [cosine(t - w, total - w, BASE_LR, 0.001) for t in range(w, total + 1)]
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert got[0] == pytest.approx(BASE_LR * start)
    assert max(got) == pytest.approx(BASE_LR)
    assert got[-1] == pytest.approx(0.001)


def test_step_schedule_per_epoch():
    opt = make_opt()
    sched = build_scheduler(opt, scheduler_spec(name="step", step_size=2, gamma=0.5, interval="epoch"), 7, 50)
    got = lrs(opt, sched, 7)
    assert got == pytest.approx([BASE_LR * 0.5 ** (e // 2) for e in range(8)], rel=1e-12)


def test_step_schedule_per_step_counts_epochs_in_steps():
    spe = 3
    opt = make_opt()
    sched = build_scheduler(opt, scheduler_spec(name="step", step_size=2, gamma=0.1, interval="step"), 6, spe)
    got = lrs(opt, sched, 6 * spe)
    assert got == pytest.approx([BASE_LR * 0.1 ** (t // (2 * spe)) for t in range(6 * spe + 1)], rel=1e-9)


def test_constant():
    opt = make_opt()
    sched = build_scheduler(opt, scheduler_spec(name="constant", interval="step"), 2, 3)
    assert lrs(opt, sched, 6) == [BASE_LR] * 7


def test_returns_only_the_scheduler():
    """The caller steps it per `spec.interval`; build_scheduler no longer returns the interval."""
    sched = build_scheduler(make_opt(), scheduler_spec(name="cosine", interval="step"), 3, 4)
    assert isinstance(sched, torch.optim.lr_scheduler.LRScheduler)


@pytest.mark.parametrize("spec, field", [
    ({"name": "linear"}, "scheduler.name"),
    ({"name": "cosine", "interval": "batch"}, "scheduler.interval"),
    ({"name": "cosine", "min_lr": 0.5}, "scheduler.min_lr"),
])
def test_bad_specs_raise_user_error(spec, field):
    with pytest.raises(UserError, match=field):  # from the config check or from build_scheduler
        build_scheduler(make_opt(), scheduler_spec(**spec), 3, 4)


def test_unknown_name_in_an_unchecked_spec_is_a_user_error():
    spec = dataclasses.replace(scheduler_spec(name="cosine"), name="linear")
    with pytest.raises(UserError, match="scheduler.name"):
        build_scheduler(make_opt(), spec, 3, 4)
