"""Every `report` subcommand run in-process through the CLI on tiny synthetic files."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from cifar_ensembles import report
from cifar_ensembles.analysis import compare_to_files, ensemble_to_files
from cifar_ensembles.cli import main
from cifar_ensembles.errors import UserError

HISTORY_COLUMNS = ["epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "ema_val_loss",
                   "ema_val_acc", "seconds", "images_per_second"]
BENCHMARK_HEADER = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DPI = "40"
N_VAL, N_TEST, C = 30, 40, 4
EXPERIMENTS = {"baseline": [0, 1, 2], "ablation": [1, 2]}
BENCH_SECONDS = {("baseline", 0): 12.5, ("baseline", 1): 14.0, ("baseline", 2): 13.0,
                 ("ablation", 1): 30.0, ("ablation", 2): 31.5}
PUBLISHED = {"ablation": {"test_accuracy": 0.9, "k": 2, "note": "soft vote of 6 models: 97.68%"}}


def member_probs(rng, labels, skill):
    """Probabilities with p_true around `skill` (NLL about 0.5 for skill 0.6), some wrong."""
    n = len(labels)
    p = rng.dirichlet(np.ones(C), n) * (1 - skill)
    p[np.arange(n), labels] += skill * rng.uniform(0.3, 1.7, n)
    return (p / p.sum(-1, keepdims=True)).astype(np.float32)


def write_history(path: Path, rng, epochs=4, ema=True):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(HISTORY_COLUMNS)
        for e in range(1, epochs + 1):
            acc = 0.5 + 0.1 * e + rng.uniform(-0.02, 0.02)
            w.writerow([e, 1e-4 / e, 1.5 / e, acc, 1.6 / e, acc - 0.05,
                        f"{1.55 / e:.4f}" if ema else "", f"{acc - 0.04:.4f}" if ema else "",
                        10.0 * e, 1000.0 + 100 * e + rng.uniform(0, 10)])


def write_benchmark(path: Path, seconds: float):
    path.write_text(f"{BENCHMARK_HEADER}\n{seconds}\t0:00:{int(seconds):02d}\t812.3\t2345.6\t700.1\t"
                    f"750.2\t10.5\t2.25\t95.1\t{seconds * 0.9:.2f}\n")


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    rng = np.random.default_rng(0)
    y_val, y_test = rng.integers(0, C, N_VAL), rng.integers(0, C, N_TEST)
    data = root / "data.npz"
    np.savez(data, y_val=y_val, y_test=y_test)
    ensembles, runs, test_probs, histories = {}, {}, {}, {}
    for name, seeds in EXPERIMENTS.items():
        folder = root / "results" / name
        folder.mkdir(parents=True)
        val_paths, test_paths = [], []
        runs[name], test_probs[name], histories[name] = {}, {}, []
        for seed in seeds:
            d = folder / str(seed)
            d.mkdir()
            np.save(d / "probs_val.npy", member_probs(rng, y_val, 0.6))
            np.save(d / "probs_test.npy", member_probs(rng, y_test, 0.6))
            val_paths.append(d / "probs_val.npy")
            test_paths.append(d / "probs_test.npy")
            write_history(d / "history.csv", rng, ema=(name == "baseline"))
            write_benchmark(d / "benchmark.tsv", BENCH_SECONDS[(name, seed)])
            runs[name][str(seed)] = {"benchmark": str(d / "benchmark.tsv"), "history": str(d / "history.csv")}
            test_probs[name][str(seed)] = str(d / "probs_test.npy")
            histories[name].append(str(d / "history.csv"))
        ensemble_to_files(data, seeds, val_paths, test_paths, "soft", folder / "ensemble.csv",
                          folder / "ensemble.json", max_subsets=4, bootstrap=200)
        ensembles[name] = str(folder / "ensemble.json")
    comparisons = root / "results" / "comparisons.json"
    compare_to_files(test_probs, data, comparisons)
    solo = root / "results" / "solo" / "history.csv"
    solo.parent.mkdir(parents=True)
    write_history(solo, rng, epochs=3)
    return {"root": root, "data": data, "ensembles": ensembles, "runs": runs, "test_probs": test_probs,
            "histories": histories, "solo": str(solo), "comparisons": comparisons, "y_test": y_test,
            "out": root / "results" / "report"}


@pytest.fixture
def figures(monkeypatch):
    """The matplotlib figures the report saves, kept for inspection."""
    saved = []
    original = report.save_figure

    def keep(fig, paths):
        saved.append(fig)
        original(fig, paths)

    monkeypatch.setattr(report, "save_figure", keep)
    return saved


def assert_figures(png: Path, svg: Path):
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert png.stat().st_size > 2000
    text = svg.read_text()
    assert "<svg" in text
    assert len(text) > 2000
    assert_no_temp_files(png.parent)


def assert_no_temp_files(folder: Path):
    assert not [p.name for p in Path(folder).rglob(".*")]


def figure_pair(case, stem):
    return case["out"] / f"{stem}.png", case["out"] / f"{stem}.svg"


def legend_labels(fig):
    return [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]


# ---------------------------------------------------------------- figures


def test_training_curves_several_seeds_with_ema(case, figures):
    png, svg = figure_pair(case, "baseline/training_curves")
    assert main(["report", "curves", "--experiment", "baseline", "--inputs", *case["histories"]["baseline"],
                 "--dpi", DPI, "--out", str(png), str(svg)]) == 0
    assert_figures(png, svg)
    (fig,) = figures
    assert "validation (EMA)" in legend_labels(fig)
    assert all(len(ax.collections) == 3 for ax in fig.axes)         # one min-max band per curve
    assert "mean of 3 seeds" in fig._suptitle.get_text()


def test_training_curves_without_ema_values(case, figures):
    png, svg = figure_pair(case, "ablation/training_curves")
    assert main(["report", "curves", "--experiment", "ablation", "--inputs", *case["histories"]["ablation"],
                 "--dpi", DPI, "--out", str(png), str(svg)]) == 0
    assert_figures(png, svg)
    labels = legend_labels(figures[0])
    assert "validation (EMA)" not in labels and "validation" in labels


def test_training_curves_single_seed_has_no_band(case, figures):
    png, svg = figure_pair(case, "solo/training_curves")
    assert main(["report", "curves", "--experiment", "solo", "--inputs", case["solo"],
                 "--dpi", DPI, "--out", str(png), str(svg)]) == 0
    assert_figures(png, svg)
    (fig,) = figures
    assert all(len(ax.collections) == 0 for ax in fig.axes)
    assert all(len(ax.lines) == 3 for ax in fig.axes)
    assert "seeds" not in fig._suptitle.get_text()


def test_ensemble_curve_without_published(case, figures):
    png, svg = figure_pair(case, "baseline/ensemble_curve")
    assert main(["report", "ensemble", "--experiment", "baseline", "--inputs", case["ensembles"]["baseline"],
                 "--dpi", DPI, "--out", str(png), str(svg)]) == 0
    assert_figures(png, svg)
    assert not any(label.startswith("the report") for label in legend_labels(figures[0]))
    # the rule passes an empty object when there is no published number
    assert main(["report", "ensemble", "--experiment", "baseline", "--inputs", case["ensembles"]["baseline"],
                 "--published", "{}", "--dpi", DPI, "--out", str(png), str(svg)]) == 0
    assert_figures(png, svg)


def test_ensemble_curve_with_published(case, figures):
    png, svg = figure_pair(case, "ablation/ensemble_curve")
    assert main(["report", "ensemble", "--experiment", "ablation", "--inputs", case["ensembles"]["ablation"],
                 "--published", json.dumps(PUBLISHED["ablation"]), "--dpi", DPI,
                 "--out", str(png), str(svg)]) == 0
    assert_figures(png, svg)
    assert "the report: 90.00% (k=2)" in legend_labels(figures[0])
    summary = json.loads(Path(case["ensembles"]["ablation"]).read_text())
    texts = [t.get_text() for t in figures[0].axes[1].texts]
    assert any(f"chosen k={summary['chosen_k']}: {100 * summary['test_accuracy']:.2f}%" in t for t in texts)


def test_reliability(case, figures):
    png, svg = figure_pair(case, "baseline/reliability")
    probs = [case["test_probs"]["baseline"][str(s)] for s in EXPERIMENTS["baseline"]]
    assert main(["report", "reliability", "--experiment", "baseline",
                 "--inputs", case["ensembles"]["baseline"], str(case["data"]), *probs,
                 "--ece-bins", "10", "--dpi", DPI, "--out", str(png), str(svg)]) == 0
    assert_figures(png, svg)
    summary = json.loads(Path(case["ensembles"]["baseline"]).read_text())
    titles = [ax.get_title() for ax in figures[0].axes]
    assert f"seed {summary['best_single_seed']}" in titles[0]
    assert f"mean of {summary['chosen_k']} members" in titles[1]


def test_accuracy_bars(case):
    png, svg = figure_pair(case, "accuracy")
    assert main(["report", "accuracy", "--experiments", json.dumps(case["ensembles"]), "--dpi", DPI,
                 "--out", str(png), str(svg)]) == 0
    assert_figures(png, svg)


def test_cost(case):
    png, svg = figure_pair(case, "cost")
    assert main(["report", "cost", "--runs", json.dumps(case["runs"]), "--dpi", DPI,
                 "--out", str(png), str(svg)]) == 0
    assert_figures(png, svg)


# ---------------------------------------------------------------- summary


def md_table(text):
    """The first markdown table of `text` as a list of dicts keyed by its header."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [h.strip() for h in lines[0].strip("|").split("|")]
    rows = []
    for line in lines[2:]:
        if line.startswith("|---"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) != len(header):
            break
        rows.append(dict(zip(header, cells)))
    return rows


def g6(value):
    """A number as summary.csv writes it: six significant digits."""
    return f"{value:.6g}"


def direct_nll(path, labels):
    p = np.load(path)
    return -sum(math.log(float(p[i, y])) for i, y in enumerate(labels)) / len(labels)


def run_summary(case, out_md, out_csv, with_comparisons=True, published=True):
    args = ["report", "summary", "--experiments", json.dumps(case["ensembles"]),
            "--runs", json.dumps(case["runs"])]
    if with_comparisons:
        args += ["--inputs", str(case["comparisons"])]
    if published:
        args += ["--published", json.dumps(PUBLISHED)]
    return main(args + ["--out", str(out_md), str(out_csv)])


def test_summary_markdown_and_csv(case):
    out_md, out_csv = case["out"] / "summary.md", case["out"] / "summary.csv"
    assert run_summary(case, out_md, out_csv) == 0
    text = out_md.read_text()
    with open(out_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["experiment"] for r in rows] == list(EXPERIMENTS)
    table = md_table(text)
    assert [r["experiment"] for r in table] == list(EXPERIMENTS)

    for name, row, md in zip(EXPERIMENTS, rows, table):
        assert name in text
        s = json.loads(Path(case["ensembles"][name]).read_text())
        seeds = EXPERIMENTS[name]
        # ensemble numbers as in ensemble.json
        assert md["ensemble: test acc [95% CI]"].startswith(f"{100 * s['test_accuracy']:.2f}%")
        assert f"{100 * s['test_accuracy']:.2f}%" in text
        lo, hi = s["test_ci"]
        assert md["ensemble: test acc [95% CI]"].endswith(f"[{100 * lo:.2f}, {100 * hi:.2f}]")
        assert md["ensemble: val acc"] == f"{100 * s['val_accuracy']:.2f}%"
        assert md["ensemble (chosen on val)"] == f"soft, k={s['chosen_k']}"
        assert md["seeds"] == str(len(seeds)) == row["seeds"]
        assert row["ensemble_test_acc"] == g6(s["test_accuracy"])
        assert row["ensemble_val_acc"] == g6(s["val_accuracy"])
        assert int(row["ensemble_k"]) == s["chosen_k"]
        assert row["ensemble_test_ci_low"] == g6(lo)
        assert row["ensemble_test_ci_high"] == g6(hi)
        assert row["ensemble_temperature"] == g6(s["calibration"]["temperature"])
        assert row["greedy_members"].split() == [str(m) for m in s["greedy"]["members"]]
        # single-model NLL: a plain mean of NLLs (about 0.5), never scaled to percent
        nlls = [direct_nll(case["test_probs"][name][str(seed)], case["y_test"]) for seed in seeds]
        mean_nll = sum(nlls) / len(nlls)
        assert 0.2 < mean_nll < 0.9
        assert float(row["single_test_nll_mean"]) == pytest.approx(mean_nll, rel=1e-5)
        assert md["single: test NLL"].startswith(f"{mean_nll:.3f}")
        assert md["single: test NLL"].startswith("0.")
        test_acc = [r["test_accuracy"] for r in s["singles"]]
        assert row["single_test_acc_mean"] == g6(np.mean(test_acc))
        sd = math.sqrt(sum((a - np.mean(test_acc)) ** 2 for a in test_acc) / (len(test_acc) - 1))
        assert float(row["single_test_acc_std"]) == pytest.approx(sd, rel=1e-5)
        assert md["single: test acc"] == f"{100 * np.mean(test_acc):.2f} ± {100 * sd:.2f}%"
        # cost: benchmark seconds and mean training images/second
        seconds = [BENCH_SECONDS[(name, seed)] for seed in seeds]
        assert row["seconds_per_model"] == g6(sum(seconds) / len(seconds))
        speeds = []
        for seed in seeds:
            with open(case["runs"][name][str(seed)]["history"], newline="") as f:
                values = [float(r["images_per_second"]) for r in csv.DictReader(f)]
            speeds.append(sum(values) / len(values))
        assert float(row["train_images_per_second"]) == pytest.approx(sum(speeds) / len(speeds), rel=1e-5)
        assert md["cost per model"] == (f"{sum(seconds) / len(seconds):,.0f} s, "
                                        f"{sum(speeds) / len(speeds):,.0f} img/s")
    # published numbers
    assert rows[1]["published_test_acc"] == "0.9" and rows[0]["published_test_acc"] == ""
    assert PUBLISHED["ablation"]["note"] in text

    # paired comparisons
    pairs = json.loads(case["comparisons"].read_text())["pairs"]
    assert len(pairs) == 1
    assert "## Paired comparisons" in text
    pair = pairs[0]
    line = next(line for line in text.splitlines() if line.startswith("| baseline | ablation |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[2] == "2"
    assert cells[3] == f"{100 * pair['mean_single_difference']:+.2f} points"
    assert cells[4] == ", ".join(f"{r['p_value']:.3g}" for r in pair["per_seed"])
    assert cells[5] == (f"{100 * pair['ensemble']['accuracy_a']:.2f}% vs "
                        f"{100 * pair['ensemble']['accuracy_b']:.2f}%")
    assert cells[6] == f"{pair['ensemble']['p_value']:.3g}"
    assert_no_temp_files(case["root"])


def test_summary_without_comparisons_or_published(case, tmp_path):
    out_md, out_csv = tmp_path / "s" / "summary.md", tmp_path / "s" / "summary.csv"
    assert run_summary(case, out_md, out_csv, with_comparisons=False, published=False) == 0
    text = out_md.read_text()
    assert "Paired comparisons" not in text
    assert all(name in text for name in EXPERIMENTS)
    with open(out_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and all(r["published_test_acc"] == "" for r in rows)
    assert_no_temp_files(out_md.parent)


def test_summary_with_empty_comparisons(case, tmp_path):
    empty = tmp_path / "comparisons.json"
    empty.write_text(json.dumps({"test": "exact McNemar", "pairs": []}))
    out_md, out_csv = tmp_path / "summary.md", tmp_path / "summary.csv"
    args = ["report", "summary", "--experiments", json.dumps(case["ensembles"]), "--runs",
            json.dumps(case["runs"]), "--inputs", str(empty), "--out", str(out_md), str(out_csv)]
    assert main(args) == 0
    assert "Paired comparisons" not in out_md.read_text()


# ---------------------------------------------------------------- inputs the report cannot use


def test_read_benchmark_reads_seconds(tmp_path):
    path = tmp_path / "benchmark.tsv"
    write_benchmark(path, 12.5)
    assert report.read_benchmark(path) == 12.5


@pytest.mark.parametrize("content", [
    "",                                                   # empty
    BENCHMARK_HEADER + "\n",                              # header only
    "seconds\tmax_rss\n12.5\t800\n",                       # no `s` column
    BENCHMARK_HEADER + "\nNA\t0:00:12\t1\t1\t1\t1\t1\t1\t1\t1\n",   # not a number
])
def test_read_benchmark_rejects_bad_files(tmp_path, content):
    path = tmp_path / "bad_benchmark.tsv"
    path.write_text(content)
    with pytest.raises(UserError, match="bad_benchmark.tsv"):
        report.read_benchmark(path)


def test_read_benchmark_missing_file(tmp_path):
    with pytest.raises(UserError, match="missing.tsv"):
        report.read_benchmark(tmp_path / "missing.tsv")


def test_cost_cli_reports_bad_benchmark(case, tmp_path, capsys):
    bad = tmp_path / "broken.tsv"
    bad.write_text("nothing here\n")
    runs = {"x": {"0": {"benchmark": str(bad), "history": case["solo"]}}}
    out = tmp_path / "figs"
    assert main(["report", "cost", "--runs", json.dumps(runs), "--out", str(out / "cost.png")]) == 2
    assert "broken.tsv" in capsys.readouterr().err
    assert not out.exists() or not list(out.iterdir())
