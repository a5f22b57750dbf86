"""The files the workflow writes and reads back, as typed records with their own load errors.

Each format is a frozen dataclass; loading checks every field (presence, type, finite
numbers; see `typed`) and turns any problem into one line that names the file and how to
rebuild it, never a traceback. Torch files are read with `weights_only=True`, arrays with
`allow_pickle=False`: reading them never runs code.

- `ModelRecord` (`model.pt`): the weights plus what prediction needs to rebuild the network.
- `Checkpoint` (`checkpoint.pt`): everything a run needs to continue bit for bit, and a
  divergence once one happened (a rerun with the same spec then fails at once).
- `HistoryRow` (`history.csv`): one row per epoch.
- `EnsembleSummary` (`ensemble.json`) and `Comparisons` (`comparisons.json`).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import typing
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from .atomic import torch_save, write_json, write_text
from .errors import UserError
from .spec import ModelSpec
from .typed import from_data, to_data

MODEL_FORMAT = "cifar-ensembles/model-1"
CHECKPOINT_FORMAT = "cifar-ensembles/checkpoint-2"
SUMMARY_FORMAT = "cifar-ensembles/ensemble-1"


def rebuild_hint(path: str | os.PathLike) -> str:
    return f"rebuild it with: snakemake --forcerun {path}"


class DamagedFile(UserError):
    """A file the workflow wrote itself is missing, truncated or edited into something else."""

    def __init__(self, path, problem: str, hint: str | None = None):
        super().__init__(f"{path}: {problem}; {hint or rebuild_hint(path)}")


def _weights_only_reason(text: str) -> str:
    """What torch's weights-only unpickler refused, from its long message."""
    refused = re.search(r"GLOBAL (\S+)", text)
    if refused:
        return (f"its pickle asks for {refused.group(1).rstrip('.')}, which is refused "
                "(only tensors and plain data are read)")
    after = text.split("WeightsUnpickler error:", 1)[1] if "WeightsUnpickler error:" in text else ""
    lines = [line.strip() for line in after.splitlines()
             if line.strip() and not line.strip().startswith("Check the documentation")]
    return f"the weights-only reader refuses it: {(lines or ['unsupported content'])[0][:200]}"


def error_line(err: BaseException) -> str:
    """`err` in one line: its type and first line (torch's can span many). The advice torch and
    numpy give for a file that holds code (load it unsafely) is not passed on."""
    text = str(err).replace("\x1b[1m", "").replace("\x1b[0m", "").strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if lines and lines[0].startswith("Weights only load failed"):
        return f"{err.__class__.__name__}: {_weights_only_reason(text)}"
    if "load it unsafely" in text:  # numpy, of a file that is a bare pickle
        return f"{err.__class__.__name__}: a pickle, not an array; refused (allow_pickle=False)"
    return f"{err.__class__.__name__}: {(lines or [''])[0][:200]}"


def load_weights_only(path: str | os.PathLike):
    """`torch.load(path, weights_only=True)` onto the CPU, without torch's warnings (a pickle
    protocol it does not expect makes it warn before it fails): one line is all a bad file gives."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(path, map_location="cpu", weights_only=True)


def _torch_load(path, what: str, hint: str | None = None) -> dict:
    try:
        obj = load_weights_only(path)
    except FileNotFoundError:
        raise DamagedFile(path, "missing", hint) from None
    except Exception as err:  # truncated zip, a pickle that is not plain data, ...
        raise DamagedFile(path, f"not a readable {what} ({error_line(err)})", hint) from None
    return obj


def _typed(tp, value, path, what: str, hint: str | None = None):
    try:
        return from_data(tp, value, "")
    except UserError as err:
        raise DamagedFile(path, f"damaged {what} ({err})", hint) from None


def _check_format(obj, expected: str, path, what: str, hint: str | None = None) -> dict:
    if not isinstance(obj, dict) or obj.get("format") != expected:
        found = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        raise DamagedFile(path, f"not a {what} (format {found!r}, expected {expected!r})", hint)
    return {k: v for k, v in obj.items() if k != "format"}


# ------------------------------------------------------------------ model.pt
@dataclass(frozen=True)
class ModelRecord:
    model: ModelSpec
    num_classes: int
    in_channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    ema: bool
    state_dict: dict[str, Any]

    def save(self, path: str | os.PathLike) -> None:
        torch_save(path, {"format": MODEL_FORMAT, **to_data(self)})

    @classmethod
    def load(cls, path: str | os.PathLike) -> ModelRecord:
        import torch

        body = _check_format(_torch_load(path, "model file"), MODEL_FORMAT, path,
                             "cifar-ensembles model file")
        record = _typed(cls, body, path, "model file")
        bad = [k for k, v in record.state_dict.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise DamagedFile(path, f"damaged model file (state_dict.{bad[0]} is not a tensor)")
        if len(record.mean) != record.in_channels or len(record.std) != record.in_channels:
            raise DamagedFile(path, "damaged model file (mean/std do not match in_channels)")
        return record


# ------------------------------------------------------------------ history.csv
@dataclass(frozen=True)
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
        rows.append(_typed(HistoryRow, values, path, f"history (line {i})"))
    return rows


# ------------------------------------------------------------------ checkpoint.pt
@dataclass(frozen=True)
class EpochProgress:
    """The running part of an unfinished epoch: per-step losses (kept whole, so that the
    epoch's mean is summed in one order however often the run was interrupted), correct
    predictions, and its seconds so far."""

    losses: Any  # float32 tensor, one entry per step of the epoch
    correct: int
    seconds: float
    data_wait: float
    lr: float | None  # at the start of the epoch (history's `lr`)


@dataclass(frozen=True)
class Divergence:
    """Where a run's loss stopped being finite; reruns with the same spec fail with it."""

    epoch: int
    step: int
    loss: str  # "nan" or "inf": not a finite number

    def message(self) -> str:
        return f"training diverged: loss is {self.loss} at epoch {self.epoch}, step {self.step}"


@dataclass(frozen=True)
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

    def save(self, path: str | os.PathLike) -> None:
        torch_save(path, {"format": CHECKPOINT_FORMAT, **to_data(self)})

    @classmethod
    def load(cls, path: str | os.PathLike) -> Checkpoint:
        hint = "delete it to train this model afresh"
        body = _check_format(_torch_load(path, "checkpoint", hint), CHECKPOINT_FORMAT, path,
                             "cifar-ensembles checkpoint", hint)
        return _typed(cls, body, path, "checkpoint", hint)


class JsonRecord:
    """A typed JSON file the workflow writes and reads back: tagged with its FORMAT, checked
    field by field on load, then as a whole (`_misfit`: what does not fit together)."""

    FORMAT: ClassVar[str]
    WHAT: ClassVar[str]

    def save(self, path: str | os.PathLike) -> None:
        write_json(path, {"format": self.FORMAT, **to_data(self)})

    @classmethod
    def load(cls, path: str | os.PathLike):
        body = _check_format(read_json(path, cls.WHAT), cls.FORMAT, path, cls.WHAT)
        record = _typed(cls, body, path, cls.WHAT)
        misfit = record._misfit()
        if misfit:
            raise DamagedFile(path, f"damaged {cls.WHAT} ({misfit})")
        return record

    def _misfit(self) -> str | None:
        return None


# ------------------------------------------------------------------ ensemble.json
@dataclass(frozen=True)
class Calibration:
    accuracy: float
    nll: float
    brier: float
    ece: float


@dataclass(frozen=True)
class Calibrated:
    """Calibration on test before and after a temperature fitted on validation."""

    temperature: float
    before: Calibration
    after: Calibration


@dataclass(frozen=True)
class SingleModel:
    seed: int
    val_accuracy: float
    test_accuracy: float
    test_ci: tuple[float, float]
    calibration: Calibrated


@dataclass(frozen=True)
class VoteCurves:
    hard: list[float]
    soft: list[float]


@dataclass(frozen=True)
class Spread:
    mean: list[float]
    std: list[float]
    min: list[float]
    max: list[float]


@dataclass(frozen=True)
class SubsetCurves:
    soft: Spread
    hard: Spread
    subsets: list[int]
    exhaustive: list[bool]


@dataclass(frozen=True)
class Greedy:
    order: list[int]
    val_nll: list[float]
    chosen_size: int
    members: list[int]
    val_accuracy: float
    test_accuracy: float
    test_ci: tuple[float, float]


@dataclass(frozen=True)
class SingleStats:
    mean: float
    std: float
    min: float
    max: float
    ci_of_mean: tuple[float, float]


@dataclass(frozen=True)
class Bootstrap:
    resamples: int
    seed: int
    level: float


@dataclass(frozen=True)
class EnsembleSummary(JsonRecord):
    FORMAT: ClassVar[str] = SUMMARY_FORMAT
    WHAT: ClassVar[str] = "ensemble summary"

    seeds: list[int]
    method: str
    chosen_on: str
    chosen_k: int
    members: list[int]
    val_accuracy: float
    test_accuracy: float
    test_ci: tuple[float, float]
    calibration: Calibrated
    first_k: dict[str, VoteCurves]  # "val", "test"
    subsets: dict[str, SubsetCurves]
    greedy: Greedy
    singles: list[SingleModel]
    best_single_seed: int
    single_test_accuracy: SingleStats
    bootstrap: Bootstrap

    def _misfit(self) -> str | None:
        misfit = self._parts_misfit()
        return f"its parts do not fit together: {misfit}" if misfit else None

    def _parts_misfit(self) -> str | None:
        """What does not fit the seeds in a summary whose fields each have the right type."""
        seeds, m = self.seeds, len(self.seeds)
        if not 1 <= self.chosen_k <= m:
            return f"chosen_k {self.chosen_k} for {m} seeds"
        if self.members != seeds[:self.chosen_k]:
            return "members are not the first chosen_k seeds"
        if [s.seed for s in self.singles] != seeds:
            return "singles are not one per seed, in seed order"
        if self.best_single_seed not in seeds:
            return f"best_single_seed {self.best_single_seed} is not one of the seeds"
        for name, curves in (("first_k", self.first_k), ("subsets", self.subsets)):
            if set(curves) != {"val", "test"}:
                return f"{name} must have val and test curves"
        for split, c in self.first_k.items():
            if not len(c.soft) == len(c.hard) == m:
                return f"first_k.{split} curves are not one value per ensemble size"
        for split, c in self.subsets.items():
            spreads = [v for s in (c.soft, c.hard) for v in (s.mean, s.std, s.min, s.max)]
            lengths = {len(c.subsets), len(c.exhaustive), *(len(v) for v in spreads)}
            if lengths != {m}:
                return f"subsets.{split} curves are not one value per ensemble size"
        g = self.greedy
        if (sorted(g.order) != sorted(seeds) or len(g.val_nll) != m or not 1 <= g.chosen_size <= m
                or sorted(g.members) != sorted(g.order[:g.chosen_size])):
            return "greedy selection does not fit the seeds"
        return None


# ------------------------------------------------------------------ shift.json, diversity.json
SHIFT_FORMAT = "cifar-ensembles/shift-1"
DIVERSITY_FORMAT = "cifar-ensembles/diversity-1"


@dataclass(frozen=True)
class Scores:
    accuracy: float
    nll: float
    brier: float
    ece: float
    scaled: Calibration  # after the temperature fitted on validation


@dataclass(frozen=True)
class SetScores:
    """One (corruption, severity) set; the clean test split is corruption "none", severity 0."""

    corruption: str
    severity: int
    singles: list[Scores]  # one per seed
    single_mean: Scores  # the mean of the singles' scores
    ensemble: Scores  # the chosen ensemble


@dataclass(frozen=True)
class SeverityGain:
    severity: int
    single_accuracy: float  # mean over seeds and corruptions
    ensemble_accuracy: float
    gain: float
    ci: tuple[float, float]  # paired bootstrap over images


@dataclass(frozen=True)
class CorruptionErrors:
    baseline: str
    single: dict[str, float | None]  # corruption -> CE of the mean single model (None: undefined)
    ensemble: dict[str, float | None]
    mce_single: float | None
    mce_ensemble: float | None
    relative_mce_single: float | None
    relative_mce_ensemble: float | None


@dataclass(frozen=True)
class ShiftSummary(JsonRecord):
    FORMAT: ClassVar[str] = SHIFT_FORMAT
    WHAT: ClassVar[str] = "shift summary"

    experiment: str
    seeds: list[int]
    members: list[int]  # the chosen ensemble's
    method: str
    images: int
    corruptions: list[str]
    clean: SetScores
    sets: list[SetScores]
    by_severity: list[SeverityGain]
    corruption_error: CorruptionErrors | None

    def _misfit(self) -> str | None:
        expected = {(c, s) for c in self.corruptions for s in range(1, 6)}
        found = [(x.corruption, x.severity) for x in self.sets]
        if set(found) != expected or len(found) != len(expected):
            return "sets are not one per corruption and severity"
        if any(len(x.singles) != len(self.seeds) for x in [self.clean, *self.sets]):
            return "singles are not one per seed"
        return None


@dataclass(frozen=True)
class DiversityStats:
    disagreement: float  # mean over member pairs
    kl: float
    oracle_accuracy: float
    mean_member_accuracy: float
    mean_member_nll: float
    ensemble_nll: float
    gain: float  # mean member NLL - ensemble NLL


@dataclass(frozen=True)
class DiversitySummary(JsonRecord):
    FORMAT: ClassVar[str] = DIVERSITY_FORMAT
    WHAT: ClassVar[str] = "diversity summary"

    seeds: list[int]
    disagreement: list[list[float]]  # on test, member x member
    kl: list[list[float]]
    test: DiversityStats
    by_severity: dict[str, DiversityStats]  # "1".."5", pooled over corruptions

    def _misfit(self) -> str | None:
        m = len(self.seeds)
        if any(len(matrix) != m or any(len(row) != m for row in matrix)
               for matrix in (self.disagreement, self.kl)):
            return "matrices are not members x members"
        return None


# ------------------------------------------------------------------ comparisons.json
@dataclass(frozen=True)
class SeedComparison:
    seed: int
    accuracy_a: float
    accuracy_b: float
    b: int
    c: int
    p_value: float


@dataclass(frozen=True)
class EnsembleComparison:
    accuracy_a: float
    accuracy_b: float
    b: int
    c: int
    p_value: float


@dataclass(frozen=True)
class PairComparison:
    a: str
    b: str
    shared_seeds: list[int]
    per_seed: list[SeedComparison]
    ensemble: EnsembleComparison
    mean_single_difference: float


@dataclass(frozen=True)
class Comparisons:
    test: str
    pairs: list[PairComparison]

    def save(self, path: str | os.PathLike) -> None:
        write_json(path, to_data(self))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Comparisons:
        return _typed(cls, read_json(path, "comparison file"), path, "comparison file")


# ------------------------------------------------------------------ plain files
def read_json(path: str | os.PathLike, what: str):
    """Parsed JSON; NaN and Infinity are refused (the workflow never writes them)."""
    def refuse(constant):
        raise ValueError(f"{constant} is not a finite number")

    try:
        return json.loads(Path(path).read_text(), parse_constant=refuse)
    except FileNotFoundError:
        raise DamagedFile(path, "missing") from None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise DamagedFile(path, f"not a readable {what} ({error_line(err)})") from None


def load_probability_array(path: str | os.PathLike, ndim: int, what: str = "probability array") -> np.ndarray:
    """Class probabilities in an .npy (classes on the last axis, `ndim` axes), read without
    pickles and checked: floats, finite, non-negative, every row summing to 1."""
    try:
        probs = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise DamagedFile(path, "missing") from None
    except (OSError, ValueError, EOFError) as err:
        raise DamagedFile(path, f"not a {what} ({error_line(err)})") from None
    if (not isinstance(probs, np.ndarray) or probs.ndim != ndim or probs.dtype.kind != "f"
            or probs.shape[-1] < 2):
        raise DamagedFile(path, f"not a {what} (shape {getattr(probs, 'shape', '?')}, "
                                f"dtype {getattr(probs, 'dtype', '?')})")
    if not np.all(np.isfinite(probs)) or probs.min(initial=0.0) < 0:
        raise DamagedFile(path, f"damaged {what} (values that are negative or not finite)")
    sums = probs.reshape(-1, probs.shape[-1]).sum(axis=1, dtype=np.float64)
    if len(sums) and not np.allclose(sums, 1.0, atol=1e-3):
        worst = int(np.argmax(np.abs(sums - 1.0)))
        raise DamagedFile(path, f"damaged {what} (row {worst} sums to {sums[worst]:.4g}, not 1)")
    return probs


def load_probabilities(path: str | os.PathLike) -> np.ndarray:
    """A member's class probabilities (N x C float32), checked."""
    return load_probability_array(path, 2)


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
