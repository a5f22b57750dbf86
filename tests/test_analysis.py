"""Member subsets, greedy selection and the ensemble/compare stages, against direct loops;
and the probability files those stages read back, damaged in every way a file can be."""

from __future__ import annotations

import csv
import itertools
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    assert_damaged,
    cli,
    dyadic_probs,
    ensemble_spec,
    ref_accuracy,
    ref_hard_vote,
    ref_nll,
    ref_soft_vote,
)

from cifar_ensembles.analysis.metrics import expected_calibration_error, mcnemar
from cifar_ensembles.analysis.votes import (
    first_k_accuracy,
    greedy_selection,
    hard_vote,
    member_subsets,
    soft_vote,
    subset_accuracies,
    subset_curve,
)
from cifar_ensembles.cli import main
from cifar_ensembles.config.convert import from_data, to_data, to_json
from cifar_ensembles.errors import UserError
from cifar_ensembles.files.arrays import load_members, load_probabilities, read_labels
from cifar_ensembles.files.ensemble_summary import SUMMARY_FORMAT, Bootstrap, Comparisons, EnsembleSummary
from cifar_ensembles.files.records import DamagedFile
from cifar_ensembles.stages.ensemble import analyse, compare_to_files, ensemble_to_files

# ---------------------------------------------------------------- references (plain loops; the
# votes, accuracy and NLL are conftest's)


REF_VOTE = {"soft": ref_soft_vote, "hard": ref_hard_vote}


def ref_nll_of_mean(probs, members, labels):
    """The NLL of the members' mean probabilities."""
    members = list(members)
    return ref_nll(sum(probs[j] for j in members) / len(members), labels)


def ref_greedy(probs, labels):
    """Brute-force forward selection: try every remaining member, keep the lowest NLL (first on ties)."""
    chosen, curve = [], []
    for _ in range(probs.shape[0]):
        scores = {j: ref_nll_of_mean(probs, chosen + [j], labels)
                  for j in range(probs.shape[0]) if j not in chosen}
        best = min(scores, key=lambda j: (scores[j], j))
        chosen.append(best)
        curve.append(scores[best])
    return chosen, curve


def members_case(m, n, c, seed, skill=None):
    """Members of differing quality: probabilities leaning towards the label by `skill`."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, c, n)
    skill = np.linspace(0.5, 2.5, m) if skill is None else np.asarray(skill)
    logits = rng.normal(0.0, 1.0, size=(m, n, c))
    logits[:, np.arange(n), labels] += skill[:, None]
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True), labels


# ---------------------------------------------------------------- member_subsets


@pytest.mark.parametrize("m,k", [(5, 1), (5, 2), (5, 5), (6, 3), (4, 4)])
def test_member_subsets_exhaustive(m, k):
    subsets, exhaustive = member_subsets(m, k, max_subsets=math.comb(m, k), seed=0)
    assert exhaustive
    assert subsets.shape == (math.comb(m, k), k)
    assert [tuple(s) for s in subsets.tolist()] == list(itertools.combinations(range(m), k))


@pytest.mark.parametrize("m,k,limit", [(8, 4, 20), (12, 6, 100), (10, 3, 119)])
def test_member_subsets_sampled(m, k, limit):
    assert math.comb(m, k) > limit
    subsets, exhaustive = member_subsets(m, k, max_subsets=limit, seed=3)
    assert not exhaustive
    assert subsets.shape == (limit, k)
    rows = [tuple(s) for s in subsets.tolist()]
    assert len(set(rows)) == limit                                     # distinct
    assert all(list(r) == sorted(r) and len(set(r)) == k for r in rows)  # sorted, no repeats
    assert all(0 <= i < m for r in rows for i in r)
    again, _ = member_subsets(m, k, max_subsets=limit, seed=3)
    np.testing.assert_array_equal(subsets, again)                       # deterministic
    other, _ = member_subsets(m, k, max_subsets=limit, seed=4)
    assert {tuple(s) for s in other.tolist()} != set(rows)


def test_member_subsets_threshold_is_inclusive():
    assert member_subsets(6, 3, max_subsets=20, seed=0)[1] is True      # C(6, 3) = 20
    assert member_subsets(6, 3, max_subsets=19, seed=0)[1] is False


# ---------------------------------------------------------------- subset_accuracies / subset_curve


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_subset_accuracies_match_direct_votes_with_ties(seed):
    m, n, c = 5, 30, 3
    probs = dyadic_probs(m, n, c, seed)
    labels = np.random.default_rng(seed + 10).integers(0, c, n)
    ties = 0
    for k in (2, 3, 4):
        subsets = np.array(list(itertools.combinations(range(m), k)))
        acc = subset_accuracies(probs, labels, subsets, chunk=3)   # several chunks
        assert acc["soft"].shape == acc["hard"].shape == (len(subsets),)
        for row, soft, hard in zip(subsets, acc["soft"], acc["hard"]):
            sub = probs[list(row)]
            assert soft == pytest.approx(ref_accuracy(ref_soft_vote(sub), labels), abs=1e-12)
            assert hard == pytest.approx(ref_accuracy(ref_hard_vote(sub), labels), abs=1e-12)
            assert soft == pytest.approx(np.mean(soft_vote(sub) == labels), abs=1e-12)
            assert hard == pytest.approx(np.mean(hard_vote(sub) == labels), abs=1e-12)
            counts = [Counter(sub[:, i].argmax(-1).tolist()).most_common() for i in range(n)]
            ties += sum(len(cnt) > 1 and cnt[0][1] == cnt[1][1] for cnt in counts)
    assert ties > 20   # the case does exercise hard-vote ties


def test_subset_accuracies_agree_with_first_k_on_the_first_k_members():
    probs, labels = members_case(6, 40, 4, seed=5)
    first = first_k_accuracy(probs, labels)
    for k in range(1, 7):
        acc = subset_accuracies(probs, labels, np.arange(k)[None, :])
        assert acc["soft"][0] == pytest.approx(first["soft"][k - 1], abs=1e-12)
        assert acc["hard"][0] == pytest.approx(first["hard"][k - 1], abs=1e-12)


def test_subset_hard_vote_tie_break_sees_small_probability_differences():
    # Two of four members vote for class 0, two for class 1. Class 1's summed probability is
    # larger by about 2e-7 (representable in the float32 files predict writes), so hard voting
    # (the documented rule, hard_vote, first_k_accuracy) picks class 1; the subset curve must agree.
    probs = np.array([[[0.6, 0.4]], [[0.6, 0.4]], [[0.4, 0.6]], [[0.4 - 2e-7, 0.6 + 2e-7]]], np.float32)
    labels = np.array([1])
    assert ref_hard_vote(probs)[0] == 1
    assert hard_vote(probs)[0] == 1
    assert first_k_accuracy(probs, labels)["hard"][3] == 1.0
    assert subset_accuracies(probs, labels, np.array([[0, 1, 2, 3]]))["hard"][0] == 1.0


def test_subset_curve_matches_direct_statistics():
    m, n, c = 6, 25, 3
    probs, labels = members_case(m, n, c, seed=7)
    out = subset_curve(probs, labels, max_subsets=10, seed=1)
    assert out["exhaustive"] == [math.comb(m, k) <= 10 for k in range(1, m + 1)]
    assert out["exhaustive"] == [True, False, False, False, True, True]
    for k in range(1, m + 1):
        subsets, _ = member_subsets(m, k, 10, 1)
        assert out["subsets"][k - 1] == len(subsets) == min(10, math.comb(m, k))
        for vote in ("soft", "hard"):
            accs = [ref_accuracy(REF_VOTE[vote](probs[list(s)]), labels) for s in subsets]
            mean = sum(accs) / len(accs)
            std = math.sqrt(sum((a - mean) ** 2 for a in accs) / len(accs))
            assert out[vote]["mean"][k - 1] == pytest.approx(mean, abs=1e-12)
            assert out[vote]["std"][k - 1] == pytest.approx(std, abs=1e-12)
            assert out[vote]["min"][k - 1] == pytest.approx(min(accs), abs=1e-12)
            assert out[vote]["max"][k - 1] == pytest.approx(max(accs), abs=1e-12)
    # k = M is the whole ensemble: one subset, no spread
    assert out["soft"]["std"][-1] == 0.0
    assert out["soft"]["mean"][-1] == pytest.approx(ref_accuracy(ref_soft_vote(probs), labels))


def test_sampled_subset_mean_close_to_exhaustive_mean():
    m, k = 12, 6
    probs, labels = members_case(m, 60, 4, seed=11, skill=np.linspace(0.0, 2.0, m))
    every, exhaustive = member_subsets(m, k, max_subsets=1000, seed=0)
    assert exhaustive and len(every) == 924
    sampled, exhaustive = member_subsets(m, k, max_subsets=200, seed=0)
    assert not exhaustive and len(sampled) == 200
    all_acc = subset_accuracies(probs, labels, every)
    some_acc = subset_accuracies(probs, labels, sampled)
    curve = subset_curve(probs, labels, max_subsets=200, seed=0)
    assert curve["exhaustive"][k - 1] is False
    for vote in ("soft", "hard"):
        assert curve[vote]["mean"][k - 1] == pytest.approx(some_acc[vote].mean(), abs=1e-12)
        spread = all_acc[vote].std()
        assert spread > 0
        # standard error of a 200-subset mean (without replacement from 924) is spread / sqrt(200) * 0.89
        assert abs(some_acc[vote].mean() - all_acc[vote].mean()) < 4 * spread / math.sqrt(200)


# ---------------------------------------------------------------- greedy selection


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_selection_matches_brute_force(seed):
    probs, labels = members_case(5, 30, 4, seed=seed, skill=np.random.default_rng(seed).uniform(0, 2, 5))
    order, curve = greedy_selection(probs, labels)
    ref_order, ref_curve = ref_greedy(probs, labels)
    assert order == ref_order
    assert curve == pytest.approx(ref_curve, rel=1e-10)
    assert sorted(order) == list(range(5))


def test_greedy_picks_perfect_first_and_useless_last():
    rng = np.random.default_rng(3)
    n, c = 20, 4
    labels = rng.integers(0, c, n)
    good = []
    for _ in range(3):
        p = np.full((n, c), 0.1)
        p[np.arange(n), labels] = 0.7         # p_true = 0.7 > 1 / c everywhere
        p += rng.uniform(0, 0.02, (n, c))
        good.append(p / p.sum(-1, keepdims=True))
    perfect = np.eye(c)[labels]
    useless = np.full((n, c), 1 / c)
    probs = np.stack([good[0], useless, good[1], perfect, good[2]])
    order, curve = greedy_selection(probs, labels)
    assert order[0] == 3
    assert order[-1] == 1
    assert curve[0] == pytest.approx(0.0, abs=1e-12)
    assert curve[-1] == pytest.approx(ref_nll_of_mean(probs, range(5), labels), rel=1e-10)


# ---------------------------------------------------------------- analyse


def ref_first_k(probs, labels, vote):
    return [ref_accuracy(REF_VOTE[vote](probs[:k]), labels) for k in range(1, probs.shape[0] + 1)]


def tie_case(method):
    """A random case whose validation first-k curve reaches its maximum at two sizes or more."""
    for seed in range(200):
        val, y_val = members_case(5, 12, 3, seed=seed, skill=np.full(5, 0.8))
        curve = ref_first_k(val, y_val, method)
        best = max(curve)
        if sum(v == best for v in curve) >= 2 and curve[0] != best:
            test, y_test = members_case(5, 50, 3, seed=1000 + seed, skill=np.full(5, 0.8))
            return val, y_val, test, y_test, curve
    raise AssertionError("no tie case found")


@pytest.mark.parametrize("method", ["soft", "hard"])
def test_analyse_choice_of_size_and_test_accuracy(method):
    val, y_val, test, y_test, curve = tie_case(method)
    seeds = [3, 7, 11, 0, 5]
    out = analyse(seeds, val, y_val, test, y_test, ensemble_spec(method=method, max_subsets=6, bootstrap=300))
    best = max(curve)
    k = min(i + 1 for i, v in enumerate(curve) if v == best)       # smallest size on ties
    assert out.chosen_k == k
    assert out.method == method and out.chosen_on == "val"
    assert out.members == seeds[:k]
    assert out.val_accuracy == pytest.approx(best, abs=1e-12)
    assert out.test_accuracy == pytest.approx(ref_accuracy(REF_VOTE[method](test[:k]), y_test), abs=1e-12)
    for split, (p, y) in {"val": (val, y_val), "test": (test, y_test)}.items():
        for vote in ("soft", "hard"):
            assert getattr(out.first_k[split], vote) == pytest.approx(ref_first_k(p, y, vote), abs=1e-12)
    # plain JSON data, and read back as the same summary
    assert from_data(EnsembleSummary, json.loads(json.dumps(to_data(out)))) == out


def test_analyse_greedy_singles_and_intervals():
    seeds = [3, 7, 11, 0, 5]
    val, y_val = members_case(5, 40, 4, seed=21, skill=[0.2, 2.0, 1.0, 1.5, 0.6])
    test, y_test = members_case(5, 60, 4, seed=22, skill=[0.2, 2.0, 1.0, 1.5, 0.6])
    spec = ensemble_spec(max_subsets=4, bootstrap=400, bootstrap_seed=2)
    out = analyse(seeds, val, y_val, test, y_test, spec)

    # greedy: the order by brute force, the size whose prefix has the lowest validation NLL
    order, curve = ref_greedy(val, y_val)
    assert out.greedy.order == [seeds[i] for i in order]
    assert out.greedy.val_nll == pytest.approx(curve, rel=1e-10)
    g = min(range(len(curve)), key=lambda i: (curve[i], i)) + 1
    assert out.greedy.chosen_size == g
    members = sorted(order[:g])
    assert out.greedy.members == [seeds[i] for i in members]
    best_prefix = min(ref_nll_of_mean(val, order[:s], y_val) for s in range(1, 6))
    assert ref_nll_of_mean(val, members, y_val) == pytest.approx(best_prefix, rel=1e-10)
    assert out.greedy.val_accuracy == pytest.approx(ref_accuracy(ref_soft_vote(val[members]), y_val))
    assert out.greedy.test_accuracy == pytest.approx(ref_accuracy(ref_soft_vote(test[members]), y_test))

    # singles, in seed order, and the best one by validation accuracy
    val_acc = [ref_accuracy(val[i].argmax(-1), y_val) for i in range(5)]
    test_acc = [ref_accuracy(test[i].argmax(-1), y_test) for i in range(5)]
    assert [s.seed for s in out.singles] == seeds
    assert [s.val_accuracy for s in out.singles] == pytest.approx(val_acc)
    assert [s.test_accuracy for s in out.singles] == pytest.approx(test_acc)
    best = min(range(5), key=lambda i: (-val_acc[i], i))
    assert out.best_single_seed == seeds[best]
    stats = out.single_test_accuracy
    assert stats.mean == pytest.approx(sum(test_acc) / 5)
    assert stats.min == min(test_acc)
    assert stats.max == max(test_acc)
    mean = sum(test_acc) / 5
    assert stats.std == pytest.approx(math.sqrt(sum((a - mean) ** 2 for a in test_acc) / 4))

    # confidence intervals contain their point estimates
    def inside(ci, value):
        return ci[0] <= value + 1e-12 and value - 1e-12 <= ci[1] and ci[0] < ci[1]

    assert inside(out.test_ci, out.test_accuracy)
    assert inside(out.greedy.test_ci, out.greedy.test_accuracy)
    assert inside(stats.ci_of_mean, stats.mean)
    for s in out.singles:
        assert inside(s.test_ci, s.test_accuracy)
        cal = s.calibration
        assert cal.temperature > 0
        assert set(to_data(cal.before)) == set(to_data(cal.after)) == {"accuracy", "nll", "brier", "ece"}
        assert cal.before.accuracy == pytest.approx(s.test_accuracy)
        assert cal.after.accuracy == pytest.approx(s.test_accuracy)   # T keeps the argmax
    assert out.calibration.temperature > 0
    k = out.chosen_k
    assert out.calibration.before.nll == pytest.approx(ref_nll_of_mean(test, range(k), y_test), rel=1e-10)
    assert out.bootstrap == Bootstrap(resamples=400, seed=2, level=0.95)
    assert out.subsets["val"].subsets == [4, 4, 4, 4, 1]


def test_analyse_uses_the_spec_ece_bins():
    seeds = [0, 1, 2]
    val, y_val = members_case(3, 40, 4, seed=23)
    test, y_test = members_case(3, 60, 4, seed=24)
    outs = {bins: analyse(seeds, val, y_val, test, y_test, ensemble_spec(bootstrap=50, ece_bins=bins))
            for bins in (2, 15)}
    for bins, out in outs.items():
        k = out.chosen_k
        assert out.calibration.before.ece == pytest.approx(
            expected_calibration_error(test[:k].mean(0), y_test, bins), abs=1e-12)
        for i, single in enumerate(out.singles):
            assert single.calibration.before.ece == pytest.approx(
                expected_calibration_error(test[i], y_test, bins), abs=1e-12)
    assert [s.calibration.before.ece for s in outs[2].singles] != [
        s.calibration.before.ece for s in outs[15].singles]
    assert outs[2].calibration.before.nll == outs[15].calibration.before.nll


def test_analyse_single_member():
    val, y_val = members_case(1, 20, 3, seed=1)
    test, y_test = members_case(1, 30, 3, seed=2)
    out = analyse([4], val, y_val, test, y_test, ensemble_spec(bootstrap=100))
    assert out.chosen_k == 1 and out.members == [4] and out.best_single_seed == 4
    assert out.single_test_accuracy.std == 0.0
    assert out.test_accuracy == pytest.approx(out.singles[0].test_accuracy)


# ---------------------------------------------------------------- ensemble_to_files / load_members


def class_names(n):
    return np.array([f"class{i}" for i in range(n)])


def write_case(folder: Path, seeds, m_val, m_test, y_val, y_test):
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "data.npz"
    np.savez(data, y_val=y_val, y_test=y_test, x_val=np.zeros((len(y_val), 2, 2, 3), np.uint8),
             classes=class_names(m_val.shape[-1]))
    val_paths, test_paths = [], []
    for i, seed in enumerate(seeds):
        val_paths.append(folder / f"s{seed}_val.npy")
        test_paths.append(folder / f"s{seed}_test.npy")
        np.save(val_paths[-1], m_val[i].astype(np.float32))
        np.save(test_paths[-1], m_test[i].astype(np.float32))
    return data, val_paths, test_paths


def ensemble_args(data, seeds, val_paths, test_paths, spec, out_csv, out_json):
    return ["ensemble", "--data", str(data), "--seeds", *map(str, seeds), "--val", *map(str, val_paths),
            "--test", *map(str, test_paths), "--spec", to_json(spec), "--csv", str(out_csv),
            "--json", str(out_json)]


def test_ensemble_to_files_writes_csv_and_json(tmp_path):
    seeds = [0, 1, 2, 3]
    val, y_val = members_case(4, 24, 3, seed=30)
    test, y_test = members_case(4, 36, 3, seed=31)
    data, vp, tp = write_case(tmp_path / "in", seeds, val, test, y_val, y_test)
    out_csv, out_json = tmp_path / "out" / "ensemble.csv", tmp_path / "out" / "ensemble.json"
    spec = ensemble_spec(method="hard", max_subsets=3, bootstrap=200)
    summary = ensemble_to_files(data, seeds, vp, tp, spec, out_csv, out_json)
    written = json.loads(out_json.read_text())
    for key in ("format", "seeds", "method", "chosen_on", "chosen_k", "members", "val_accuracy",
                "test_accuracy", "test_ci", "calibration", "first_k", "subsets", "greedy", "singles",
                "best_single_seed", "single_test_accuracy", "bootstrap"):
        assert key in written
    assert written == {"format": SUMMARY_FORMAT, **json.loads(json.dumps(to_data(summary)))}
    assert EnsembleSummary.load(out_json) == summary     # read back bit for bit
    assert written["method"] == "hard" and written["seeds"] == seeds
    # probabilities were stored as float32: the first-k curve is that of the stored arrays
    v32 = val.astype(np.float32)
    assert summary.first_k["val"].hard == pytest.approx(ref_first_k(v32, y_val, "hard"), abs=1e-12)
    with open(out_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["k", "val_hard", "val_soft", "test_hard", "test_soft"]
    assert [int(r["k"]) for r in rows] == [1, 2, 3, 4]
    for i, r in enumerate(rows):
        for split in ("val", "test"):
            for vote in ("hard", "soft"):
                assert float(r[f"{split}_{vote}"]) == pytest.approx(
                    getattr(summary.first_k[split], vote)[i], abs=5e-7)
    assert not [p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]


def test_ensemble_cli_round_trip(tmp_path):
    val, y_val = members_case(3, 20, 3, seed=40)
    test, y_test = members_case(3, 20, 3, seed=41)
    data, vp, tp = write_case(tmp_path, [5, 6, 7], val, test, y_val, y_test)
    spec = ensemble_spec(bootstrap=50, max_subsets=2)
    assert main(ensemble_args(data, [5, 6, 7], vp, tp, spec, tmp_path / "e.csv", tmp_path / "e.json")) == 0
    out = EnsembleSummary.load(tmp_path / "e.json")
    assert out.seeds == [5, 6, 7] and out.method == "soft"
    assert out.bootstrap.resamples == 50
    assert out.subsets["val"].subsets == [2, 2, 1]


def test_ensemble_cli_bad_spec_is_one_line(tmp_path, capsys):
    val, y_val = members_case(2, 10, 3, seed=42)
    test, y_test = members_case(2, 10, 3, seed=43)
    data, vp, tp = write_case(tmp_path, [0, 1], val, test, y_val, y_test)
    args = ensemble_args(data, [0, 1], vp, tp, ensemble_spec(), tmp_path / "e.csv", tmp_path / "e.json")
    args[args.index("--spec") + 1] = json.dumps({**to_data(ensemble_spec()), "bootstrap": "many"})
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bootstrap" in err[0] and "expected an integer" in err[0]
    assert not (tmp_path / "e.json").exists() and not (tmp_path / "e.csv").exists()


def test_load_members_rejects_mismatched_shapes(tmp_path):
    good = tmp_path / "good.npy"
    np.save(good, np.full((10, 3), 1 / 3))
    short = tmp_path / "short.npy"
    np.save(short, np.full((9, 3), 1 / 3))
    wide = tmp_path / "wide.npy"
    np.save(wide, np.full((10, 4), 1 / 4))
    flat = tmp_path / "flat.npy"
    np.save(flat, np.full(10, 1.0))
    junk = tmp_path / "junk.npy"
    junk.write_text("not an array")
    assert load_members([good, good], 10, "val").shape == (2, 10, 3)
    for bad in (short, wide, flat, junk):
        with pytest.raises(UserError, match=bad.name):
            load_members([good, bad], 10, "the validation split")
    with pytest.raises(UserError, match="short.npy"):
        load_members([short], 10, "the validation split")


def test_ensemble_to_files_rejects_bad_inputs(tmp_path):
    val, y_val = members_case(2, 10, 3, seed=50)
    test, y_test = members_case(2, 12, 3, seed=51)
    data, vp, tp = write_case(tmp_path, [0, 1], val, test, y_val, y_test)
    out = (tmp_path / "o.csv", tmp_path / "o.json")
    spec = ensemble_spec(bootstrap=50)
    with pytest.raises(UserError, match="one val and one test"):
        ensemble_to_files(data, [0, 1], vp, tp[:1], spec, *out)
    # test file of the wrong length for the test labels
    with pytest.raises(UserError, match=vp[1].name):
        ensemble_to_files(data, [0, 1], vp, [tp[0], vp[1]], spec, *out)
    # val and test with different numbers of classes
    four = tmp_path / "four.npy"
    np.save(four, np.full((12, 4), 0.25))
    four2 = tmp_path / "four2.npy"
    np.save(four2, np.full((12, 4), 0.25))
    with pytest.raises(UserError, match="classes"):
        ensemble_to_files(data, [0, 1], vp, [four, four2], spec, *out)
    # members with more classes than the dataset
    four_val = tmp_path / "four_val.npy"
    np.save(four_val, np.full((10, 4), 0.25))
    with pytest.raises(UserError, match=f"four_val.npy: 4 classes, but {data} has 3"):
        ensemble_to_files(data, [0, 1], [four_val, four_val], [four, four2], spec, *out)
    broken = tmp_path / "broken.npz"
    broken.write_bytes(b"PK not a zip")
    with pytest.raises(UserError, match="broken.npz"):
        read_labels(broken)
    no_test = tmp_path / "no_test.npz"
    np.savez(no_test, y_val=y_val)
    with pytest.raises(UserError, match="no_test.npz"):
        read_labels(no_test)
    assert not out[0].exists() and not out[1].exists()


# ---------------------------------------------------------------- damaged probability files

N_DAMAGED, C_DAMAGED = 10, 3


def _uniform(rows=N_DAMAGED, classes=C_DAMAGED):
    return np.full((rows, classes), 1 / classes, np.float32)


def _with(change):
    probs = _uniform()
    change(probs)
    return probs


def _put(index, value):
    def change(p):
        p[index] = value
    return change


def _halve(p):
    p[4] *= 0.5


def _one_hot_integers():
    return np.eye(C_DAMAGED, dtype=np.int64)[np.arange(N_DAMAGED) % C_DAMAGED]


def _save_pickled(path):
    np.save(path, np.array([{"probs": [0.5, 0.5]}] * N_DAMAGED, dtype=object), allow_pickle=True)


def _truncated(path):
    np.save(path, _uniform())
    path.write_bytes(path.read_bytes()[:100])


# Each writes a probs_*.npy predict would never write; `problem` is part of the one-line error.
DAMAGED_PROBS = {
    "one-dimensional": (lambda path: np.save(path, np.full(N_DAMAGED, 0.5, np.float32)), "shape (10,)"),
    "three-dimensional": (lambda path: np.save(path, _uniform()[..., None]), "shape (10, 3, 1)"),
    "one class": (lambda path: np.save(path, np.ones((N_DAMAGED, 1), np.float32)), "shape (10, 1)"),
    "integer one-hot": (lambda path: np.save(path, _one_hot_integers()),
                        "dtype int64"),
    "nan": (lambda path: np.save(path, _with(_put((2, 1), np.nan))), "not finite"),
    "infinity": (lambda path: np.save(path, _with(_put((3, 0), np.inf))), "not finite"),
    "negative": (lambda path: np.save(path, _with(_put((5,), [1.2, -0.1, -0.1]))), "negative"),
    "rows not summing to 1": (lambda path: np.save(path, _with(_halve)), "row 4 sums to 0.5"),
    "pickled object array": (_save_pickled, "Object arrays cannot be loaded"),
    "text": (lambda path: path.write_text("0.3 0.3 0.4\n"), "not a probability array"),
    "truncated": (_truncated, "not a probability array"),
    "empty": (lambda path: path.write_bytes(b""), "not a probability array"),
    "missing": (lambda path: None, "missing"),
}


@pytest.mark.parametrize("kind", list(DAMAGED_PROBS))
def test_damaged_probabilities_are_one_line_naming_the_file(tmp_path, kind):
    write, problem = DAMAGED_PROBS[kind]
    bad = tmp_path / "probs_val.npy"
    write(bad)
    with pytest.raises(DamagedFile) as info:
        load_probabilities(bad)
    assert_damaged(str(info.value), bad, problem)
    assert str(info.value).startswith(f"{bad}: ")
    good = tmp_path / "good.npy"
    np.save(good, _uniform())
    with pytest.raises(DamagedFile) as info:
        load_members([good, bad], N_DAMAGED, "the validation split")
    assert_damaged(str(info.value), bad, problem)


def test_probabilities_predict_could_write_are_accepted(tmp_path):
    path = tmp_path / "probs.npy"
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(5), 20).astype(np.float32)
    probs[3] = [1.0, 0.0, 0.0, 0.0, 0.0]            # a confident row: zeros are probabilities too
    np.save(path, probs)
    np.testing.assert_array_equal(load_probabilities(path), probs)
    np.save(path, probs.astype(np.float64))
    assert load_probabilities(path).dtype == np.float64


@pytest.mark.parametrize("kind", list(DAMAGED_PROBS))
def test_ensemble_cli_damaged_member_is_one_line(tmp_path, capsys, kind):
    write, problem = DAMAGED_PROBS[kind]
    val, y_val = members_case(2, N_DAMAGED, C_DAMAGED, seed=52)
    test, y_test = members_case(2, 12, C_DAMAGED, seed=53)
    data, vp, tp = write_case(tmp_path, [0, 1], val, test, y_val, y_test)
    vp[1].unlink()
    write(vp[1])
    out = (tmp_path / "out" / "e.csv", tmp_path / "out" / "e.json")
    assert main(ensemble_args(data, [0, 1], vp, tp, ensemble_spec(bootstrap=20), *out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("cifar-ensembles ensemble: error: ")
    assert_damaged(err[0].removeprefix("cifar-ensembles ensemble: error: "), vp[1], problem)
    assert not (tmp_path / "out").exists()


def test_ensemble_command_damaged_member_exits_2_without_traceback(tmp_path):
    """The real command in a subprocess: a pickled object array, as a hand-made file might be."""
    val, y_val = members_case(2, N_DAMAGED, C_DAMAGED, seed=54)
    test, y_test = members_case(2, 12, C_DAMAGED, seed=55)
    data, vp, tp = write_case(tmp_path, [0, 1], val, test, y_val, y_test)
    _save_pickled(tp[0])
    out = (tmp_path / "out" / "e.csv", tmp_path / "out" / "e.json")
    proc = cli(*ensemble_args(data, [0, 1], vp, tp, ensemble_spec(bootstrap=20), *out))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert lines[0].startswith("cifar-ensembles ensemble: error: ")
    assert_damaged(lines[0], tp[0], "Object arrays cannot be loaded")
    assert not (tmp_path / "out").exists()


def test_compare_cli_damaged_member_is_one_line(tmp_path, capsys):
    y = np.array([0, 1, 2, 1])
    data = tmp_path / "data.npz"
    np.savez(data, y_val=y, y_test=y, classes=class_names(3))
    np.save(tmp_path / "a0.npy", np.eye(3)[y])
    bad = tmp_path / "b0.npy"
    probs = np.eye(3)[y]
    probs[1, 1] = np.nan
    np.save(bad, probs)
    experiments = {"a": {"0": str(tmp_path / "a0.npy")}, "b": {"0": str(bad)}}
    out = tmp_path / "cmp" / "comparisons.json"
    args = ["compare", "--data", str(data), "--experiments", json.dumps(experiments), "--out", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert_damaged(err[0].removeprefix("cifar-ensembles compare: error: "), bad, "not finite")
    assert not out.parent.exists()


# ---------------------------------------------------------------- compare_to_files


def test_compare_to_files_pairs_on_shared_seeds(tmp_path):
    rng = np.random.default_rng(60)
    n, c = 50, 3
    y_test = rng.integers(0, c, n)
    data = tmp_path / "data.npz"
    np.savez(data, y_val=y_test[:5], y_test=y_test, classes=class_names(c))
    probs = {}

    def member(name, seed, skill):
        q = rng.dirichlet(np.ones(c), n) * 0.5
        q[np.arange(n), y_test] += skill * rng.uniform(0, 1, n)
        q /= q.sum(-1, keepdims=True)
        path = tmp_path / f"{name}_{seed}.npy"
        np.save(path, q.astype(np.float32))
        probs[(name, seed)] = q.astype(np.float32)
        return str(path)

    experiments = {
        "a": {"2": member("a", 2, 0.6), "10": member("a", 10, 0.6), "3": member("a", 3, 0.6)},
        "b": {"10": member("b", 10, 0.3), "2": member("b", 2, 0.3), "4": member("b", 4, 0.3)},
        "c": {"7": member("c", 7, 0.5)},
    }
    out_json = tmp_path / "cmp" / "comparisons.json"
    result = compare_to_files(experiments, data, out_json)
    assert Comparisons.load(out_json) == result          # read back bit for bit
    written = json.loads(out_json.read_text())
    assert written == {"format": "cifar-ensembles/comparisons-1", **json.loads(json.dumps(to_data(result)))}
    assert "McNemar" in written["test"]
    assert len(result.pairs) == 1                        # c shares no seed with a or b
    pair = result.pairs[0]
    assert (pair.a, pair.b) == ("a", "b")
    assert pair.shared_seeds == [2, 10]                  # numeric order, not "10" < "2"
    diffs = []
    for r, seed in zip(pair.per_seed, (2, 10)):
        ca = probs[("a", seed)].argmax(-1) == y_test
        cb = probs[("b", seed)].argmax(-1) == y_test
        assert r.seed == seed
        assert r.accuracy_a == pytest.approx(ca.mean()) and r.accuracy_b == pytest.approx(cb.mean())
        expected = mcnemar(ca, cb)
        assert (r.b, r.c, r.p_value) == (expected["b"], expected["c"], expected["p_value"])
        diffs.append(ca.mean() - cb.mean())
    assert pair.mean_single_difference == pytest.approx(sum(diffs) / 2)
    ea = ref_soft_vote(np.stack([probs[("a", 2)], probs[("a", 10)]])) == y_test
    eb = ref_soft_vote(np.stack([probs[("b", 2)], probs[("b", 10)]])) == y_test
    e = pair.ensemble
    assert e.accuracy_a == pytest.approx(ea.mean()) and e.accuracy_b == pytest.approx(eb.mean())
    expected = mcnemar(ea, eb)
    assert (e.b, e.c, e.p_value) == (expected["b"], expected["c"], expected["p_value"])
    assert not [p.name for p in out_json.parent.iterdir() if p.name.startswith(".")]


def test_compare_to_files_without_shared_seeds(tmp_path):
    y = np.array([0, 1, 2, 1])
    data = tmp_path / "data.npz"
    np.savez(data, y_val=y, y_test=y, classes=class_names(3))
    for name in ("x0", "y1"):
        np.save(tmp_path / f"{name}.npy", np.eye(3)[y])
    out = tmp_path / "cmp.json"
    result = compare_to_files({"x": {"0": str(tmp_path / "x0.npy")}, "y": {"1": str(tmp_path / "y1.npy")}},
                              data, out)
    assert result.pairs == []
    assert json.loads(out.read_text())["pairs"] == []
    assert Comparisons.load(out) == result
    assert compare_to_files({"x": {"0": str(tmp_path / "x0.npy")}}, data, out).pairs == []


def test_compare_to_files_rejects_wrong_length(tmp_path):
    y = np.array([0, 1, 2, 1])
    data = tmp_path / "data.npz"
    np.savez(data, y_val=y, y_test=y, classes=class_names(3))
    np.save(tmp_path / "ok.npy", np.eye(3)[y])
    np.save(tmp_path / "bad.npy", np.eye(3)[[0, 1, 2]])
    with pytest.raises(UserError, match="bad.npy"):
        compare_to_files({"x": {"0": str(tmp_path / "ok.npy")}, "y": {"0": str(tmp_path / "bad.npy")}},
                         data, tmp_path / "cmp.json")
