"""The OOD stage: out-of-distribution sets, what every model and the chosen ensemble say about
them, and selective prediction (workflow/rules/ood.smk; formulas in docs/study.md 5.9-5.10).

- `make_ood_set`: one named OOD set (SVHN, CIFAR-100, scikit-learn's digits, or synthetic
  noise) at most `ood.images` images, fitted to the test split's shape -> an .npz
  (x: N x H x W x C uint8, `index`: the images' positions in their source).
- `stages.predict.predict_ood`: one experiment's members on one OOD set -> probabilities
  (members x N x C, float32).
- `ood_summary_to_file`: per OOD set and uncertainty score, AUROC, AUPR-In, AUPR-Out and
  FPR95 of every single model (mean, std over seeds) and of the chosen ensemble, each with a
  percentile bootstrap interval (in- and out-of-distribution images resampled
  independently), ROC curves, and AUROC against ensemble size -> ood.json.
- `selective_to_file`: risk-coverage curves, AURC and accuracy at fixed coverages of every
  single model and the chosen ensemble, on the clean test split and on the corrupted sets
  at `selective.severities` -> selective.json.
"""

from __future__ import annotations

import numpy as np

from ..analysis import uncertainty as u
from ..analysis.metrics import bootstrap_indices
from ..analysis.votes import VOTES, member_subsets
from ..config.spec import EnsembleSpec, OodSetSpec, SelectiveSpec, coverage_key
from ..errors import UserError
from ..files import splits
from ..files.arrays import load_members, load_ood_probs, load_shift_probs, load_shift_set
from ..files.ensemble_summary import Bootstrap, EnsembleSummary, Spread
from ..files.ood_data import (
    load_cifar100_test,
    load_digits,
    load_ood_set,
    load_svhn,
    save_ood_set,
)
from ..files.ood_summary import (
    EnsembleMetric,
    EnsembleSelective,
    MeanStd,
    OodSetResult,
    OodSummary,
    RocCurves,
    ScoreResult,
    SelectiveCurve,
    SelectiveSummary,
    SingleMetric,
    SingleSelective,
    SizeCurve,
)
from ..transforms.corruptions import SEVERITIES

LEVEL = 0.95
ROC_GRID = np.linspace(0.0, 1.0, 101)
COVERAGE_GRID = np.linspace(0.01, 1.0, 100)
POSITIVE_CLASS = {
    "auroc": "in-distribution positive, confidence score (MSP, or minus an uncertainty); equals the "
             "AUROC of detecting OOD with the uncertainty",
    "aupr_in": "in-distribution positive, confidence score",
    "aupr_out": "OOD positive, uncertainty score (minus the confidence)",
    "fpr95": "share of OOD images accepted at the confidence threshold that keeps 95% of the "
             "in-distribution images (in-distribution positive, TPR 95%); lower is better",
}


# ------------------------------------------------------------------ the sets
def _resized(images: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 N x h x w x C -> N x height x width x C, bilinear with antialiasing (torch)."""
    if images.shape[1:3] == (height, width):
        return images
    import torch
    import torch.nn.functional as F

    out = []
    for start in range(0, len(images), 1024):
        x = torch.from_numpy(images[start:start + 1024]).permute(0, 3, 1, 2).float()
        y = F.interpolate(x, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
        out.append(y.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy())
    return np.concatenate(out)


def fit_to(images: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Images of any size and 1 or 3 channels as the test split's H x W x C: resized, then
    gray from RGB by luminance (ITU-R 601: 0.299 R + 0.587 G + 0.114 B) or RGB from gray."""
    height, width, channels = shape
    x = _resized(images, height, width)
    if x.shape[-1] == 3 and channels == 1:
        gray = x.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        x = np.round(gray).clip(0, 255).astype(np.uint8)[..., None]
    elif x.shape[-1] == 1 and channels == 3:
        x = np.repeat(x, 3, axis=-1)
    return np.ascontiguousarray(x)


def _noise(kind: str, n: int, shape: tuple[int, int, int], sigma: float | None, seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, 5, 0 if kind == "uniform_noise" else 1])
    if kind == "uniform_noise":
        return rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
    from scipy.ndimage import gaussian_filter

    x = gaussian_filter(rng.random((n, *shape)), sigma=(0, sigma, sigma, 0), mode="wrap")
    lo = x.min(axis=(1, 2, 3), keepdims=True)
    hi = x.max(axis=(1, 2, 3), keepdims=True)
    return np.round(255 * (x - lo) / np.maximum(hi - lo, 1e-12)).astype(np.uint8)


def _source_images(name: str, spec: OodSetSpec) -> np.ndarray:
    s = spec.set
    if s.kind == "svhn":
        return load_svhn(name, s.source, s.url, s.md5)
    if s.kind == "cifar100":
        return load_cifar100_test(name, s.source, s.url, s.md5)
    return load_digits()


def make_ood_set(name: str, spec: OodSetSpec, data_path, out) -> np.ndarray:
    """One OOD set at the test split's shape in `out` (atomic: nothing is written on error)."""
    x_test = splits.load(data_path, ("x_test", "classes"))["x_test"]
    shape = x_test.shape[1:]
    if spec.set.kind in ("uniform_noise", "smooth_noise"):
        n = spec.images if spec.images is not None else len(x_test)
        x, index = _noise(spec.set.kind, n, shape, spec.set.sigma, spec.seed), np.arange(n)
    else:
        raw = _source_images(name, spec)
        index = np.arange(len(raw))
        if spec.images is not None and spec.images < len(raw):
            rng = np.random.default_rng([spec.seed, 4])
            index = np.sort(rng.choice(len(raw), size=spec.images, replace=False))
        x = fit_to(raw[index], shape)
    save_ood_set(out, x, index)
    return x


# ------------------------------------------------------------------ ood.json
def _conf(probs: np.ndarray, names) -> dict[str, np.ndarray]:
    scores = u.uncertainty_scores(probs)
    return {n: u.confidence(n, scores[n]) for n in names}


def _single_results(test, ood, boot_in, boot_out) -> tuple[dict, dict]:
    """{score: {metric: SingleMetric}} and {score: mean ROC} of the single models."""
    per_seed = {n: {m: [] for m in u.METRICS} for n in u.SINGLE_SCORES}
    resampled = {n: {m: [] for m in u.METRICS} for n in u.SINGLE_SCORES}
    roc = {n: [] for n in u.SINGLE_SCORES}
    for member in range(test.shape[0]):
        c_in, c_out = _conf(test[member:member + 1], u.SINGLE_SCORES), _conf(ood[member:member + 1],
                                                                            u.SINGLE_SCORES)
        for n in u.SINGLE_SCORES:
            for m, v in u.detection_metrics(c_in[n], c_out[n]).items():
                per_seed[n][m].append(v)
            for m, v in u.bootstrap_detection(c_in[n], c_out[n], boot_in, boot_out).items():
                resampled[n][m].append(v)
            roc[n].append(u.roc_points(c_in[n], c_out[n], ROC_GRID))
    results = {}
    for n in u.SINGLE_SCORES:
        results[n] = {}
        for m in u.METRICS:
            values = np.asarray(per_seed[n][m])
            results[n][m] = SingleMetric(
                mean=float(values.mean()), std=float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                per_seed=values.tolist(),
                ci=u.percentile_ci(np.mean(resampled[n][m], axis=0), LEVEL))
    return results, {n: np.mean(roc[n], axis=0).tolist() for n in u.SINGLE_SCORES}


def _by_size(test, ood, spec: EnsembleSpec) -> dict[str, SizeCurve]:
    m = test.shape[0]
    first = {n: [] for n in u.SCORES}
    spread = {n: {"mean": [], "std": [], "min": [], "max": []} for n in u.SCORES}
    counts = []
    for k in range(1, m + 1):
        c_in, c_out = _conf(test[:k], u.SCORES), _conf(ood[:k], u.SCORES)
        for n in u.SCORES:
            first[n].append(u.auroc(c_in[n], c_out[n]))
        subsets, _ = member_subsets(m, k, spec.max_subsets, spec.subset_seed)
        values = {n: [] for n in u.SCORES}
        for subset in subsets:
            s_in, s_out = _conf(test[subset], u.SCORES), _conf(ood[subset], u.SCORES)
            for n in u.SCORES:
                values[n].append(u.auroc(s_in[n], s_out[n]))
        counts.append(len(subsets))
        for n in u.SCORES:
            v = np.asarray(values[n])
            for key, f in (("mean", np.mean), ("std", np.std), ("min", np.min), ("max", np.max)):
                spread[n][key].append(float(f(v)))
    return {n: SizeCurve(first_k=first[n], subsets=Spread(**spread[n]), subset_counts=counts)
            for n in u.SCORES}


def set_result(name: str, kind: str, test: np.ndarray, ood: np.ndarray, summary: EnsembleSummary,
               spec: EnsembleSpec) -> OodSetResult:
    """One OOD set (ood: members x N_out x C) against the test split (test: members x N_in x C)."""
    boot_in = bootstrap_indices(test.shape[1], spec.bootstrap, spec.bootstrap_seed)
    boot_out = bootstrap_indices(ood.shape[1], spec.bootstrap, spec.bootstrap_seed + 1)
    singles, single_roc = _single_results(test, ood, boot_in, boot_out)
    k = summary.chosen_k
    c_in, c_out = _conf(test[:k], u.SCORES), _conf(ood[:k], u.SCORES)
    scores, ensemble_roc = {}, {}
    for n in u.SCORES:
        point = u.detection_metrics(c_in[n], c_out[n])
        resampled = u.bootstrap_detection(c_in[n], c_out[n], boot_in, boot_out)
        scores[n] = ScoreResult(
            single=singles.get(n),
            ensemble={m: EnsembleMetric(value=point[m], ci=u.percentile_ci(resampled[m], LEVEL))
                      for m in u.METRICS})
        ensemble_roc[n] = u.roc_points(c_in[n], c_out[n], ROC_GRID).tolist()
    return OodSetResult(set=name, kind=kind, images=int(ood.shape[1]), scores=scores,
                        roc=RocCurves(fpr=ROC_GRID.tolist(), single=single_roc, ensemble=ensemble_roc),
                        by_size=_by_size(test, ood, spec))


def ood_summary_to_file(experiment: str, summary_path, test_paths, ood_paths: dict, set_paths: dict,
                        kinds: dict, data_path, spec: EnsembleSpec, out_json) -> OodSummary:
    """ood.json of one experiment; `ood_paths`, `set_paths`, `kinds`: {set: file or kind}."""
    missing = [s for s in ood_paths if s not in set_paths or s not in kinds]
    if missing:
        raise UserError(f"ood: no prepared set or kind for {missing[0]!r}")
    data = splits.load(data_path, ("y_test", "classes"))
    summary = EnsembleSummary.load(summary_path)
    test = load_members(test_paths, len(data["y_test"]), "the test split")
    results = []
    for name, path in ood_paths.items():
        images = load_ood_set(set_paths[name], images=False)[0]  # counted from its header
        ood = load_ood_probs(path, test.shape[0], images, test.shape[2])
        results.append(set_result(name, kinds[name], test, ood, summary, spec))
    result = OodSummary(
        experiment=experiment, seeds=summary.seeds, members=summary.members, method=summary.method,
        in_distribution="the test split", in_images=int(test.shape[1]), positive_class=POSITIVE_CLASS,
        score_names={n: d for n, (d, _) in u.SCORES.items()},
        bootstrap=Bootstrap(resamples=spec.bootstrap, seed=spec.bootstrap_seed, level=LEVEL), sets=results)
    result.save(out_json)
    return result


# ------------------------------------------------------------------ selective.json
def _vote(probs: np.ndarray, summary: EnsembleSummary) -> np.ndarray:
    """The chosen ensemble's predictions: its first k members, voted as in ensemble.json."""
    members = probs[: summary.chosen_k]
    return VOTES[summary.method](members)


def _mean_std(values) -> MeanStd:
    v = np.asarray(values, dtype=np.float64)
    return MeanStd(mean=float(v.mean()), std=float(v.std(ddof=1)) if len(v) > 1 else 0.0, per_seed=v.tolist())


def selective_curve(set_name: str, severity: int, probs: np.ndarray, labels: np.ndarray,
                    summary: EnsembleSummary, coverages) -> SelectiveCurve:
    """Single models ranked by their MSP; the chosen ensemble by the mean probability its
    members give the class it votes for (its MSP under soft voting)."""
    accuracy, aurcs, at, risks = [], [], {coverage_key(c): [] for c in coverages}, []
    for p in probs:
        correct = p.argmax(-1) == labels
        r = u.risk_coverage(p.max(-1), correct)
        accuracy.append(float(correct.mean()))
        aurcs.append(u.aurc(r))
        for c in coverages:
            at[coverage_key(c)].append(u.accuracy_at(r, c))
        risks.append(u.risk_at(r, COVERAGE_GRID))
    single = SingleSelective(accuracy=_mean_std(accuracy), aurc=_mean_std(aurcs),
                             accuracy_at={c: _mean_std(v) for c, v in at.items()},
                             risk=np.mean(risks, axis=0).tolist())
    vote = _vote(probs, summary)
    mean = probs[: summary.chosen_k].mean(0, dtype=np.float64)
    conf = np.take_along_axis(mean, vote[:, None], axis=-1)[:, 0]
    correct = vote == labels
    r = u.risk_coverage(conf, correct)
    ensemble = EnsembleSelective(accuracy=float(correct.mean()), aurc=u.aurc(r),
                                 optimal_aurc=u.optimal_aurc(correct),
                                 accuracy_at={coverage_key(c): u.accuracy_at(r, c) for c in coverages},
                                 risk=u.risk_at(r, COVERAGE_GRID).tolist())
    return SelectiveCurve(set=set_name, severity=severity, images=int(len(labels)), single=single,
                          ensemble=ensemble)


def selective_to_file(experiment: str, summary_path, test_paths, data_path, shift_paths: dict,
                      set_paths: dict, spec: SelectiveSpec, out_json) -> SelectiveSummary:
    """selective.json of one experiment; `shift_paths`, `set_paths`: {corruption: file} ({}: clean only)."""
    y_test = splits.load(data_path, ("y_test", "classes"))["y_test"]
    summary = EnsembleSummary.load(summary_path)
    test = load_members(test_paths, len(y_test), "the test split")
    curves = [selective_curve("clean", 0, test, y_test, summary, spec.coverages)]
    if shift_paths:
        missing = [c for c in shift_paths if c not in set_paths]
        if missing:
            raise UserError(f"selective: no corrupted set for {missing[0]!r}")
        labels = {c: load_shift_set(set_paths[c], images=False)["y"] for c in shift_paths}
        shift = {c: load_shift_probs(p, test.shape[0], len(labels[c])) for c, p in shift_paths.items()}
        pooled_labels = np.concatenate([labels[c] for c in shift])
        for s in spec.severities:
            i = SEVERITIES.index(s)
            probs = np.concatenate([shift[c][:, i] for c in shift], axis=1)
            curves.append(selective_curve(f"severity {s}", s, probs, pooled_labels, summary, spec.coverages))
    result = SelectiveSummary(
        experiment=experiment, seeds=summary.seeds, members=summary.members, method=summary.method,
        confidence="single models: maximum softmax probability; ensemble: the mean probability of the "
                   "class it votes for",
        corruptions=list(shift_paths), grid=COVERAGE_GRID.tolist(), curves=curves)
    result.save(out_json)
    return result
