"""Single-label Asymmetric Loss against docs/study.md's formula, computed independently in numpy.

p = softmax(z), k the target, C classes, q = (1 - eps) onehot(k) + eps / C,
w_k = (1 - p_k)^gamma_pos, w_j = p_j^gamma_neg (j != k), loss = -sum_c q_c w_c log p_c.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import training_spec
from torch import nn

from cifar_ensembles.errors import UserError
from cifar_ensembles.losses import AsymmetricLossSingleLabel, build_loss


def reference_asl(logits: np.ndarray, target: np.ndarray, gamma_pos, gamma_neg, eps) -> np.ndarray:
    """Per-sample loss by explicit loops in float64."""
    n, c = logits.shape
    out = np.zeros(n)
    for i in range(n):
        z = logits[i].astype(np.float64)
        m = max(z)
        denom = sum(math.exp(v - m) for v in z)
        total = 0.0
        for j in range(c):
            log_p = (z[j] - m) - math.log(denom)
            p = math.exp(log_p)
            if j == target[i]:
                q, w = (1 - eps) + eps / c, (1 - p) ** gamma_pos
            else:
                q, w = eps / c, p ** gamma_neg
            total -= q * w * log_p
        out[i] = total
    return out


def sample(n=6, c=5, seed=0, scale=2.0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, scale, (n, c))
    target = rng.integers(0, c, n)
    return logits, target


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_zero_gammas_equal_label_smoothed_cross_entropy(eps):
    logits, target = sample()
    z, t = torch.tensor(logits), torch.tensor(target)
    loss = AsymmetricLossSingleLabel(gamma_pos=0.0, gamma_neg=0.0, eps=eps)(z, t)
    expected = F.cross_entropy(z, t, label_smoothing=eps)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("gamma_pos, gamma_neg, eps", [(1.0, 4.0, 0.1), (0.0, 4.0, 0.1), (2.0, 1.0, 0.0),
                                                       (0.5, 2.0, 0.2)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_formula(gamma_pos, gamma_neg, eps, reduction):
    logits, target = sample(n=7, c=4, seed=3)
    per_sample = reference_asl(logits, target, gamma_pos, gamma_neg, eps)
    expected = {"mean": per_sample.mean(), "sum": per_sample.sum(), "none": per_sample}[reduction]
    loss = AsymmetricLossSingleLabel(gamma_pos, gamma_neg, eps, reduction)(
        torch.tensor(logits), torch.tensor(target))
    assert loss.shape == ((7,) if reduction == "none" else ())
    np.testing.assert_allclose(loss.detach().double().numpy(), expected, rtol=2e-5, atol=1e-6)


def test_focusing_down_weights_easy_negatives():
    """gamma_neg > 0 must lower the loss below label-smoothed cross-entropy (weights <= 1)."""
    logits, target = sample(seed=5)
    z, t = torch.tensor(logits), torch.tensor(target)
    ce = AsymmetricLossSingleLabel(0.0, 0.0, 0.1, reduction="none")(z, t)
    asl = AsymmetricLossSingleLabel(0.0, 4.0, 0.1, reduction="none")(z, t)
    assert (asl < ce).all()


def test_hand_computed_two_class_value():
    # z = (0, 0): p = (1/2, 1/2), target 0, C = 2, eps = 0.2 -> q = (0.9, 0.1)
    # gamma_pos = 1 -> w_0 = 1/2 ; gamma_neg = 2 -> w_1 = 1/4
    # loss = -(0.9 * 0.5 + 0.1 * 0.25) * log(1/2) = 0.475 * log 2
    loss = AsymmetricLossSingleLabel(1.0, 2.0, 0.2)(torch.zeros(1, 2), torch.tensor([0]))
    assert loss.item() == pytest.approx(0.475 * math.log(2.0), rel=1e-6)


@pytest.mark.parametrize("gamma_pos, gamma_neg", [(0.0, 4.0), (1.0, 4.0), (2.0, 2.0)])
def test_gradient_is_finite_and_matches_reference(gamma_pos, gamma_neg):
    logits, target = sample(n=5, c=4, seed=7)
    logits[0] = [60.0, -60.0, 0.0, 5.0]  # saturated probabilities (p_k -> 1, p_j -> 0)
    target[0] = 0
    logits[1] = [-80.0, 40.0, 0.0, 1.0]  # confidently wrong
    target[1] = 0
    z = torch.tensor(logits, dtype=torch.float32, requires_grad=True)
    AsymmetricLossSingleLabel(gamma_pos, gamma_neg, 0.1)(z, torch.tensor(target)).backward()
    assert torch.isfinite(z.grad).all()

    # independent autograd of the formula in float64 (moderate logits only, away from saturation)
    z64 = torch.tensor(logits[2:], requires_grad=True)
    t64 = torch.tensor(target[2:])
    log_p = z64 - torch.logsumexp(z64, dim=1, keepdim=True)
    p = log_p.exp()
    onehot = torch.zeros_like(p).scatter_(1, t64[:, None], 1.0)
    w = onehot * (1 - p) ** gamma_pos + (1 - onehot) * p ** gamma_neg
    q = 0.9 * onehot + 0.1 / 4
    (-(q * w * log_p).sum(1).mean()).backward()
    z2 = torch.tensor(logits[2:], dtype=torch.float32, requires_grad=True)
    AsymmetricLossSingleLabel(gamma_pos, gamma_neg, 0.1)(z2, t64).backward()
    torch.testing.assert_close(z2.grad.double(), z64.grad, rtol=1e-4, atol=1e-6)


def test_bad_reduction_raises():
    with pytest.raises(ValueError):
        AsymmetricLossSingleLabel(0.0, 4.0, 0.1, reduction="avg")


def test_gammas_and_eps_have_no_defaults():
    """Their defaults live in config.yaml only."""
    with pytest.raises(TypeError):
        AsymmetricLossSingleLabel()
    with pytest.raises(TypeError):
        AsymmetricLossSingleLabel(0.0, 4.0)


def loss_spec(**overrides):
    """config.yaml's loss section with `overrides`."""
    return training_spec(loss=overrides).loss


def test_build_loss():
    ce = build_loss(loss_spec(name="cross_entropy", label_smoothing=0.1))
    assert isinstance(ce, nn.CrossEntropyLoss) and ce.label_smoothing == 0.1
    asl = build_loss(loss_spec(name="asl", gamma_pos=1, gamma_neg=3, eps=0.05))
    assert isinstance(asl, AsymmetricLossSingleLabel)
    assert (asl.gamma_pos, asl.gamma_neg, asl.eps, asl.reduction) == (1.0, 3.0, 0.05, "mean")
    with pytest.raises(UserError, match="loss.name"):
        loss_spec(name="focal")
    with pytest.raises(UserError, match="loss.name"):  # a spec made without the config check
        build_loss(dataclasses.replace(loss_spec(), name="focal"))
