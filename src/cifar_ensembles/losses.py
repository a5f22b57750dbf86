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

from .config.spec import LossSpec
from .errors import UserError

LOSS_NAMES = ("cross_entropy", "asl")


class AsymmetricLossSingleLabel(nn.Module):
    def __init__(self, gamma_pos: float, gamma_neg: float, eps: float, reduction: str = "mean"):
        super().__init__()
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be mean, sum or none, got {reduction!r}")
        self.gamma_pos, self.gamma_neg, self.eps, self.reduction = gamma_pos, gamma_neg, eps, reduction

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        num_classes = logits.shape[-1]
        log_p = F.log_softmax(logits.float(), dim=-1)
        p = log_p.exp()
        # the target mask by comparison, not F.one_hot, whose check of the labels' range is a host
        # sync every step (labels are range-checked once, when data.npz is read)
        is_target = torch.arange(num_classes, device=logits.device) == target.unsqueeze(-1)
        weight = torch.where(is_target, (1 - p).pow(self.gamma_pos), p.pow(self.gamma_neg))
        q = is_target.to(log_p.dtype) * (1 - self.eps) + self.eps / num_classes
        loss = -(q * weight * log_p).sum(dim=-1)
        if self.reduction == "mean":
            return loss.mean()
        if self.reduction == "sum":
            return loss.sum()
        return loss


def build_loss(spec: LossSpec) -> nn.Module:
    if spec.name == "cross_entropy":
        return nn.CrossEntropyLoss(label_smoothing=spec.label_smoothing)
    if spec.name == "asl":
        return AsymmetricLossSingleLabel(spec.gamma_pos, spec.gamma_neg, spec.eps)
    raise UserError(f"loss.name: unknown loss {spec.name!r}; choose one of {', '.join(LOSS_NAMES)}")
