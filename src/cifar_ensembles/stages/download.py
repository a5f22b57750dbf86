"""The download stage: a dataset's verified raw files, or ImageNet weights, into resources/."""

from __future__ import annotations

import os
from pathlib import Path

from ..config.spec import SourceSpec, WeightsSpec
from ..files.raw_data import fetch
from ..files.weights import fetch_weights


def download_dataset(dataset: str, spec: SourceSpec, out: str | os.PathLike) -> Path:
    return fetch(dataset, out, source=spec.source, url=spec.url, md5=spec.md5, own_dataset=spec.own_dataset)


def download_weights(spec: WeightsSpec, out: str | os.PathLike) -> Path:
    return fetch_weights(out, url=spec.url, local_file=spec.file)
