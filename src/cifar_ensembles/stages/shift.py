"""The shift stages: corrupted test sets, every model's predictions on them, and what those say.

- `make_shift_set`: one corruption at severities 1..5 of (a stratified subset of) the test
  split, generated with albumentations or read from a local CIFAR-10-C -> an .npz
  (x: 5 x N x H x W x C uint8, y, and `index`, the images' positions in the test split).
- `stages.predict.predict_shift`: one experiment's members on one corruption ->
  probabilities (members x 5 x N x C, float32).
- `shift_summary_to_file`: per (corruption, severity) accuracy, NLL, Brier and ECE of every
  single model and the chosen ensemble, before and after the validation-fitted temperature;
  corruption error against the baseline experiment; the ensemble's gain per severity with a
  paired bootstrap interval -> shift.json.
- `diversity_to_file`: disagreement and KL between members, oracle accuracy and the NLL gain
  of averaging, on test and per severity -> diversity.json.
"""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np

from ..analysis import diversity
from ..analysis.metrics import bootstrap_indices
from ..analysis.shift_metrics import (
    corruption_error,
    mean_defined,
    paired_gain,
    relative_corruption_error,
    scored,
)
from ..analysis.votes import VOTES
from ..config.convert import spec
from ..config.spec import EnsembleSpec, ShiftSetSpec
from ..errors import UserError
from ..files import limits, splits
from ..files.arrays import load_members, load_shift_probs, load_shift_set
from ..files.atomic import save_npz
from ..files.ensemble_summary import Calibration, EnsembleSummary
from ..files.limits import Limits
from ..files.records import error_line
from ..files.safe_archive import TooLarge, bounded_members, open_tar
from ..files.shift_summary import (
    CorruptionErrors,
    DiversityStats,
    DiversitySummary,
    Scores,
    SetScores,
    SeverityGain,
    ShiftSummary,
)
from ..transforms.corruptions import SEVERITIES, corrupt_all

CIFAR10C_IMAGES = 10_000  # per severity in CIFAR-10-C: the CIFAR-10 test set, in its order


@spec
class BaselineFiles:
    """What the corruption error of an experiment reads of `shift.baseline`."""

    name: str
    test: list[str]  # its probs_test.npy per seed
    shift: dict[str, str]  # {corruption: its shift probabilities}


# ------------------------------------------------------------------ the sets
def _subset(labels: np.ndarray, images: int | None, seed: int) -> np.ndarray:
    """Positions in the test split of the images every set uses: all, or a stratified subset."""
    if images is None:
        return np.arange(len(labels))
    if not 0 < images <= len(labels):
        raise UserError(f"shift.images: {images} must be between 1 and the {len(labels)} test images")
    return splits.stratified_take(labels, images, np.random.default_rng([seed, 3]))


def _npy(fileobj, what, bound: int) -> np.ndarray:
    """A plain .npy array from `fileobj` (a file or a tar member), its header read first: an
    array whose declared size (shape x item size) exceeds `bound` is refused before its data
    is allocated or read; then exactly that data is read into the array, nothing more."""
    fmt = np.lib.format
    try:
        version = fmt.read_magic(fileobj)
        shape, fortran, dtype = (fmt.read_array_header_1_0(fileobj) if version == (1, 0)
                                 else fmt.read_array_header_2_0(fileobj))
    except (OSError, ValueError, EOFError, TypeError) as err:
        raise UserError(f"shift.source: {what}: not a plain .npy array ({error_line(err)})") from None
    if dtype.hasobject:
        raise UserError(f"shift.source: {what}: not a plain .npy array (Python objects, a pickle)")
    if any(not isinstance(d, int) or d < 0 for d in shape):
        raise UserError(f"shift.source: {what}: not a plain .npy array (its header declares shape {shape})")
    count = int(np.prod(shape, dtype=object))
    declared = fileobj.tell() + count * dtype.itemsize
    if declared > bound:
        raise UserError(f"shift.source: {what}: declares {declared:,} bytes "
                        f"({' x '.join(map(str, shape))} {dtype}), more than the {bound:,} it can hold")
    array = np.empty(count, dtype=dtype)
    buffer, done = memoryview(array.view(np.uint8)), 0
    while done < len(buffer):
        n = fileobj.readinto(buffer[done:])
        if not n:
            raise UserError(f"shift.source: {what}: not a plain .npy array (its data ends after {done:,} "
                            f"of {len(buffer):,} bytes)")
        done += n
    return array.reshape(shape, order="F" if fortran else "C")


def _cifar10c_array(source: str, md5: str | None, name: str,
                    bounds: Limits | None = None) -> tuple[np.ndarray, np.ndarray]:
    """<name>.npy and labels.npy of a local CIFAR-10-C: from its folder, or read from inside the
    tar archive (MD5 checked, nothing extracted, arrays without pickles). Every file and member
    is held to `bounds` (default: CIFAR-10-C's own sizes, `limits.cifar10_c`): its size on disk
    or in the archive's header, and the size its .npy header declares, before it is read."""
    from torchvision.datasets.utils import check_integrity

    path = Path(source)
    bounds = bounds or limits.cifar10_c(name)

    def load_file(file: Path) -> np.ndarray:
        size, bound = file.stat().st_size, bounds.of(file.name)
        if size > bound:
            raise UserError(f"shift.source: {file}: {size:,} bytes, more than the {bound:,} it can hold")
        try:
            with open(file, "rb") as f:
                return _npy(f, file, bound)
        except OSError as err:
            raise UserError(f"shift.source: {file}: cannot read: {error_line(err)}") from None

    if path.is_dir():
        found = [p for p in (path / f"{name}.npy", path / "CIFAR-10-C" / f"{name}.npy") if p.is_file()]
        if not found:
            raise UserError(
                f"shift.source: {path}: no {name}.npy (CIFAR-10-C names its corruptions' files so)"
            )
        labels = found[0].parent / "labels.npy"
        if not labels.is_file():
            raise UserError(f"shift.source: {found[0].parent}: no labels.npy beside {name}.npy")
        return load_file(found[0]), load_file(labels)
    if not path.is_file():
        raise UserError(f"shift.source: {source}: no such file or folder")
    if md5 is None:
        raise UserError("shift.md5: required with an archive in shift.source (the MD5 its publisher lists)")
    if not check_integrity(str(path), md5):
        raise UserError(f"shift.source: {path}: checksum mismatch (expected MD5 {md5})")
    wanted = (f"{name}.npy", "labels.npy")
    try:
        with open_tar(path) as tar:
            members = {}
            for member in bounded_members(tar, bounds):  # each header checked; stops once both are seen
                if member.isfile() and Path(member.name).name in wanted:
                    members.setdefault(Path(member.name).name, member)
                if len(members) == len(wanted):
                    break
            arrays = []
            for file in wanted:
                if file not in members:
                    raise UserError(f"shift.source: {path}: no {file} in the archive")
                # streamed from the member: its header first, then its data, within its bound
                with tar.extractfile(members[file]) as f:
                    arrays.append(_npy(f, f"{path}:{members[file].name}", bounds.of(file)))
    except TooLarge as err:
        raise UserError(f"shift.source: {path}: {err}; nothing was read") from None
    except (tarfile.TarError, OSError, EOFError) as err:
        raise UserError(f"shift.source: {path}: cannot read: {error_line(err)}") from None
    return arrays[0], arrays[1]


def _from_cifar10c(dataset: str, spec: ShiftSetSpec, name: str, data: dict, index: np.ndarray) -> np.ndarray:
    if dataset != "cifar10":
        raise UserError(f"shift.source: CIFAR-10-C stands in for cifar10 only, not {dataset}")
    x, labels = _cifar10c_array(spec.source, spec.md5, name)
    if (
        x.dtype != np.uint8
        or x.shape != (5 * CIFAR10C_IMAGES, 32, 32, 3)
        or labels.shape != (5 * CIFAR10C_IMAGES,)
    ):
        rows = 5 * CIFAR10C_IMAGES
        raise UserError(
            f"shift.source: {name}.npy must be {rows} x 32 x 32 x 3 uint8 with {rows} labels, "
            f"got {x.dtype} {x.shape} and {labels.shape} labels"
        )
    original = data["test_index"][index]  # positions in the original CIFAR-10 test set
    rows = np.array([(s - 1) * CIFAR10C_IMAGES + original for s in SEVERITIES])
    if not np.array_equal(labels[rows], np.broadcast_to(data["y_test"][index], rows.shape)):
        raise UserError(f"shift.source: {name}.npy: its labels do not match the CIFAR-10 test split")
    return x[rows]


def make_shift_set(dataset: str, name: str, spec: ShiftSetSpec, data_path, out) -> np.ndarray:
    data = splits.load(data_path, ("x_test", "y_test", "test_index", "classes"))
    index = _subset(data["y_test"], spec.images, spec.seed)
    if spec.source is not None:
        x = _from_cifar10c(dataset, spec, name, data, index)
    else:
        c = spec.corruption
        x = corrupt_all(
            data["x_test"][index], c.transform, c.severities, spec.seed, name, f"shift.corruptions.{name}"
        )
    save_npz(out, x=x, y=data["y_test"][index], index=index)
    return x


# ------------------------------------------------------------------ shift.json
def _scores(d: dict) -> Scores:
    return Scores(
        accuracy=d["accuracy"],
        nll=d["nll"],
        brier=d["brier"],
        ece=d["ece"],
        scaled=Calibration(**d["scaled"]),
    )


def _mean_scores(scores: list[Scores]) -> Scores:
    def mean(get):
        return float(np.mean([get(s) for s in scores]))

    fields = ("accuracy", "nll", "brier", "ece")
    return Scores(
        **{f: mean(lambda s, f=f: getattr(s, f)) for f in fields},
        scaled=Calibration(**{f: mean(lambda s, f=f: getattr(s.scaled, f)) for f in fields}),
    )


def _vote(probs: np.ndarray, summary: EnsembleSummary) -> np.ndarray:
    """The chosen ensemble's predictions (probs: members x N x C): its first k members, voted as
    in ensemble.json, so that the clean accuracy here equals the ensemble's there."""
    members = probs[: summary.chosen_k]
    return VOTES[summary.method](members)


def set_scores(
    corruption: str,
    severity: int,
    probs: np.ndarray,
    labels: np.ndarray,
    summary: EnsembleSummary,
    n_bins: int,
    votes: np.ndarray,
) -> SetScores:
    """Every single model and the chosen ensemble (whose predictions are `votes`) on one set
    (probs: members x N x C)."""
    singles = [
        _scores(scored(p, labels, s.calibration.temperature, n_bins)) for p, s in zip(probs, summary.singles)
    ]
    averaged = probs[: summary.chosen_k].mean(0)
    ensemble = _scores(scored(averaged, labels, summary.calibration.temperature, n_bins, votes))
    return SetScores(
        corruption=corruption,
        severity=severity,
        singles=singles,
        single_mean=_mean_scores(singles),
        ensemble=ensemble,
    )


def _errors(sets: list[SetScores], corruptions: list[str], which: str) -> dict[str, np.ndarray]:
    return {
        c: np.array([1.0 - getattr(x, which).accuracy for x in sets if x.corruption == c])
        for c in corruptions
    }


def _single_error(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The mean single model's error (probs: members x ... x N x C): all the corruption error
    needs of the baseline."""
    return 1.0 - np.mean(probs.argmax(-1) == labels, axis=(0, -1))


def _corruption_errors(
    own: list[SetScores],
    clean: SetScores,
    base_err: dict[str, np.ndarray],
    base_clean_err: float,
    corruptions: list[str],
    baseline: str,
) -> CorruptionErrors:
    """`base_err`: {corruption: the baseline's mean single error per severity}."""
    out = {}
    for which in ("single_mean", "ensemble"):
        err, clean_err = _errors(own, corruptions, which), 1.0 - getattr(clean, which).accuracy
        out[which] = (
            {c: corruption_error(err[c], base_err[c]) for c in corruptions},
            {
                c: relative_corruption_error(err[c], clean_err, base_err[c], base_clean_err)
                for c in corruptions
            },
        )
    return CorruptionErrors(
        baseline=baseline,
        single=out["single_mean"][0],
        ensemble=out["ensemble"][0],
        mce_single=mean_defined(out["single_mean"][0].values()),
        mce_ensemble=mean_defined(out["ensemble"][0].values()),
        relative_mce_single=mean_defined(out["single_mean"][1].values()),
        relative_mce_ensemble=mean_defined(out["ensemble"][1].values()),
    )


def _all_sets(
    summary: EnsembleSummary,
    shift_probs: dict[str, np.ndarray],
    votes: dict[str, np.ndarray],
    labels: np.ndarray,
    clean_probs: np.ndarray,
    n_bins: int,
) -> tuple[SetScores, list[SetScores]]:
    clean = set_scores("none", 0, clean_probs, labels, summary, n_bins, _vote(clean_probs, summary))
    sets = [
        set_scores(c, s, probs[:, i], labels, summary, n_bins, votes[c][i])
        for c, probs in shift_probs.items()
        for i, s in enumerate(SEVERITIES)
    ]
    return clean, sets


def _read_shift(test_paths, shift_paths: dict, set_labels, index, y_test):
    """An experiment's clean test probs on the sets' images, and its shift probs."""
    test = load_members(test_paths, len(y_test), "the test split")[:, index]
    shift = {c: load_shift_probs(p, len(test_paths), len(set_labels)) for c, p in shift_paths.items()}
    return test, shift


def _gains(shift: dict, votes: dict, labels: np.ndarray, boot: np.ndarray) -> list[SeverityGain]:
    """Per severity, over all corruptions: mean single and ensemble accuracy, the paired gain."""
    gains = []
    for i, s in enumerate(SEVERITIES):
        singles = np.stack([probs[:, i].argmax(-1) == labels for probs in shift.values()], axis=1)
        ensemble = np.stack([v[i] == labels for v in votes.values()])
        gain = paired_gain(ensemble, singles, boot)
        gains.append(SeverityGain(severity=s, single_accuracy=float(np.mean(singles)),
                                  ensemble_accuracy=float(np.mean(ensemble)), gain=gain["gain"],
                                  ci=tuple(gain["ci"])))
    return gains


def _shared_images(set_paths: dict, corruptions: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(labels, positions in the test split) that every set shares."""
    sets = {c: load_shift_set(set_paths[c], images=False) for c in corruptions}
    first = sets[corruptions[0]]
    if any(not np.array_equal(d["index"], first["index"]) for d in sets.values()):
        raise UserError("shift: the corrupted sets hold different images; rebuild them "
                        "(snakemake --forcerun shift_set)")
    return first["y"], first["index"]


def shift_summary_to_file(experiment: str, summary_path, test_paths, shift_paths: dict, set_paths: dict,
                          data_path, spec: EnsembleSpec, baseline: BaselineFiles | None,
                          out_json) -> ShiftSummary:
    """shift.json of one experiment; `shift_paths`, `set_paths`: {corruption: file}."""
    corruptions = list(shift_paths)
    missing = [c for c in corruptions if c not in set_paths or (baseline and c not in baseline.shift)]
    if missing:
        raise UserError(f"shift: no corrupted set or baseline predictions for {missing[0]!r}")
    labels, index = _shared_images(set_paths, corruptions)
    y_test = splits.load(data_path, ("y_test", "classes"))["y_test"]
    summary = EnsembleSummary.load(summary_path)
    clean_probs, shift = _read_shift(test_paths, shift_paths, labels, index, y_test)
    votes = {c: np.stack([_vote(by_severity, summary) for by_severity in probs.swapaxes(0, 1)])
             for c, probs in shift.items()}  # {corruption: severities x N}, once for scores and gains
    clean, sets = _all_sets(summary, shift, votes, labels, clean_probs, spec.ece_bins)
    boot = bootstrap_indices(len(labels), spec.bootstrap, spec.bootstrap_seed)
    errors = None
    if baseline is not None:
        base_shift_paths = {c: baseline.shift[c] for c in corruptions}
        base_clean, base_shift = _read_shift(baseline.test, base_shift_paths, labels, index, y_test)
        base_err = {c: _single_error(probs, labels) for c, probs in base_shift.items()}
        errors = _corruption_errors(sets, clean, base_err, float(_single_error(base_clean, labels)),
                                    corruptions, baseline.name)
    result = ShiftSummary(experiment=experiment, seeds=summary.seeds, members=summary.members,
                          method=summary.method, images=len(labels), corruptions=corruptions, clean=clean,
                          sets=sets, by_severity=_gains(shift, votes, labels, boot),
                          corruption_error=errors)
    result.save(out_json)
    return result


# ------------------------------------------------------------------ diversity.json
def _stats(probs: np.ndarray, labels: np.ndarray, **matrices) -> DiversityStats:
    return DiversityStats(**diversity.summary(probs, labels, **matrices))


def diversity_to_file(
    seeds, test_paths, data_path, shift_paths: dict, set_paths: dict, out_json
) -> DiversitySummary:
    y_test = splits.load(data_path, ("y_test", "classes"))["y_test"]
    test = load_members(test_paths, len(y_test), "the test split")
    by_severity = {}
    if shift_paths:
        set_labels = {c: load_shift_set(set_paths[c], images=False)["y"] for c in shift_paths}
        shift = {c: load_shift_probs(p, len(test_paths), len(set_labels[c])) for c, p in shift_paths.items()}
        labels = np.concatenate([set_labels[c] for c in shift])  # pooled over corruptions
        for i, s in enumerate(SEVERITIES):
            probs = np.concatenate([shift[c][:, i] for c in shift], axis=1)
            by_severity[str(s)] = _stats(probs, labels)
    disagreement, kl = diversity.disagreement_matrix(test), diversity.kl_matrix(test)
    result = DiversitySummary(
        seeds=[int(s) for s in seeds],
        disagreement=disagreement.tolist(),
        kl=kl.tolist(),
        test=_stats(test, y_test, disagreement=disagreement, kl=kl),
        by_severity=by_severity,
    )
    result.save(out_json)
    return result
