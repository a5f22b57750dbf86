"""Atomic file writes: write to a temporary name in the same folder, then rename.

A reader (or Snakemake after a crash) never sees a half-written model, array or figure, and
a write that fails (a full disk, a quota) removes its temporary file and ends in one line
naming the file, not a traceback.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..errors import UserError


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def _cannot_write(path: Path) -> Iterator[None]:
    """An OSError inside (a full disk, a quota, no permission) as one line naming `path`."""
    try:
        yield
    except OSError as err:
        raise UserError(f"{path}: cannot write: {err.strerror or err}") from None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds.
    Errors of the block stay the caller's (reading an input is not writing `path`):
    `atomic_write` is the block that only writes."""
    path = Path(path)
    tmp_path = None
    try:
        with _cannot_write(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
            tmp_path = Path(tmp)
            os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0600; outputs are shared like any file
            os.close(fd)
        yield tmp_path
        with _cannot_write(path):
            os.replace(tmp_path, path)
    finally:
        if tmp_path is not None and tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """`atomic_path` around a block that only writes the temporary file: its OSError is one
    line naming `path`."""
    with atomic_path(path) as tmp, _cannot_write(Path(path)):
        yield tmp


@contextlib.contextmanager
def all_or_none(*paths: str | os.PathLike) -> Iterator[None]:
    """Around the writes of a stage with several outputs: when one fails (a full disk, say),
    the others are removed too, those written before it included, so that no output of a
    failed run looks finished (nor mixes with a previous run's)."""
    try:
        yield
    except BaseException:
        for path in paths:
            with contextlib.suppress(OSError):
                Path(path).unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n")


def save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    with atomic_write(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array)


def save_npz(path: str | os.PathLike, **arrays) -> None:
    with atomic_write(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def torch_save(path: str | os.PathLike, obj) -> None:
    import torch

    with atomic_write(path) as tmp:
        try:
            torch.save(obj, tmp)
        except RuntimeError as err:  # torch's zip writer reports a failed write this way
            first = str(err).splitlines()[0][:120]
            raise OSError(f"torch.save failed ({first}); is the disk full?") from None
