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

OPTIMIZER_NAMES = ("sgd", "adam", "sam", "asam")
BASE_OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}


class SAM(torch.optim.Optimizer):
    """Sharpness-aware minimization around `base_optimizer`; `adaptive=True` is ASAM.

    `adaptive_params="weights"` follows the official ASAM code: T applies to parameters
    whose name contains "weight" (pass `model.named_parameters()`), other parameters get
    T = 1 but stay in the shared norm. `"all"` applies T to every parameter (davda54/sam's
    `adaptive=True`, which also uses eta = 0).
    """

    def __init__(self, params, base_optimizer, rho: float = 0.05, adaptive: bool = False,
                 eta: float = 0.01, adaptive_params: str = "weights", **base_kwargs):
        if rho < 0:
            raise ValueError(f"rho must be >= 0, got {rho}")
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        if adaptive_params not in ("weights", "all"):
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


def build_optimizer(model: nn.Module, spec: dict) -> torch.optim.Optimizer:
    """The optimizer named in an `optimizer:` config section."""
    name = spec.get("name")
    lr, wd = float(spec["lr"]), float(spec.get("weight_decay", 0.0))

    def base_kwargs(base: str) -> dict:
        if base == "sgd":
            return dict(lr=lr, weight_decay=wd, momentum=float(spec.get("momentum", 0.9)),
                        nesterov=bool(spec.get("nesterov", False)))
        if base == "adam":
            return dict(lr=lr, weight_decay=wd, betas=tuple(spec.get("betas", (0.9, 0.999))))
        raise UserError(f"optimizer.base: unknown base optimizer {base!r}; choose sgd or adam")

    if name in BASE_OPTIMIZERS:
        return BASE_OPTIMIZERS[name](model.parameters(), **base_kwargs(name))
    if name in ("sam", "asam"):
        base = spec.get("base", "sgd")
        kwargs = base_kwargs(base)
        return SAM(model.named_parameters(), BASE_OPTIMIZERS[base], rho=float(spec.get("rho", 0.05)),
                   adaptive=name == "asam", eta=float(spec.get("eta", 0.01)),
                   adaptive_params=spec.get("adaptive_params", "weights"), **kwargs)
    raise UserError(f"optimizer.name: unknown optimizer {name!r}; choose one of "
                    f"{', '.join(OPTIMIZER_NAMES)}")
