"""What a training step dispatches, counted on the CPU (benchmarks/dispatch.py): no host sync
in any recipe's step, and SAM/ASAM/EMA launch a fixed number of kernels whatever the number
of parameters (foreach over all of them, not one per parameter)."""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import ROOT

sys.path.insert(0, str(ROOT))
from benchmarks.dispatch import RECIPES, OpCounter, count_step  # noqa: E402
from cifar_ensembles.ema import make_ema  # noqa: E402
from cifar_ensembles.optim import SAM  # noqa: E402


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_a_full_training_step_never_syncs_with_the_host(recipe):
    counter = count_step(recipe)
    assert counter.ops > 100  # the counter saw the forward and backward passes
    assert counter.syncs == 0, counter.counts.most_common(10)


def test_sam_and_ema_add_little_to_two_passes():
    """Two forward-backward passes cost 2 x SGD; SAM/ASAM and the EMA add a few foreach kernels."""
    sgd, sam, asam_ema = (count_step(r).ops for r in ("sgd", "sam", "asam_ema"))
    assert sam - 2 * sgd < 0.05 * sgd
    assert asam_ema - sam < 20


def mlp(layers: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(layers)])


def sam_ops(layers: int, adaptive: bool) -> tuple[int, int]:
    model = mlp(layers)
    opt = SAM(model.named_parameters(), torch.optim.SGD, rho=0.05, adaptive=adaptive,
              eta=0.01 if adaptive else None, adaptive_params="weights" if adaptive else None,
              lr=0.1, momentum=0.9, fused=True)
    for _ in range(2):  # the first step allocates the saved weights and the momentum buffers
        model(torch.randn(2, 4)).sum().backward()
        opt.step(lambda: model(torch.randn(2, 4)).sum().backward())
    model(torch.randn(2, 4)).sum().backward()
    first, second = OpCounter(), OpCounter()
    with first:
        opt.first_step(zero_grad=True)
    model(torch.randn(2, 4)).sum().backward()
    with second:
        opt.second_step()
    return first.ops, second.ops


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_steps_dispatch_the_same_ops_for_2_or_20_layers(adaptive):
    assert sam_ops(2, adaptive) == sam_ops(20, adaptive)


def test_ema_update_dispatches_the_same_ops_for_2_or_20_layers():
    counts = []
    for layers in (2, 20):
        model = torch.nn.Sequential(mlp(layers), torch.nn.BatchNorm1d(4))
        ema = make_ema(model, 0.9, 10)
        counter = OpCounter()
        with counter:
            ema.update_parameters(model)
        counts.append((counter.ops, counter.syncs))
    assert counts[0] == counts[1] and counts[0][1] == 0
