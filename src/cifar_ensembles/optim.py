"""SAM and ASAM as one optimizer that wraps any torch optimizer (after davda54/sam).

SAM (Foret et al. 2021): eps = rho * g / (||g|| + 1e-12); the base optimizer steps with
the gradient taken at w + eps, from the original w. ASAM (Kwon et al. 2021) rescales by
T = |w| + eta: eps = rho * T^2 g / (||T g|| + 1e-12), so that ||T^-1 eps|| = rho.
||.|| is one global L2 norm over every parameter that has a gradient.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .errors import UserError
from .spec import OptimizerSpec

OPTIMIZER_NAMES = ("sgd", "adam", "sam", "asam")
BASE_OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}


class SAM(torch.optim.Optimizer):
    """Sharpness-aware minimization around `base_optimizer`; `adaptive=True` is ASAM.

    `adaptive_params="weights"` follows the official ASAM code: T applies to parameters
    whose name contains "weight" (pass `model.named_parameters()`), other parameters get
    T = 1 but stay in the shared norm. `"all"` applies T to every parameter (davda54/sam's
    `adaptive=True`, which also uses eta = 0).
    """

    def __init__(self, params, base_optimizer, *, rho: float, adaptive: bool = False,
                 eta: float | None = None, adaptive_params: str | None = None, **base_kwargs):
        if rho < 0:
            raise ValueError(f"rho must be >= 0, got {rho}")
        if adaptive and (eta is None or adaptive_params is None):
            raise ValueError("ASAM (adaptive=True) needs eta and adaptive_params")
        if eta is not None and eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        if adaptive_params not in (None, "weights", "all"):
            raise ValueError(f"adaptive_params must be 'weights' or 'all', got {adaptive_params!r}")
        defaults = dict(rho=rho, adaptive=adaptive, eta=eta, adaptive_params=adaptive_params,
                        **base_kwargs)
        super().__init__(params, defaults)
        if adaptive and adaptive_params == "weights":
            for group in self.param_groups:
                if "param_names" not in group:
                    raise ValueError("adaptive_params='weights' needs parameter names: "
                                     "pass model.named_parameters()")
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)

    def _scales(self, group):
        """Per-parameter T (None where T = 1)."""
        names = group.get("param_names", [None] * len(group["params"]))
        for p, name in zip(group["params"], names):
            scaled = group["adaptive"] and (group["adaptive_params"] == "all" or "weight" in name)
            yield p, (p.abs() + group["eta"]) if scaled else None

    @torch.no_grad()
    def _grad_norm(self) -> torch.Tensor:
        norms = [(p.grad if t is None else t * p.grad).norm(p=2)
                 for group in self.param_groups for p, t in self._scales(group)
                 if p.grad is not None]
        if not norms:
            return torch.zeros(())
        return torch.linalg.vector_norm(torch.stack(norms), ord=2)

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Move to w + eps and remember w."""
        norm = self._grad_norm()
        for group in self.param_groups:
            scale = group["rho"] / (norm + 1e-12)
            for p, t in self._scales(group):
                if p.grad is None:
                    continue
                self.state[p]["old_p"] = p.detach().clone()
                eps = p.grad * scale.to(p.device) if t is None else t * t * p.grad * scale.to(p.device)
                p.add_(eps)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Return exactly to w and let the base optimizer step with the perturbed gradient."""
        for group in self.param_groups:
            for p in group["params"]:
                if "old_p" in self.state[p]:
                    p.copy_(self.state[p].pop("old_p"))
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    def step(self, closure=None):
        """One SAM step; `closure` must run a full forward and backward pass and return the loss."""
        if closure is None:
            raise ValueError("SAM.step needs a closure that recomputes the loss and gradients")
        closure = torch.enable_grad()(closure)
        self.first_step(zero_grad=True)
        closure()
        self.second_step()

    def state_dict(self):
        """The base optimizer's state (momentum, Adam moments): SAM keeps none between steps."""
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict):
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups


@contextlib.contextmanager
def frozen_bn_stats(model: nn.Module):
    """BatchNorm layers use batch statistics but leave their running buffers untouched.

    Used for SAM's second (perturbed) pass, whose statistics belong to w + eps, not w.
    """
    layers = [m for m in model.modules()
              if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    for m in layers:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in layers:
            m.track_running_stats = True


def base_optimizer_kwargs(spec: OptimizerSpec, base: str) -> dict:
    """The keyword arguments of torch's SGD or Adam for an `optimizer:` spec."""
    if base == "sgd":
        return dict(lr=spec.lr, weight_decay=spec.weight_decay, momentum=spec.momentum,
                    nesterov=spec.nesterov)
    if base == "adam":
        return dict(lr=spec.lr, weight_decay=spec.weight_decay, betas=spec.betas)
    raise UserError(f"optimizer.base: unknown base optimizer {base!r}; choose sgd or adam")


def build_optimizer(model: nn.Module, spec: OptimizerSpec) -> torch.optim.Optimizer:
    """The optimizer an `optimizer:` spec names."""
    if spec.name in BASE_OPTIMIZERS:
        return BASE_OPTIMIZERS[spec.name](model.parameters(), **base_optimizer_kwargs(spec, spec.name))
    if spec.name in ("sam", "asam"):
        return SAM(model.named_parameters(), BASE_OPTIMIZERS[spec.base], rho=spec.rho,
                   adaptive=spec.name == "asam", eta=spec.eta, adaptive_params=spec.adaptive_params,
                   **base_optimizer_kwargs(spec, spec.base))
    raise UserError(f"optimizer.name: unknown optimizer {spec.name!r}; choose one of "
                    f"{', '.join(OPTIMIZER_NAMES)}")
