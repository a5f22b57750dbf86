"""What a training job writes: model.pt, checkpoint.pt and history.csv, and Snakemake's
benchmark.tsv of it.

- `ModelRecord` (`model.pt`): the weights plus what prediction needs to rebuild the network.
- `Checkpoint` (`checkpoint.pt`): everything a run needs to continue bit for bit, and a
  divergence once one happened (a rerun with the same spec then fails at once).
- `HistoryRow` (`history.csv`): one row per epoch.
"""

from __future__ import annotations

import csv
import io
import math
import os
import typing
from dataclasses import fields
from typing import Annotated, Any

from pydantic import Field

from ..config.convert import spec, to_data
from ..config.spec import ModelSpec, choice
from .atomic import torch_save, write_text
from .records import DamagedFile, check_format, error_line, load_torch_file, typed_body

MODEL_FORMAT = "cifar-ensembles/model-1"
CHECKPOINT_FORMAT = "cifar-ensembles/checkpoint-3"
CHECKPOINT_FORMAT_2 = "cifar-ensembles/checkpoint-2"  # before snapshots and SWA: resumes with none kept
MEMBERS_FORMAT = "cifar-ensembles/members-1"


@spec
class ModelRecord:
    model: ModelSpec
    num_classes: Annotated[int, Field(ge=2)]
    in_channels: choice(1, 3)
    mean: tuple[float, ...]
    std: tuple[Annotated[float, Field(gt=0)], ...]
    ema: bool
    state_dict: dict[str, Any]

    def save(self, path: str | os.PathLike) -> None:
        torch_save(path, {"format": MODEL_FORMAT, **to_data(self)})

    @classmethod
    def load(cls, path: str | os.PathLike) -> ModelRecord:
        body = check_format(load_torch_file(path, "model file"), MODEL_FORMAT, path,
                             "cifar-ensembles model file")
        return cls.check(typed_body(cls, body, path, "model file"), path)

    @staticmethod
    def check(record: ModelRecord, path) -> ModelRecord:
        import torch

        bad = [k for k, v in record.state_dict.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise DamagedFile(path, f"damaged model file (state_dict.{bad[0]} is not a tensor)")
        if len(record.mean) != record.in_channels or len(record.std) != record.in_channels:
            raise DamagedFile(path, "damaged model file (mean/std do not match in_channels)")
        return record


# ------------------------------------------------------------------ history.csv
@spec
class HistoryRow:
    epoch: int
    lr: float
    train_loss: float
    train_acc: float
    val_loss: float | None  # None: no validation that epoch (runtime.eval_every_epochs)
    val_acc: float | None
    ema_val_loss: float | None
    ema_val_acc: float | None
    seconds: float
    images_per_second: float


HISTORY_FIELDS = tuple(f.name for f in fields(HistoryRow))
RESULT_FIELDS = tuple(k for k in HISTORY_FIELDS if k not in ("seconds", "images_per_second"))


def history_csv(rows: list[HistoryRow]) -> str:
    """CSV text; floats in repr form, so a row read back equals the row written, bit for bit."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(HISTORY_FIELDS)
    for row in rows:
        writer.writerow(["" if getattr(row, k) is None else repr(getattr(row, k)) for k in HISTORY_FIELDS])
    return buf.getvalue()


def write_history(path: str | os.PathLike, rows: list[HistoryRow]) -> None:
    write_text(path, history_csv(rows))


def _cell(text: str, tp):
    if text == "" and type(None) in typing.get_args(tp):
        return None
    try:
        number = float(text)
    except ValueError:
        return text  # from_data names it
    return int(number) if tp is int and number.is_integer() else number


def read_history(path: str | os.PathLike) -> list[HistoryRow]:
    """history.csv as rows; a damaged file is named in one line."""
    try:
        with open(path, newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            lines = list(reader)
    except FileNotFoundError:
        raise DamagedFile(path, "missing") from None
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DamagedFile(path, f"not a readable history ({error_line(err)})") from None
    if header is None or tuple(header) != HISTORY_FIELDS:
        raise DamagedFile(path, f"damaged history (header must be {','.join(HISTORY_FIELDS)})")
    if not lines:
        raise DamagedFile(path, "damaged history (no rows)")
    hints = typing.get_type_hints(HistoryRow)
    rows = []
    for i, line in enumerate(lines, start=2):
        if len(line) != len(HISTORY_FIELDS):
            raise DamagedFile(path, f"damaged history (line {i} has {len(line)} cells, "
                                    f"expected {len(HISTORY_FIELDS)})")
        values = {k: _cell(text, hints[k]) for k, text in zip(HISTORY_FIELDS, line)}
        rows.append(typed_body(HistoryRow, values, path, f"history (line {i})"))
    return rows


# ------------------------------------------------------------------ checkpoint.pt
@spec
class EpochProgress:
    """The running part of an unfinished epoch: per-step losses (kept whole, so that the
    epoch's mean is summed in one order however often the run was interrupted), correct
    predictions, and its seconds so far."""

    losses: Any  # float32 tensor, one entry per step of the epoch
    correct: int
    seconds: float
    data_wait: float
    lr: float | None  # at the start of the epoch (history's `lr`)


@spec
class Divergence:
    """Where a run's loss stopped being finite; reruns with the same spec fail with it."""

    epoch: int
    step: int
    loss: str  # "nan" or "inf": not a finite number

    def message(self) -> str:
        return f"training diverged: loss is {self.loss} at epoch {self.epoch}, step {self.step}"


@spec
class Checkpoint:
    fingerprint: str
    epoch: int  # epochs completed
    batch: int  # batches completed within the current epoch
    history: list[HistoryRow]
    progress: EpochProgress
    model: dict[str, Any]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    ema: dict[str, Any] | None
    torch_rng: Any
    divergence: Divergence | None
    kept: dict[str, Any] | None  # snapshots and the SWA average so far (training.kept_weights)

    def save(self, path: str | os.PathLike) -> None:
        torch_save(path, {"format": CHECKPOINT_FORMAT, **to_data(self)})

    @classmethod
    def load(cls, path: str | os.PathLike) -> Checkpoint:
        hint = "delete it to train this model afresh"
        obj = load_torch_file(path, "checkpoint", hint)
        if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT_2:
            obj = {**obj, "format": CHECKPOINT_FORMAT, "kept": None}
        body = check_format(obj, CHECKPOINT_FORMAT, path, "cifar-ensembles checkpoint", hint)
        return typed_body(cls, body, path, "checkpoint", hint)


# ------------------------------------------------------------------ members.pt
def save_members(path: str | os.PathLike, members: dict[str, ModelRecord]) -> None:
    """A run's extra members (snapshots `epochN`, the SWA average `swa`), each a model record."""
    torch_save(path, {"format": MEMBERS_FORMAT, "members": {k: to_data(v) for k, v in members.items()}})


def load_member(path: str | os.PathLike, name: str) -> ModelRecord:
    """One extra member of a run's members.pt, checked as model.pt is."""
    body = check_format(load_torch_file(path, "members file"), MEMBERS_FORMAT, path,
                        "cifar-ensembles members file")
    members = body.get("members")
    if not isinstance(members, dict):
        raise DamagedFile(path, "damaged members file (no members)")
    if name not in members:
        raise DamagedFile(path, f"has no member {name!r} (it has: {', '.join(map(str, members)) or 'none'}); "
                                "the training spec that wrote it kept others")
    return ModelRecord.check(typed_body(ModelRecord, members[name], path, f"member {name}"), path)



def read_benchmark_seconds(path: str | os.PathLike) -> float:
    """Wall-clock seconds of a job from Snakemake's benchmark file (column `s`, first row)."""
    try:
        with open(path, newline="") as f:
            row = next(csv.DictReader(f, delimiter="\t"))
        seconds = float(row["s"])
    except FileNotFoundError:
        raise DamagedFile(path, "missing") from None
    except (OSError, StopIteration, KeyError, ValueError, TypeError, csv.Error) as err:
        raise DamagedFile(path, f"not a Snakemake benchmark file ({error_line(err)})") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise DamagedFile(path, f"damaged benchmark file (s = {seconds})")
    return seconds
