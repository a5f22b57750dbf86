"""ood.json and selective.json from saved probabilities: single models against the chosen
ensemble, ensemble size, the stated conventions, and damaged input named in one line."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from conftest import ensemble_spec, make_data

from cifar_ensembles.analysis import uncertainty as u
from cifar_ensembles.analysis.votes import soft_vote
from cifar_ensembles.config.convert import from_data
from cifar_ensembles.config.spec import SelectiveSpec
from cifar_ensembles.errors import UserError
from cifar_ensembles.files import splits
from cifar_ensembles.files.atomic import save_npy, save_npz
from cifar_ensembles.files.ensemble_summary import EnsembleSummary
from cifar_ensembles.files.ood_data import save_ood_set
from cifar_ensembles.files.ood_summary import OodSummary, SelectiveSummary
from cifar_ensembles.files.records import DamagedFile
from cifar_ensembles.stages.ensemble import ensemble_to_files
from cifar_ensembles.stages.ood import ood_summary_to_file, selective_to_file

M, N_TEST, N_OOD, C = 3, 60, 40, 10


def _probs(rng, labels, sharpness):
    """Members' probabilities that favour `labels` (None: no class) by `sharpness`."""
    logits = rng.normal(0, 1, (M, len(labels), C))
    if labels is not None:
        logits[:, np.arange(len(labels)), labels] += sharpness
    e = np.exp(logits)
    return (e / e.sum(-1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ood_stage")
    rng = np.random.default_rng(0)
    data = make_data(n_test=N_TEST, n_val=40, size=8, channels=1)
    splits.write(tmp / "data.npz", data)
    val, test = _probs(rng, data["y_val"], 3.0), _probs(rng, data["y_test"], 3.0)
    seeds = list(range(M))
    val_paths, test_paths = [tmp / f"v{s}.npy" for s in seeds], [tmp / f"t{s}.npy" for s in seeds]
    for s in seeds:
        save_npy(val_paths[s], val[s])
        save_npy(test_paths[s], test[s])
    spec = ensemble_spec(bootstrap=50)
    ensemble_to_files(tmp / "data.npz", seeds, val_paths, test_paths, spec, tmp / "e.csv",
                      tmp / "ensemble.json")
    ood = _probs(rng, rng.integers(0, C, N_OOD), 0.5)  # flat: uncertain
    save_npy(tmp / "ood.npy", ood)
    save_ood_set(tmp / "set.npz", np.zeros((N_OOD, 8, 8, 1), np.uint8), np.arange(N_OOD))
    summary = ood_summary_to_file("exp", tmp / "ensemble.json", test_paths, {"flat": str(tmp / "ood.npy")},
                                  {"flat": str(tmp / "set.npz")}, {"flat": "digits"}, tmp / "data.npz",
                                  spec, tmp / "ood.json")
    return dict(tmp=tmp, data=data, test=test, ood=ood, spec=spec, summary=summary, test_paths=test_paths,
                ensemble=EnsembleSummary.load(tmp / "ensemble.json"))


def test_ood_json_reads_back_with_its_conventions(experiment):
    summary = OodSummary.load(experiment["tmp"] / "ood.json")
    assert summary == experiment["summary"]
    assert summary.in_images == N_TEST and summary.bootstrap.resamples == 50
    assert "in-distribution positive" in summary.positive_class["auroc"]
    assert "OOD positive" in summary.positive_class["aupr_out"]
    [s] = summary.sets
    assert (s.set, s.kind, s.images) == ("flat", "digits", N_OOD)
    assert set(s.scores) == set(u.SCORES)


def test_single_models_are_each_seed_then_mean_and_std(experiment):
    [s] = experiment["summary"].sets
    test, ood = experiment["test"], experiment["ood"]
    for score in u.SINGLE_SCORES:
        per_seed = [u.detection_metrics(u.confidence(score, u.uncertainty_scores(test[m:m + 1])[score]),
                                        u.confidence(score, u.uncertainty_scores(ood[m:m + 1])[score]))
                    for m in range(M)]
        for metric in u.METRICS:
            single = s.scores[score].single[metric]
            values = [p[metric] for p in per_seed]
            assert single.per_seed == pytest.approx(values)
            assert single.mean == pytest.approx(np.mean(values))
            assert single.std == pytest.approx(np.std(values, ddof=1))
            assert single.ci[0] <= single.ci[1]
    for score in ("aleatoric", "epistemic", "disagreement"):
        assert s.scores[score].single is None  # ensemble-only scores


def test_the_ensemble_is_the_chosen_one_and_by_size_agrees(experiment):
    [s] = experiment["summary"].sets
    k = experiment["ensemble"].chosen_k
    test, ood = experiment["test"][:k], experiment["ood"][:k]
    for score in u.SCORES:
        expected = u.detection_metrics(u.confidence(score, u.uncertainty_scores(test)[score]),
                                       u.confidence(score, u.uncertainty_scores(ood)[score]))
        ensemble = s.scores[score].ensemble
        assert {m: ensemble[m].value for m in u.METRICS} == pytest.approx(expected)
        lo, hi = ensemble["auroc"].ci
        assert lo <= hi
        curve = s.by_size[score]
        assert curve.first_k[k - 1] == pytest.approx(ensemble["auroc"].value)
        assert curve.subset_counts == [3, 3, 1]
        assert curve.subsets.mean[-1] == pytest.approx(curve.first_k[-1])  # one subset of all members
    # one member: mutual information and disagreement are 0 everywhere, so AUROC is chance
    assert s.by_size["epistemic"].first_k[0] == 0.5 and s.by_size["disagreement"].first_k[0] == 0.5
    # flat OOD predictions are easy to detect
    assert s.scores["entropy"].ensemble["auroc"].value > 0.9
    assert len(s.roc.fpr) == len(s.roc.ensemble["entropy"]) == len(s.roc.single["msp"])


def test_damaged_ood_probabilities_are_named(experiment, tmp_path):
    tmp = experiment["tmp"]
    save_npy(tmp_path / "bad.npy", experiment["ood"][:2])  # 2 members, not 3
    with pytest.raises(UserError, match=r"bad\.npy: damaged OOD probabilities .*expected 3 members"):
        ood_summary_to_file("exp", tmp / "ensemble.json", experiment["test_paths"],
                            {"flat": str(tmp_path / "bad.npy")}, {"flat": str(tmp / "set.npz")},
                            {"flat": "digits"}, tmp / "data.npz", experiment["spec"], tmp_path / "ood.json")
    assert not (tmp_path / "ood.json").exists()


def test_selective_on_clean_and_corrupted_images(experiment, tmp_path):
    tmp, data, test = experiment["tmp"], experiment["data"], experiment["test"]
    rng = np.random.default_rng(1)
    index = np.arange(0, N_TEST, 2)
    shift, sets = {}, {}
    for c in ("noise", "blur"):
        save_npz(tmp_path / f"{c}.npz", x=np.zeros((5, len(index), 8, 8, 1), np.uint8),
                 y=data["y_test"][index], index=index)
        probs = np.stack([_probs(rng, data["y_test"][index], 3.0 - s / 2) for s in range(5)], axis=1)
        save_npy(tmp_path / f"{c}.npy", probs)
        shift[c], sets[c] = str(tmp_path / f"{c}.npy"), str(tmp_path / f"{c}.npz")
    spec = from_data(SelectiveSpec, {"severities": [3, 5], "coverages": [0.9, 0.95]})
    result = selective_to_file("exp", tmp / "ensemble.json", experiment["test_paths"], tmp / "data.npz",
                               shift, sets, spec, tmp_path / "selective.json")
    assert SelectiveSummary.load(tmp_path / "selective.json") == result
    assert [(c.set, c.severity, c.images) for c in result.curves] == [
        ("clean", 0, N_TEST), ("severity 3", 3, 2 * len(index)), ("severity 5", 5, 2 * len(index))]
    clean, ensemble = result.curves[0], experiment["ensemble"]
    assert clean.ensemble.accuracy == pytest.approx(ensemble.test_accuracy)  # the chosen ensemble
    y = data["y_test"]
    for m in range(M):
        risks = u.risk_coverage(test[m].max(-1), test[m].argmax(-1) == y)
        assert clean.single.aurc.per_seed[m] == pytest.approx(u.aurc(risks))
        assert clean.single.accuracy_at["0.9"].per_seed[m] == pytest.approx(u.accuracy_at(risks, 0.9))
    k = ensemble.chosen_k
    vote = soft_vote(test[:k])
    assert clean.ensemble.optimal_aurc <= clean.ensemble.aurc
    assert clean.ensemble.optimal_aurc == pytest.approx(u.optimal_aurc(vote == y))
    assert len(clean.ensemble.risk) == len(result.grid) == 100
    assert clean.ensemble.risk[-1] == pytest.approx(1 - clean.ensemble.accuracy)
    # without the shift stage: the clean curve only
    alone = selective_to_file("exp", tmp / "ensemble.json", experiment["test_paths"], tmp / "data.npz",
                              {}, {}, spec, tmp_path / "alone.json")
    assert [c.set for c in alone.curves] == ["clean"] and alone.corruptions == []


@pytest.mark.parametrize("edit, problem", [
    (lambda s: s["scores"].pop("disagreement"), "scores and by_size must name every score"),
    (lambda s: s["by_size"].pop("msp"), "scores and by_size must name every score"),
    (lambda s: s["roc"]["ensemble"].pop("epistemic"), "ROC curves do not fit the scores"),
    (lambda s: s["roc"]["single"]["msp"].pop(), "ROC curves are not one value per FPR"),
    (lambda s: s["scores"]["msp"]["single"].pop("fpr95"), "the single models lack metrics"),
])
def test_a_hand_edited_ood_json_that_does_not_fit_together_is_one_line(experiment, tmp_path, edit, problem):
    """Every field has its type, yet the parts do not fit: refused on load, before a figure or
    the summary reads a score that is not there."""
    data = json.loads((experiment["tmp"] / "ood.json").read_text())
    edit(data["sets"][0])
    path = tmp_path / "ood.json"
    path.write_text(json.dumps(data))
    with pytest.raises(DamagedFile, match=re.escape(problem)):
        OodSummary.load(path)
