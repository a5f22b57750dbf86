"""Which checkpoint a run may continue from: one written for the same result spec, seed and data.

The fingerprint hashes exactly what decides the result: the result spec (`spec.result_spec`
of the training spec; runtime settings are not part of it, so a checkpoint resumes under
other speed settings), the seed and the prepared split. A checkpoint that records a
divergence stops a rerun with the same fingerprint at once: the divergence would happen
again, bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..config.spec import TrainingSpec, result_spec
from ..errors import UserError
from ..files.training_run import Checkpoint


class Diverged(UserError):
    """The loss stopped being finite: deterministic, so retrying cannot help."""


def fingerprint(spec: TrainingSpec, seed: int, data: dict) -> str:
    h = hashlib.sha256(json.dumps({"spec": result_spec(spec), "seed": seed}, sort_keys=True).encode())
    for key in ("y_train", "y_val", "train_index", "val_index"):
        h.update(np.ascontiguousarray(data[key]).tobytes())
    return h.hexdigest()


def read_checkpoint(path: str | os.PathLike, expected: str, log: Callable[[str], None]) -> Checkpoint | None:
    """The checkpoint at `path` when it belongs to this run; None when there is none or it
    belongs to another spec, seed or dataset. A damaged file or a recorded divergence of
    this very run is a one-line error."""
    path = Path(path)
    if not path.exists():
        return None
    checkpoint = Checkpoint.load(path)
    if checkpoint.fingerprint != expected:
        log(f"checkpoint {path} was written with another training spec, seed or dataset; starting afresh")
        return None
    if checkpoint.divergence is not None:
        raise Diverged(f"{checkpoint.divergence.message()} (recorded in {path} by an earlier attempt; "
                       "the same spec diverges again: change the training spec, e.g. a smaller "
                       "optimizer.lr, or delete the checkpoint)")
    return checkpoint
