"""Methods and the accuracy-cost frontier (docs/study.md 5.11): which member rows each method
averages, the Pareto front and the best method per budget against brute force, methods.json
from written probabilities against conftest's references, frontier.json's costs from
benchmark files, and the frontier figure and summary rows."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
from conftest import assert_damaged, ensemble_spec, make_data, ref_accuracy, ref_ece, ref_nll, ref_soft_vote
from sklearn.metrics import roc_auc_score

from cifar_ensembles.analysis.methods import best_by_budget, method_groups, pareto_front, variant_rows
from cifar_ensembles.config.convert import from_data
from cifar_ensembles.config.spec import RunCostSpec
from cifar_ensembles.errors import UserError
from cifar_ensembles.files import splits
from cifar_ensembles.files.atomic import save_npz
from cifar_ensembles.files.frontier_summary import FRONT_METRICS, Frontier, MethodsSummary
from cifar_ensembles.files.records import DamagedFile
from cifar_ensembles.files.training_run import read_benchmark_seconds
from cifar_ensembles.stages.frontier import frontier_to_file, methods_to_file
from cifar_ensembles.stages.report.frontier_figures import frontier_lines, plot_frontier

ONE_RUN = {"plain": "single", "tta": "single_tta", "swa": "swa", "snapshots": "snapshot_ensemble"}
POOLED = {"plain": "deep_ensemble", "tta": "deep_ensemble_tta", "swa": "deep_ensemble_swa",
          "snapshots": "deep_snapshot_ensemble"}


# ------------------------------------------------------------------ groups
def ref_groups(n: int, extras: list[tuple[int, str]]) -> dict[tuple[str, int], tuple[tuple[int, ...], ...]]:
    """(method, seeds) -> instances, from the definition: rows 0..n-1 are the final models, row
    n + j is extras[j]; per seed a variant is its final model, its TTA row, its SWA row, or its
    snapshots by epoch then its final model; a method of one run has one instance per seed, a
    pooled one the rows of seeds 0..k-1 in one instance."""
    row = {(seed, name): n + j for j, (seed, name) in enumerate(extras)}
    names = {name for _, name in extras}
    epochs = sorted((x for x in names if x.startswith("epoch")), key=lambda x: int(x[len("epoch"):]))
    per_seed = {"plain": [(i,) for i in range(n)]}
    for variant in ("tta", "swa"):
        if variant in names:
            per_seed[variant] = [(row[i, variant],) for i in range(n)]
    if epochs:
        per_seed["snapshots"] = [tuple(row[i, e] for e in epochs) + (i,) for i in range(n)]
    out = {}
    for variant, rows in per_seed.items():
        out[ONE_RUN[variant], 1] = tuple(rows)
        for k in range(2, n + 1):
            out[POOLED[variant], k] = (sum(rows[:k], ()),)
    return out


EXTRAS = [(i, name) for i in range(3) for name in ("tta", "epoch2", "epoch1", "swa")]


def as_dict(groups) -> dict:
    keyed = {(g.method, g.seeds): g.instances for g in groups}
    assert len(keyed) == len(groups), "a method and k twice"
    return keyed


def test_groups_of_three_seeds_with_every_extra_member():
    groups = method_groups(3, EXTRAS)
    assert as_dict(groups) == ref_groups(3, EXTRAS)
    assert {g.method for g in groups} == set(ONE_RUN.values()) | set(POOLED.values())
    for g in groups:
        assert len(g.instances) == (3 if g.seeds == 1 else 1)
        assert g.members == len(g.instances[0])
        assert g.method in (ONE_RUN[g.variant], POOLED[g.variant])
    # seed i's extras are rows 3 + 4i (tta), 4 + 4i (epoch2), 5 + 4i (epoch1), 6 + 4i (swa)
    keyed = as_dict(groups)
    assert keyed["snapshot_ensemble", 1] == ((5, 4, 0), (9, 8, 1), (13, 12, 2))
    assert keyed["deep_snapshot_ensemble", 2] == ((5, 4, 0, 9, 8, 1),)
    assert keyed["single_tta", 1] == ((3,), (7,), (11,))
    assert keyed["deep_ensemble_swa", 3] == ((6, 10, 14),)
    assert keyed["deep_ensemble", 2] == ((0, 1),)


def test_groups_without_extras_are_single_and_deep_ensembles():
    assert as_dict(method_groups(3, [])) == {("single", 1): ((0,), (1,), (2,)),
                                             ("deep_ensemble", 2): ((0, 1),),
                                             ("deep_ensemble", 3): ((0, 1, 2),)}
    assert as_dict(method_groups(1, [])) == {("single", 1): ((0,),)}


def test_snapshots_are_ordered_by_epoch_number_not_by_name():
    extras = [(0, "epoch10"), (0, "epoch9")]
    assert as_dict(method_groups(1, extras)) == {("single", 1): ((0,),),
                                                 ("snapshot_ensemble", 1): ((2, 1, 0),)}


def test_extra_of_a_seed_that_is_not_there_is_refused():
    with pytest.raises(ValueError, match="seed index 2"):
        variant_rows(2, [(2, "swa")])


# ------------------------------------------------------------------ Pareto front, budgets
def ref_pareto(costs, values, higher_is_better: bool) -> list[bool]:
    """Point i is on the front unless some j costs no more, is no worse, and is strictly
    cheaper or strictly better."""
    def better(a, b):
        return a > b if higher_is_better else a < b

    out = []
    for i in range(len(costs)):
        dominated = any(costs[j] <= costs[i] and not better(values[i], values[j])
                        and (costs[j] < costs[i] or better(values[j], values[i])) for j in range(len(costs)))
        out.append(not dominated)
    return out


def ref_best_by_budget(costs, values, higher_is_better: bool) -> list[int]:
    """For each budget (each distinct cost, ascending): among the points costing at most it,
    the best value, the cheapest (then the first) of those reaching it; listed when it changes."""
    sign = 1 if higher_is_better else -1
    chosen = []
    for budget in sorted(set(costs)):
        within = [i for i in range(len(costs)) if costs[i] <= budget]
        best = max(sign * values[i] for i in within)
        pick = min((i for i in within if sign * values[i] == best), key=lambda i: (costs[i], i))
        if not chosen or chosen[-1] != pick:
            chosen.append(pick)
    return chosen


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("higher", [True, False])
def test_pareto_front_and_budgets_against_brute_force(seed, higher):
    """Small integer costs and values: many ties, equal points included."""
    rng = np.random.default_rng(seed)
    n = 40
    costs, values = rng.integers(0, 6, n).tolist(), rng.integers(0, 6, n).tolist()
    if seed % 2:  # real-valued costs and values too
        costs = [c * 1.5 for c in costs]
        values = [v / 7 for v in values]
    front = pareto_front(costs, values, higher)
    assert front.dtype == bool and front.tolist() == ref_pareto(costs, values, higher)
    assert best_by_budget(costs, values, higher) == ref_best_by_budget(costs, values, higher)
    # every pick of the budget table is on the front
    assert all(front[i] for i in best_by_budget(costs, values, higher))


def test_equal_points_are_all_on_the_front():
    assert pareto_front([1, 1, 2], [0.5, 0.5, 0.5], True).tolist() == [True, True, False]
    assert best_by_budget([1, 1, 2], [0.5, 0.5, 0.5], True) == [0]


# ------------------------------------------------------------------ methods.json
C, N_VAL, N_TEST, N_TRAIN = 5, 30, 50, 22
SEEDS = [2, 10, 11]  # seed order is not the order of their names
CORRUPTIONS = {"noise": np.arange(0, N_TEST, 2), "blur": np.arange(1, N_TEST, 3)}
OOD = {"far": 25, "near": 15}
TTA_VIEWS = 6
SPEC = ensemble_spec(bootstrap=200, ece_bins=10)
BENCHMARK_HEADER = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
SECONDS = {"big": {"2": 12.5, "10": 20.125, "11": 7.25}, "small": {"1": 3.5, "2": 4.75}}
COSTS = {"big": {"epochs": 2, "batch_size": 5, "passes_per_step": 1},
         "small": {"epochs": 3, "batch_size": 4, "passes_per_step": 2}}


def skilled(rng, labels, members: int, skill: float) -> np.ndarray:
    """members x N x C float32 probabilities leaning towards `labels` by up to `skill`."""
    p = rng.dirichlet(np.full(C, 0.7), (members, len(labels)))
    p[:, np.arange(len(labels)), labels] += skill * rng.random((members, len(labels)))
    return (p / p.sum(-1, keepdims=True)).astype(np.float32)


def member_files(root, name: str, probs: np.ndarray, n: int) -> list[str]:
    """As the predict jobs write a set's probabilities: the final models' in one file (members
    x ...), the extra members' (if any) in another, rows in order."""
    paths = [str(root / f"{name}.npy")] + ([str(root / f"{name}.members.npy")] if len(probs) > n else [])
    np.save(paths[0], probs[:n])
    if len(paths) > 1:
        np.save(paths[1], probs[n:])
    return paths


def write_experiment(root, data_path, data, seeds, extras, with_sets: bool, seed: int) -> dict:
    """Probability files of an experiment's members as the predict jobs write them, and its
    methods.json; the arrays for the references."""
    rng = np.random.default_rng(seed)
    root.mkdir()
    members = len(seeds) + len(extras)
    arrays = {split: skilled(rng, data[f"y_{split}"], members, 0.4) for split in ("val", "test")}
    paths = {}
    for split in ("val", "test"):
        paths[split] = [root / f"{split}{m}.npy" for m in range(members)]
        for m, path in enumerate(paths[split]):
            np.save(path, arrays[split][m])
    shift, sets, ood = {}, {}, {}
    if with_sets:
        for c, index in CORRUPTIONS.items():
            y = data["y_test"][index]
            sets[c] = str(root / f"{c}.npz")
            save_npz(sets[c], x=np.zeros((5, len(index), 4, 4, 3), np.uint8), y=y, index=index)
            probs = np.stack([skilled(rng, y, members, 0.4 - 0.07 * s) for s in range(5)], axis=1)
            arrays[c] = probs
            shift[c] = member_files(root, c, probs, len(seeds))
        for name, images in OOD.items():
            probs = skilled(rng, rng.integers(0, C, images), members, 0.3 if name == "far" else 0.8)
            arrays[name] = probs
            ood[name] = member_files(root, name, probs, len(seeds))
    args = dict(experiment=root.name, data_path=data_path, seeds=seeds, val_paths=paths["val"][:len(seeds)],
                test_paths=paths["test"][:len(seeds)], extras=extras, extra_val=paths["val"][len(seeds):],
                extra_test=paths["test"][len(seeds):], shift=shift, shift_sets=sets, ood={}, spec=SPEC,
                tta_views=TTA_VIEWS, out=root / "methods.json")
    summary = methods_to_file(**args)  # the OOD sets are scored in their own test
    return {"args": args, "arrays": arrays, "summary": summary, "path": root / "methods.json",
            "extras": extras, "seeds": seeds, "ood": ood}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """data.npz, "big" (3 seeds, TTA, two snapshots and SWA per seed, 2 corrupted sets; the files
    of 2 OOD sets) and "small" (2 seeds, final models only), their benchmark files."""
    root = tmp_path_factory.mktemp("methods")
    data = make_data(n_train=N_TRAIN, size=4, n_val=N_VAL, n_test=N_TEST, classes=C)
    splits.write(root / "data.npz", data)
    experiments = {"big": write_experiment(root / "big", root / "data.npz", data, SEEDS, EXTRAS, True, 0),
                   "small": write_experiment(root / "small", root / "data.npz", data, [1, 2], [], False, 1)}
    runs = {}
    for name, seconds in SECONDS.items():
        runs[name] = {}
        for seed, s in seconds.items():
            path = root / name / f"benchmark_{seed}.tsv"
            path.write_text(BENCHMARK_HEADER
                            + f"{s}\t0:00:{int(s):02d}\t100.5\t200.1\t50\t60\t0.1\t0.2\t99.0\t{s}\n")
            runs[name][seed] = {"benchmark": str(path)}
    return {"root": root, "data_path": root / "data.npz", "data": data, "experiments": experiments,
            "runs": runs}


def instance_probs(probs: np.ndarray, instances) -> list[np.ndarray]:
    return [probs[list(rows)] for rows in instances]


def mean_over(instances_probs, score) -> float:
    return float(np.mean([score(p) for p in instances_probs]))


def ref_mcnemar(a: np.ndarray, b: np.ndarray) -> tuple[int, int, float]:
    """b: only A right, c: only B right (counted one by one); p = min(1, 2 P(X <= min(b, c)))
    for X ~ Binomial(b + c, 1/2)."""
    only_a = sum(1 for x, y in zip(a, b) if x and not y)
    only_b = sum(1 for x, y in zip(a, b) if y and not x)
    n = only_a + only_b
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1)) / 2 ** n)
    return only_a, only_b, p


def ref_entropy(p: np.ndarray) -> np.ndarray:
    return np.array([-sum(float(x) * math.log(float(x)) for x in row if x > 0) for row in p])


def test_methods_json_reads_back_and_names_every_method(world):
    for name, e in world["experiments"].items():
        summary = e["summary"]
        assert MethodsSummary.load(e["path"]) == summary
        assert summary.experiment == name and summary.seeds == e["seeds"] and summary.tta_views == TTA_VIEWS
        expected = ref_groups(len(e["seeds"]), e["extras"])
        assert sorted((m.method, m.seeds) for m in summary.methods) == sorted(expected)


def test_every_method_is_scored_on_its_averaged_probabilities(world):
    """Per method, the mean over its instances of the references on each instance's average
    (ref_soft_vote: the argmax of the mean probability); views are the TTA views for TTA
    methods only; the bootstrap interval brackets the accuracy."""
    y_val, y_test = world["data"]["y_val"], world["data"]["y_test"]
    for e in world["experiments"].values():
        val, test = e["arrays"]["val"], e["arrays"]["test"]
        groups = ref_groups(len(e["seeds"]), e["extras"])
        for m in e["summary"].methods:
            instances = groups[m.method, m.seeds]
            tests = instance_probs(test, instances)
            means = [p.mean(axis=0, dtype=np.float64) for p in tests]
            assert (m.instances, m.members) == (len(instances), len(instances[0])), m.method
            assert m.views == (TTA_VIEWS if m.method in ("single_tta", "deep_ensemble_tta") else 1), m.method
            assert m.variant in ("plain", "tta", "swa", "snapshots")
            assert m.test_accuracy == pytest.approx(
                mean_over(tests, lambda p: ref_accuracy(ref_soft_vote(p), y_test)), abs=1e-12), m.method
            assert m.val_accuracy == pytest.approx(
                mean_over(instance_probs(val, instances), lambda p: ref_accuracy(ref_soft_vote(p), y_val)),
                abs=1e-12), m.method
            assert m.test_nll == pytest.approx(mean_over(means, lambda p: ref_nll(p, y_test)),
                                               rel=1e-9), m.method
            assert m.test_ece == pytest.approx(mean_over(means, lambda p: ref_ece(p, y_test, SPEC.ece_bins)),
                                               abs=1e-9), m.method
            assert m.test_ci[0] <= m.test_accuracy <= m.test_ci[1] and m.test_ci[0] < m.test_ci[1], m.method
            assert m.temperature > 0


def test_paired_test_counts_against_the_first_single_model(world):
    """b and c counted image by image between the method's first instance and seed 0's model."""
    y = world["data"]["y_test"]
    for e in world["experiments"].values():
        test = e["arrays"]["test"]
        groups = ref_groups(len(e["seeds"]), e["extras"])
        single = ref_soft_vote(test[:1]) == y
        for m in e["summary"].methods:
            first = ref_soft_vote(test[list(groups[m.method, m.seeds][0])]) == y
            b, c, p = ref_mcnemar(first, single)
            assert (m.vs_single.b, m.vs_single.c) == (b, c), m.method
            assert m.vs_single.p_value == pytest.approx(p, rel=1e-9), m.method
        single_method = next(m for m in e["summary"].methods if m.method == "single")
        paired = single_method.vs_single
        assert (paired.b, paired.c, paired.p_value) == (0, 0, 1.0)


def set_scores(parts: list[np.ndarray], y: np.ndarray) -> tuple[float, float, float]:
    """Mean over instances (members x N x C each) of accuracy, NLL and ECE of the average."""
    means = [p.mean(axis=0, dtype=np.float64) for p in parts]
    return (mean_over(parts, lambda p: ref_accuracy(ref_soft_vote(p), y)),
            mean_over(means, lambda p: ref_nll(p, y)),
            mean_over(means, lambda p: ref_ece(p, y, SPEC.ece_bins)))


def test_shift_scores_are_means_over_every_corrupted_set(world):
    """Accuracy, NLL and ECE: mean over the 5 x 2 sets of the mean over instances."""
    e = world["experiments"]["big"]
    groups = ref_groups(len(SEEDS), EXTRAS)
    for m in e["summary"].methods:
        instances = groups[m.method, m.seeds]
        scores = []
        for c, index in CORRUPTIONS.items():
            y = world["data"]["y_test"][index]
            for s in range(5):
                scores.append(set_scores(instance_probs(e["arrays"][c][:, s], instances), y))
        assert m.shift.sets == 5 * len(CORRUPTIONS) == len(scores)
        accuracy, nll, ece = np.mean(scores, axis=0)
        assert m.shift.accuracy == pytest.approx(accuracy, abs=1e-12), m.method
        assert m.shift.nll == pytest.approx(nll, rel=1e-9), m.method
        assert m.shift.ece == pytest.approx(ece, abs=1e-9), m.method
    assert all(m.shift is None for m in world["experiments"]["small"]["summary"].methods)
    assert all(m.ood_auroc == {} for e in world["experiments"].values() for m in e["summary"].methods)


def test_ood_auroc_is_sklearns_on_the_negative_entropy(world, tmp_path):
    """Test images positive, OOD images negative, scored by -entropy of the averaged prediction;
    every other score as without the OOD sets."""
    e = world["experiments"]["big"]
    summary = methods_to_file(**dict(e["args"], ood=e["ood"], out=tmp_path / "methods.json"))
    groups = ref_groups(len(SEEDS), EXTRAS)
    for m, without in zip(summary.methods, e["summary"].methods):
        assert dataclasses.replace(m, ood_auroc={}) == without
        instances = groups[m.method, m.seeds]
        assert list(m.ood_auroc) == list(OOD)
        for name in OOD:
            values = []
            for rows in instances:
                t = ref_entropy(e["arrays"]["test"][list(rows)].mean(axis=0, dtype=np.float64))
                o = ref_entropy(e["arrays"][name][list(rows)].mean(axis=0, dtype=np.float64))
                values.append(roc_auc_score(np.r_[np.ones(len(t)), np.zeros(len(o))], -np.r_[t, o]))
            assert m.ood_auroc[name] == pytest.approx(np.mean(values), abs=1e-12), (m.method, name)


@pytest.mark.parametrize("kind, problem", [("noise", "damaged shift probabilities"),
                                           ("far", "damaged OOD probabilities")])
def test_extra_members_file_with_an_image_too_few_is_one_line(world, tmp_path, kind, problem):
    e = world["experiments"]["big"]
    key = "shift" if kind == "noise" else "ood"
    args = dict(e["args"], ood=e["ood"], out=tmp_path / "methods.json")
    files = list(args[key][kind])
    bad = tmp_path / "bad.npy"
    np.save(bad, np.load(files[1])[..., :-1, :])  # the extra members' file, one image short
    files[1] = str(bad)
    args[key] = {**args[key], kind: files}
    with pytest.raises(DamagedFile) as info:
        methods_to_file(**args)
    assert_damaged(str(info.value), bad, problem)
    assert not (tmp_path / "methods.json").exists()


@pytest.mark.parametrize("key, kind", [("shift", "blur"), ("ood", "near")])
def test_a_set_without_the_extra_members_file_is_refused(world, tmp_path, key, kind):
    e = world["experiments"]["big"]
    args = dict(e["args"], ood=e["ood"], out=tmp_path / "methods.json")
    args[key] = {kind: args[key][kind][:-1]}
    with pytest.raises(UserError, match=f"{kind}.*the extra members' probabilities"):
        methods_to_file(**args)
    assert not (tmp_path / "methods.json").exists()


# ------------------------------------------------------------------ frontier.json
@pytest.fixture(scope="module")
def frontier(world):
    out = world["root"] / "frontier.json"
    costs = {name: from_data(RunCostSpec, c, "cost") for name, c in COSTS.items()}
    methods = {name: str(e["path"]) for name, e in world["experiments"].items()}
    return frontier_to_file(methods, world["runs"], costs, world["data_path"], out), out


def test_frontier_costs_and_scores_of_every_method(world, frontier):
    """train_passes: epochs x full batches x batch size x passes per step, times the seeds;
    train_seconds: benchmark `s` summed over the first k seeds (pooled) or averaged over the
    seeds (one run); predict_passes: members x views; scores as in methods.json."""
    result, _ = frontier
    expected = {(name, m.method, m.seeds): (name, m) for name, e in world["experiments"].items()
                for m in e["summary"].methods}
    assert sorted((p.experiment, p.method, p.seeds) for p in result.points) == sorted(expected)
    for p in result.points:
        name, m = expected[p.experiment, p.method, p.seeds]
        c = COSTS[name]
        per_run = c["epochs"] * (N_TRAIN // c["batch_size"]) * c["batch_size"] * c["passes_per_step"]
        assert per_run == from_data(RunCostSpec, c, "cost").train_passes(N_TRAIN)
        assert p.train_passes == per_run * m.seeds
        seconds = [SECONDS[name][str(s)] for s in world["experiments"][name]["seeds"]]
        assert p.train_seconds == pytest.approx(sum(seconds[:m.seeds]) if m.seeds > 1 else np.mean(seconds),
                                                abs=5e-4), p
        assert p.predict_passes == m.members * m.views
        assert p.members == m.members
        scores = ("test_accuracy", "test_ci", "test_nll", "test_ece")
        assert [getattr(p, k) for k in scores] == [getattr(m, k) for k in scores]


def test_frontier_pareto_flags_are_the_front_of_all_points(frontier):
    result, _ = frontier
    costs = [p.train_passes for p in result.points]
    for metric, higher in FRONT_METRICS.items():
        front = ref_pareto(costs, [getattr(p, f"test_{metric}") for p in result.points], higher)
        assert [p.pareto[metric] for p in result.points] == front, metric
        assert any(front) and not all(front), metric


def test_frontier_json_reads_back(frontier):
    result, out = frontier
    assert Frontier.load(out) == result
    text = json.loads(out.read_text())
    keys = {"experiment", "method", "members", "train_passes", "train_seconds", "predict_passes",
            "test_accuracy", "test_nll", "test_ece"}
    assert "points" in text and len(text["points"]) == len(result.points)
    assert all(keys <= set(point) for point in text["points"])


# ------------------------------------------------------------------ figure and summary rows
def test_plot_frontier_writes_png_and_svg(frontier, tmp_path):
    _, out = frontier
    png, svg = tmp_path / "frontier.png", tmp_path / "frontier.svg"
    plot_frontier(out, [png, svg], dpi=30)
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert "<svg" in svg.read_text()


def test_summary_rows_are_the_best_method_at_each_budget(world, frontier):
    """The budget table lists, row by row, the points the brute-force budget reference picks."""
    result, out = frontier
    lines = frontier_lines(out, {name: str(e["path"]) for name, e in world["experiments"].items()})
    start = lines.index("|---|---|---|---|---|---|---|") + 1
    rows = lines[start:lines.index("", start)]
    points = result.points
    picks = ref_best_by_budget([p.train_passes for p in points], [p.test_accuracy for p in points], True)
    assert len(picks) >= 2  # the data gives a table of more than one row
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in rows]
    assert [(cell[2], int(cell[3].split(" x ")[0])) for cell in cells] == [
        (f"{points[i].experiment}/{points[i].method}", points[i].seeds) for i in picks]
    # the table's second part: a row per method of one run and per deep ensemble of all seeds
    rest = [line for line in lines[start + len(rows):] if line.startswith(("| big ", "| small "))]
    assert len(rest) == sum(1 for e in world["experiments"].values() for m in e["summary"].methods
                            if m.seeds in (1, len(e["seeds"])))


def test_pooled_costs_follow_the_configs_seed_order_not_the_numbers(world, tmp_path):
    """Seeds listed out of order ([11, 2, 10]): the deep ensemble of k pools the first k seeds as
    listed, so its training seconds are theirs, and the frontier accepts the order."""
    data = world["data"]
    order = [11, 2, 10]
    e = write_experiment(tmp_path / "shuffled", world["data_path"], data, order, [], False, 2)
    methods = {"shuffled": str(e["path"])}
    runs = {"shuffled": world["runs"]["big"]}
    costs = {"shuffled": from_data(RunCostSpec, COSTS["big"], "cost")}
    frontier = frontier_to_file(methods, runs, costs, world["data_path"], tmp_path / "frontier.json")
    seconds = {int(s): read_benchmark_seconds(f["benchmark"]) for s, f in runs["shuffled"].items()}
    pair = next(p for p in frontier.points if p.method == "deep_ensemble" and p.seeds == 2)
    assert pair.train_seconds == pytest.approx(seconds[11] + seconds[2], abs=1e-3)
