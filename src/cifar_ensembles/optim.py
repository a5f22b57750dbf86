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

from .config.spec import OptimizerSpec
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

    def _split(self, group) -> tuple[list, list]:
        """The group's parameters that have a gradient: (scaled by T, T = 1)."""
        names = group.get("param_names", [None] * len(group["params"]))
        scaled, plain = [], []
        for p, name in zip(group["params"], names):
            if p.grad is None:
                continue
            adaptive = group["adaptive"] and (group["adaptive_params"] == "all" or "weight" in name)
            (scaled if adaptive else plain).append(p)
        return scaled, plain

    def _saved(self, params: list) -> list:
        """Persistent buffers that hold w during the perturbed pass (allocated on first use)."""
        buffers = []
        for p in params:
            state = self.state[p]
            if "saved" not in state or state["saved"].shape != p.shape:
                state["saved"] = torch.empty_like(p, memory_format=torch.preserve_format)
            buffers.append(state["saved"])
        return buffers

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Move to w + eps and remember w: a fixed number of foreach kernels, whatever the number
        of parameters, and no host sync (the norm and the scale stay on the device)."""
        plans, norms = [], []
        for group in self.param_groups:
            scaled, plain = self._split(group)
            t_grads = None
            if scaled:
                t = torch._foreach_abs(scaled)
                torch._foreach_add_(t, group["eta"])  # T = |w| + eta, computed once
                t_grads = torch._foreach_mul(t, [p.grad for p in scaled])  # T g
                norms += torch._foreach_norm(t_grads)
                torch._foreach_mul_(t_grads, t)  # T^2 g
            if plain:
                norms += torch._foreach_norm([p.grad for p in plain])
            plans.append((group, scaled, plain, t_grads))
        if not norms:
            self._perturbed = []
            return
        norm = torch.linalg.vector_norm(torch.stack(norms), ord=2)
        self._perturbed = []
        for group, scaled, plain, t_grads in plans:
            params = scaled + plain
            if not params:
                continue
            scale = torch.div(group["rho"], norm + 1e-12)
            eps = [*(t_grads or ()), *(p.grad for p in plain)]
            eps = torch._foreach_mul(eps, scale)
            torch._foreach_copy_(self._saved(params), params)
            torch._foreach_add_(params, eps)
            self._perturbed.append(params)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Return exactly to w and let the base optimizer step with the perturbed gradient."""
        for params in getattr(self, "_perturbed", []):
            torch._foreach_copy_(params, self._saved(params))
        self._perturbed = []
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
    """The keyword arguments of torch's SGD or Adam for an `optimizer:` spec.

    `fused=True` on every device: one kernel updates every parameter, the step counters stay
    tensors (no host sync per parameter, which the per-parameter Adam makes), and a CPU runs
    the code path a GPU runs."""
    if base == "sgd":
        return dict(lr=spec.lr, weight_decay=spec.weight_decay, momentum=spec.momentum,
                    nesterov=spec.nesterov, fused=True)
    if base == "adam":
        return dict(lr=spec.lr, weight_decay=spec.weight_decay, betas=spec.betas, fused=True)
    raise UserError(f"optimizer.base: unknown base optimizer {base!r}; choose sgd or adam")


def build_optimizer(model: nn.Module, spec: OptimizerSpec) -> torch.optim.Optimizer:
    """The optimizer an `optimizer:` spec names."""
    if spec.name in BASE_OPTIMIZERS:
        return BASE_OPTIMIZERS[spec.name](model.parameters(), **base_optimizer_kwargs(spec, spec.name))
    if spec.name in ("sam", "asam"):
        kwargs = base_optimizer_kwargs(spec, spec.base)  # first: it names a bad base in one line
        return SAM(model.named_parameters(), BASE_OPTIMIZERS[spec.base], rho=spec.rho,
                   adaptive=spec.name == "asam", eta=spec.eta, adaptive_params=spec.adaptive_params,
                   **kwargs)
    raise UserError(f"optimizer.name: unknown optimizer {spec.name!r}; choose one of "
                    f"{', '.join(OPTIMIZER_NAMES)}")
