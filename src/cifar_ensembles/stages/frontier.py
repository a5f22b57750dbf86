"""The frontier stage: what each way of spending compute buys (workflow/rules/frontier.smk;
docs/study.md 5.11).

- `methods_to_file`: per experiment, every method its members allow (single, single + TTA,
  SWA, snapshot ensemble, and each pooled over the first k seeds), scored alike: test
  accuracy with a 95% bootstrap interval, NLL, ECE before and after temperature scaling
  fitted on validation, an exact McNemar test against the first single model, mean accuracy,
  NLL and ECE over the corrupted sets, AUROC of the predictive entropy on each OOD set
  -> methods.json.
- `frontier_to_file`: every experiment's methods with their cost (training passes and
  seconds of the runs they need, prediction passes per image) and the Pareto front of
  training cost against accuracy, NLL and ECE -> frontier.json.
"""

from __future__ import annotations

import numpy as np

from ..analysis import uncertainty as u
from ..analysis.methods import Group, method_groups, pareto_front
from ..analysis.metrics import (
    accuracy,
    bootstrap_ci,
    bootstrap_indices,
    expected_calibration_error,
    fit_temperature,
    mcnemar,
    nll,
    temperature_scale,
)
from ..config.spec import RunCostSpec, ScoringSpec
from ..errors import UserError
from ..files import splits
from ..files.arrays import (
    load_members,
    load_ood_probs,
    load_shift_probs,
    load_shift_set,
)
from ..files.frontier_summary import (
    FRONT_METRICS,
    Frontier,
    FrontierPoint,
    MethodScores,
    MethodsSummary,
    Paired,
    ShiftScores,
)
from ..files.training_run import read_benchmark_seconds
from ..transforms.corruptions import SEVERITIES

COST = ("train_passes: forward-backward passes over images of every run a method needs (SAM/ASAM "
        "count two per step; SWA's one BatchNorm pass is not counted); train_seconds: those "
        "training jobs' wall-clock seconds; predict_passes: forward passes per predicted image "
        "(members x test-time views)")


def _instance_probs(probs: np.ndarray, group: Group) -> list[np.ndarray]:
    """Each instance's averaged probabilities (probs: members x ... x C)."""
    return [probs[list(rows)].mean(axis=0, dtype=np.float64) for rows in group.instances]


def _shift_scores(groups: list[Group], shift: dict, n_bins: int) -> list[ShiftScores] | None:
    """Per group, the means over every (corruption, severity) set of its instances' accuracy,
    NLL and ECE (one corruption's probabilities in memory at a time)."""
    if not shift:
        return None
    sums = np.zeros((len(groups), 3))
    sets = 0
    for probs, labels in shift.values():  # a loader per corruption: members x 5 x N x C
        p = probs()
        for s in range(len(SEVERITIES)):
            for g, group in enumerate(groups):
                scores = [(accuracy(q, labels), nll(q, labels), expected_calibration_error(q, labels, n_bins))
                          for q in _instance_probs(p[:, s], group)]
                sums[g] += np.mean(scores, axis=0)
            sets += 1
    return [ShiftScores(accuracy=float(a / sets), nll=float(n / sets), ece=float(e / sets), sets=sets)
            for a, n, e in sums]


def _ood_auroc(group: Group, test: np.ndarray, ood: dict[str, np.ndarray]) -> dict[str, float]:
    """Per OOD set, the mean over instances of the AUROC of the averaged prediction's entropy."""
    if not ood:
        return {}
    confidence_in = [-u.entropy(t) for t in _instance_probs(test, group)]  # once for every set
    return {name: float(np.mean([u.auroc(c, -u.entropy(o))
                                 for c, o in zip(confidence_in, _instance_probs(probs, group))]))
            for name, probs in ood.items()}


def _score(group: Group, val, y_val, test, y_test, single_correct, boot, spec: ScoringSpec,
           views: int) -> dict:
    vals, tests = _instance_probs(val, group), _instance_probs(test, group)
    correct = np.stack([t.argmax(-1) == y_test for t in tests])
    temperatures = [fit_temperature(v, y_val) for v in vals]
    return dict(
        method=group.method, variant=group.variant, seeds=group.seeds, members=group.members,
        views=views if group.variant == "tta" else 1, instances=len(group.instances),
        val_accuracy=float(np.mean([accuracy(v, y_val) for v in vals])),
        test_accuracy=float(correct.mean()), test_ci=bootstrap_ci(correct.mean(axis=0), boot),
        test_nll=float(np.mean([nll(t, y_test) for t in tests])),
        test_ece=float(np.mean([expected_calibration_error(t, y_test, spec.ece_bins) for t in tests])),
        temperature=float(np.mean(temperatures)),
        test_ece_temperature=float(np.mean([expected_calibration_error(temperature_scale(t, T), y_test,
                                                                       spec.ece_bins)
                                            for t, T in zip(tests, temperatures)])),
        vs_single=Paired(**mcnemar(correct[0], single_correct)))


def methods_to_file(experiment: str, data_path, seeds: list[int], val_paths, test_paths,
                    extras: list[tuple[int, str]], extra_val, extra_test, shift: dict, shift_sets: dict,
                    ood: dict, spec: ScoringSpec, tta_views: int, out) -> MethodsSummary:
    """`extras`: (seed index, member name) of each extra member, in the order of `extra_val`,
    `extra_test` and the rows of the extra members' files; `shift`/`ood`: {set: [the final
    models' probabilities, the extra members' (when there are any)]} (members x ... x C each);
    `shift_sets`: {corruption: its set} (for the labels)."""
    if not (len(seeds) == len(val_paths) == len(test_paths)) or not (
            len(extras) == len(extra_val) == len(extra_test)):
        raise UserError("methods: need one val and one test prediction file per seed and per extra member")
    data = splits.load(data_path, ("y_val", "y_test", "classes"))
    y_val, y_test = data["y_val"], data["y_test"]
    n = len(seeds)
    val = load_members([*val_paths, *extra_val], len(y_val), "the validation split")
    test = load_members([*test_paths, *extra_test], len(y_test), "the test split")
    groups = method_groups(n, extras)
    boot = bootstrap_indices(len(y_test), spec.bootstrap, spec.bootstrap_seed)
    single_correct = test[0].argmax(-1) == y_test
    scores = [_score(g, val, y_val, test, y_test, single_correct, boot, spec, tta_views) for g in groups]

    def shift_loader(corruption, files):
        if corruption not in shift_sets or len(files) != 1 + bool(extras):
            raise UserError(f"methods: {corruption}: need its set, the final models' and the extra members' "
                            "probabilities")
        labels = load_shift_set(shift_sets[corruption], images=False)["y"]

        def load():
            plain = load_shift_probs(files[0], n, len(labels))
            if not extras:
                return plain
            return np.concatenate([plain, load_shift_probs(files[1], len(extras), len(labels))])
        return load, labels

    shift_scores = _shift_scores(groups, {c: shift_loader(c, f) for c, f in shift.items()}, spec.ece_bins)
    ood_probs = {}
    for name, files in ood.items():
        if len(files) != 1 + bool(extras):
            raise UserError(f"methods: OOD set {name}: need the final models' and the extra members' "
                            "probabilities")
        plain = load_ood_probs(files[0], n, None, test.shape[2])  # the final models' file sets the count
        ood_probs[name] = np.concatenate([plain, load_ood_probs(files[1], len(extras), plain.shape[1],
                                                                test.shape[2])]) if extras else plain
    summary = MethodsSummary(
        experiment=experiment, seeds=[int(s) for s in seeds], tta_views=tta_views,
        methods=[MethodScores(**s, shift=shift_scores[i] if shift_scores else None,
                              ood_auroc=_ood_auroc(g, test, ood_probs))
                 for i, (g, s) in enumerate(zip(groups, scores))])
    summary.save(out)
    return summary


# ------------------------------------------------------------------ the frontier
def _run_seconds(runs: dict[str, dict[str, str]], seeds: list[int]) -> list[float]:
    """The training jobs' seconds in the order of `seeds` (the config's: pooled methods take the first k)."""
    return [read_benchmark_seconds(runs[str(seed)]["benchmark"]) for seed in seeds]


def frontier_to_file(methods: dict[str, str], runs: dict[str, dict[str, dict[str, str]]],
                     costs: dict[str, RunCostSpec], data_path, out) -> Frontier:
    """`methods`: {experiment: methods.json}; `runs`: {experiment: {seed: {benchmark, ...}}};
    `costs`: {experiment: what its runs' device-independent cost depends on}."""
    train_images = len(splits.load(data_path, ("y_train",))["y_train"])
    points = []
    for experiment, path in methods.items():
        summary = MethodsSummary.load(path)
        if experiment not in runs or experiment not in costs:
            raise UserError(f"frontier: no runs or cost spec for experiment {experiment!r}")
        if set(runs[experiment]) != {str(s) for s in summary.seeds}:
            raise UserError(f"{path}: seeds {summary.seeds} differ from the runs given for {experiment}")
        per_run = costs[experiment].train_passes(train_images)
        seconds = _run_seconds(runs[experiment], summary.seeds)
        for m in summary.methods:
            runs_used = seconds[:m.seeds] if m.seeds > 1 else seconds
            cost_seconds = float(np.sum(runs_used)) if m.seeds > 1 else float(np.mean(runs_used))
            points.append(dict(experiment=experiment, method=m.method, seeds=m.seeds, members=m.members,
                               train_passes=per_run * m.seeds, train_seconds=round(cost_seconds, 3),
                               predict_passes=m.members * m.views, test_accuracy=m.test_accuracy,
                               test_ci=m.test_ci, test_nll=m.test_nll, test_ece=m.test_ece))
    costs = [p["train_passes"] for p in points]
    fronts = {metric: pareto_front(costs, [p[f"test_{metric}"] for p in points], higher)
              for metric, higher in FRONT_METRICS.items()}
    frontier = Frontier(cost=COST, points=[
        FrontierPoint(**p, pareto={metric: bool(front[i]) for metric, front in fronts.items()})
        for i, p in enumerate(points)])
    frontier.save(out)
    return frontier
