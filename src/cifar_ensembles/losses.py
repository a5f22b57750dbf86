"""Losses: cross-entropy (optionally label-smoothed) and the single-label Asymmetric Loss.

ASL (Ridnik et al. 2021), single-label form: p = softmax(z), k the target class,
q = (1 - eps) onehot(k) + eps / C, weights (1 - p_k)^gamma_pos on the target and
p_j^gamma_neg on the others; loss = -sum_c q_c w_c log p_c, averaged over the batch.
With gamma_pos = gamma_neg = 0 it is cross-entropy with label smoothing eps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UserError

LOSS_NAMES = ("cross_entropy", "asl")


class AsymmetricLossSingleLabel(nn.Module):
    def __init__(self, gamma_pos: float = 0.0, gamma_neg: float = 4.0, eps: float = 0.1,
                 reduction: str = "mean"):
        super().__init__()
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be mean, sum or none, got {reduction!r}")
        self.gamma_pos, self.gamma_neg, self.eps, self.reduction = gamma_pos, gamma_neg, eps, reduction

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        num_classes = logits.shape[-1]
        log_p = F.log_softmax(logits.float(), dim=-1)
        p = log_p.exp()
        onehot = F.one_hot(target, num_classes).to(log_p.dtype)
        weight = torch.where(onehot.bool(), (1 - p).pow(self.gamma_pos), p.pow(self.gamma_neg))
        q = onehot * (1 - self.eps) + self.eps / num_classes
        loss = -(q * weight * log_p).sum(dim=-1)
        if self.reduction == "mean":
            return loss.mean()
        if self.reduction == "sum":
            return loss.sum()
        return loss


def build_loss(spec: dict) -> nn.Module:
    name = spec.get("name")
    if name == "cross_entropy":
        return nn.CrossEntropyLoss(label_smoothing=float(spec.get("label_smoothing", 0.0)))
    if name == "asl":
        return AsymmetricLossSingleLabel(float(spec.get("gamma_pos", 0.0)),
                                         float(spec.get("gamma_neg", 4.0)),
                                         float(spec.get("eps", 0.1)))
    raise UserError(f"loss.name: unknown loss {name!r}; choose one of {', '.join(LOSS_NAMES)}")
