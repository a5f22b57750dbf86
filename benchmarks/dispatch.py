"""What one training step dispatches, counted on the CPU: the cost of a small-batch step on a GPU.

At the report's batch of 16 a ResNet-18 step is far below a GPU's arithmetic, so its time is
the number of kernels launched and of host round-trips. Both can be counted without a GPU:
a `TorchDispatchMode` tallies every aten operation one `Trainer.train_step` dispatches (the
code path a GPU runs: fused optimizers, foreach SAM and EMA), and `_local_scalar_dense`
is the operation behind `.item()`, `float(t)` and `bool(t)`: a host sync on CUDA.

    python -m benchmarks.dispatch        # prints the table and the ratios
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

SYNC_OPS = ("_local_scalar_dense",)
# The report's recipes at its batch of 16: ASL throughout; the single model is ASAM over SGD
# with a weight EMA. Width 8 keeps the count quick; the count does not depend on the width.
RECIPES = {
    "sgd": {"optimizer": {"name": "sgd"}},
    "adam": {"optimizer": {"name": "adam", "lr": 1e-4}},
    "sam": {"optimizer": {"name": "sam", "base": "sgd", "rho": 0.05}},
    "asam": {"optimizer": {"name": "asam", "base": "sgd"}},
    "asam_ema": {"optimizer": {"name": "asam", "base": "sgd"}, "ema": {"enabled": True}},
}
BASE = {"epochs": 1, "batch_size": 16, "model": {"name": "resnet18_cifar", "width": 8, "pretrained": False,
                                                  "input_size": None},
        "loss": {"name": "asl"}, "scheduler": {"name": "cosine", "interval": "step"},
        "augment": {"name": "none", "mode": "per_image"}}


class OpCounter(TorchDispatchMode):
    """Counts aten operations (by overload packet name) dispatched inside the block."""

    def __init__(self):
        super().__init__()
        self.counts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    @property
    def ops(self) -> int:
        return sum(self.counts.values())

    @property
    def syncs(self) -> int:
        return sum(self.counts[name] for name in SYNC_OPS)


def tiny_data(n: int = 64, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n + 32, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 10, n + 32).astype(np.int64)
    return dict(x_train=x[:n], y_train=y[:n], x_val=x[n:], y_val=y[n:], x_test=x[n:], y_test=y[n:],
                classes=np.array([str(i) for i in range(10)]), mean=np.full(3, 0.5, np.float32),
                std=np.full(3, 0.25, np.float32), train_index=np.arange(n), val_index=np.arange(n, n + 32),
                test_index=np.arange(32))


def trainer_for(recipe: str, runtime_overrides: dict | None = None, width: int | None = None):
    from cifar_ensembles.config.convert import from_data
    from cifar_ensembles.config.spec import RuntimeSpec, TrainingSpec, deep_merge, load_config
    from cifar_ensembles.training import Trainer

    config = load_config(Path(__file__).resolve().parents[1] / "config.yaml")
    overrides = deep_merge(BASE, RECIPES[recipe])
    if width is not None:
        overrides = deep_merge(overrides, {"model": {"width": width}})
    spec = from_data(TrainingSpec, deep_merge(config["training"], overrides))
    runtime = from_data(RuntimeSpec, deep_merge(config["runtime"], {"device": "cpu",
                                                                     "loader": {"num_workers": 0},
                                                                     **(runtime_overrides or {})}))
    return Trainer(spec, runtime, tiny_data(), seed=0, threads=1, log=lambda _m: None)


def count_step(recipe: str, warmup: int = 2, width: int | None = None) -> OpCounter:
    """Ops and host syncs of one full training step after `warmup` steps (optimizer state exists)."""
    torch.manual_seed(0)
    trainer = trainer_for(recipe, width=width)
    x = torch.randn(16, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (16,))
    for _ in range(warmup):
        trainer.train_step(x, y)
    counter = OpCounter()
    with counter:
        trainer.train_step(x, y)
    return counter


def count_all() -> dict[str, OpCounter]:
    return {recipe: count_step(recipe) for recipe in RECIPES}


def main() -> None:
    counters = count_all()
    sgd = counters["sgd"].ops
    print(f"{'step':<10} {'aten ops':>9} {'host syncs':>11} {'ops / sgd':>10}")
    for name, c in counters.items():
        print(f"{name:<10} {c.ops:>9} {c.syncs:>11} {c.ops / sgd:>10.2f}")
    ratio = counters["asam_ema"].ops / sgd
    print(f"goal: asam_ema ops <= 2.1 x sgd ops: {ratio:.2f} ({'met' if ratio <= 2.1 else 'MISSED'}); "
          f"0 host syncs: {'met' if all(c.syncs == 0 for c in counters.values()) else 'MISSED'}",
          file=sys.stderr)


if __name__ == "__main__":
    main()
