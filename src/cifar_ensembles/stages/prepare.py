"""The prepare stage: raw files -> data.npz with its validation split and subsets."""

from __future__ import annotations

import os

from ..config.spec import SplitSpec
from ..files import splits
from ..files.raw_data import load_raw


def prepare_to_file(dataset: str, spec: SplitSpec, raw: str | os.PathLike, out: str | os.PathLike) -> dict:
    prepared = splits.split(load_raw(dataset, raw), spec)
    splits.write(out, prepared)
    return prepared
