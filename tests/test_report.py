"""Every `report` subcommand run in-process through the CLI on tiny synthetic files, and the
files the report reads back (ensemble.json, comparisons.json, history.csv, benchmark.tsv,
probs_test.npy) damaged by hand: each a one-line error naming the file and how to rebuild it."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_damaged, cli, ensemble_spec, ref_nll

from cifar_ensembles.cli import main
from cifar_ensembles.config.convert import from_data
from cifar_ensembles.config.spec import PublishedSpec, RunCostSpec
from cifar_ensembles.errors import UserError
from cifar_ensembles.files.ensemble_summary import Comparisons, EnsembleSummary
from cifar_ensembles.files.records import DamagedFile
from cifar_ensembles.files.training_run import (
    HISTORY_FIELDS,
    HistoryRow,
    history_csv,
    read_benchmark_seconds,
    read_history,
    write_history,
)
from cifar_ensembles.stages.ensemble import compare_to_files, ensemble_to_files
from cifar_ensembles.stages.frontier import frontier_to_file, methods_to_file
from cifar_ensembles.stages.report import figures as report
from cifar_ensembles.stages.report import plotting, shift_figures, summary

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


def history_rows(rng, epochs=4, ema=True) -> list[HistoryRow]:
    rows = []
    for e in range(1, epochs + 1):
        acc = 0.5 + 0.1 * e + rng.uniform(-0.02, 0.02)
        rows.append(HistoryRow(epoch=e, lr=1e-4 / e, train_loss=1.5 / e, train_acc=acc, val_loss=1.6 / e,
                               val_acc=acc - 0.05, ema_val_loss=1.55 / e if ema else None,
                               ema_val_acc=acc - 0.04 if ema else None, seconds=10.0 * e,
                               images_per_second=1000.0 + 100 * e + rng.uniform(0, 10)))
    return rows


def write_benchmark(path: Path, seconds: float):
    path.write_text(f"{BENCHMARK_HEADER}\n{seconds}\t0:00:{int(seconds):02d}\t812.3\t2345.6\t700.1\t"
                    f"750.2\t10.5\t2.25\t95.1\t{seconds * 0.9:.2f}\n")


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    rng = np.random.default_rng(0)
    y_val, y_test = rng.integers(0, C, N_VAL), rng.integers(0, C, N_TEST)
    data = root / "data.npz"
    np.savez(data, y_train=rng.integers(0, C, 100), y_val=y_val, y_test=y_test,
             classes=np.array([f"class{i}" for i in range(C)]))
    ensembles, runs, test_probs, histories, methods = {}, {}, {}, {}, {}
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
            write_history(d / "history.csv", history_rows(rng, ema=(name == "baseline")))
            write_benchmark(d / "benchmark.tsv", BENCH_SECONDS[(name, seed)])
            runs[name][str(seed)] = {"benchmark": str(d / "benchmark.tsv"), "history": str(d / "history.csv")}
            test_probs[name][str(seed)] = str(d / "probs_test.npy")
            histories[name].append(str(d / "history.csv"))
        ensemble_to_files(data, seeds, val_paths, test_paths, ensemble_spec(max_subsets=4, bootstrap=200),
                          folder / "ensemble.csv", folder / "ensemble.json")
        ensembles[name] = str(folder / "ensemble.json")
        methods[name] = str(folder / "methods.json")
        methods_to_file(name, data, seeds, val_paths, test_paths, [], [], [], {}, {}, {},
                        ensemble_spec(bootstrap=200), 1, methods[name])
    comparisons = root / "results" / "comparisons.json"
    compare_to_files(test_probs, data, comparisons)
    frontier = root / "results" / "frontier.json"
    frontier_to_file(methods, runs, {name: RunCostSpec(2, 16, 1) for name in methods}, data, frontier)
    solo = root / "results" / "solo" / "history.csv"
    solo.parent.mkdir(parents=True)
    write_history(solo, history_rows(rng, epochs=3))
    return {"root": root, "data": data, "ensembles": ensembles, "runs": runs, "test_probs": test_probs,
            "histories": histories, "solo": str(solo), "comparisons": comparisons, "y_test": y_test,
            "methods": methods, "frontier": frontier,
            "out": root / "results" / "report"}


@pytest.fixture
def figures(monkeypatch):
    """The matplotlib figures the report saves, kept for inspection."""
    saved = []
    original = plotting.save_figure

    def keep(fig, paths):
        saved.append(fig)
        original(fig, paths)

    for module in (report, shift_figures):  # each imported it by name
        monkeypatch.setattr(module, "save_figure", keep)
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


def curves_args(experiment, histories, png, svg):
    return ["report", "curves", "--experiment", experiment, "--histories", *map(str, histories),
            "--dpi", DPI, "--out", str(png), str(svg)]


def ensemble_args(experiment, summary, published, png, svg):
    return ["report", "ensemble", "--experiment", experiment, "--summary", str(summary),
            "--published", published, "--dpi", DPI, "--out", str(png), str(svg)]


def reliability_args(experiment, summary, data, probs, png, svg, ece_bins="10"):
    return ["report", "reliability", "--experiment", experiment, "--summary", str(summary),
            "--data", str(data), "--test", *map(str, probs), "--ece-bins", ece_bins, "--dpi", DPI,
            "--out", str(png), str(svg)]


def test_training_curves_several_seeds_with_ema(case, figures):
    png, svg = figure_pair(case, "baseline/training_curves")
    assert main(curves_args("baseline", case["histories"]["baseline"], png, svg)) == 0
    assert_figures(png, svg)
    (fig,) = figures
    assert "validation (EMA)" in legend_labels(fig)
    assert all(len(ax.collections) == 3 for ax in fig.axes)         # one min-max band per curve
    assert "mean of 3 seeds" in fig._suptitle.get_text()


def test_training_curves_without_ema_values(case, figures):
    png, svg = figure_pair(case, "ablation/training_curves")
    assert main(curves_args("ablation", case["histories"]["ablation"], png, svg)) == 0
    assert_figures(png, svg)
    labels = legend_labels(figures[0])
    assert "validation (EMA)" not in labels and "validation" in labels


def test_training_curves_single_seed_has_no_band(case, figures):
    png, svg = figure_pair(case, "solo/training_curves")
    assert main(curves_args("solo", [case["solo"]], png, svg)) == 0
    assert_figures(png, svg)
    (fig,) = figures
    assert all(len(ax.collections) == 0 for ax in fig.axes)
    assert all(len(ax.lines) == 3 for ax in fig.axes)
    assert "seeds" not in fig._suptitle.get_text()


def test_training_curves_with_epochs_without_validation(case, tmp_path, figures):
    # runtime.eval_every_epochs = 2: odd epochs have empty validation cells, drawn as gaps
    rows = history_rows(np.random.default_rng(3), epochs=4, ema=False)
    rows = [r if r.epoch % 2 == 0 else dataclasses.replace(r, val_loss=None, val_acc=None) for r in rows]
    path = tmp_path / "history.csv"
    write_history(path, rows)
    columns = report.history_columns(path)
    assert np.isnan(columns["val_acc"][[0, 2]]).all() and not np.isnan(columns["val_acc"][[1, 3]]).any()
    png, svg = tmp_path / "c.png", tmp_path / "c.svg"
    assert main(curves_args("sparse", [path], png, svg)) == 0
    assert_figures(png, svg)
    best = max(r.val_acc for r in rows if r.val_acc is not None)
    assert figures[0].axes[0].get_title() == f"best validation accuracy {100 * best:.2f}%"


def test_ensemble_curve_without_published(case, figures):
    png, svg = figure_pair(case, "baseline/ensemble_curve")
    # the rule passes null when report.published has no entry for the experiment
    assert main(ensemble_args("baseline", case["ensembles"]["baseline"], "null", png, svg)) == 0
    assert_figures(png, svg)
    assert not any(label.startswith("the report") for label in legend_labels(figures[0]))


def test_ensemble_curve_published_must_be_complete(case, tmp_path, capsys):
    png, svg = tmp_path / "e.png", tmp_path / "e.svg"
    assert main(ensemble_args("baseline", case["ensembles"]["baseline"], "{}", png, svg)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--published" in err[0], err
    assert not png.exists() and not svg.exists()


def test_ensemble_curve_with_published(case, figures):
    png, svg = figure_pair(case, "ablation/ensemble_curve")
    assert main(ensemble_args("ablation", case["ensembles"]["ablation"], json.dumps(PUBLISHED["ablation"]),
                              png, svg)) == 0
    assert_figures(png, svg)
    assert "the report: 90.00% (k=2)" in legend_labels(figures[0])
    summary = EnsembleSummary.load(case["ensembles"]["ablation"])
    texts = [t.get_text() for t in figures[0].axes[1].texts]
    assert any(f"chosen k={summary.chosen_k}: {100 * summary.test_accuracy:.2f}%" in t for t in texts)


def test_plot_functions_take_typed_published(case, tmp_path, figures):
    published = from_data(PublishedSpec, PUBLISHED["ablation"])
    out = (tmp_path / "e.png", tmp_path / "e.svg")
    report.plot_ensemble_curve(case["ensembles"]["ablation"], "ablation", out, published, dpi=30)
    assert "the report: 90.00% (k=2)" in legend_labels(figures[0])
    assert figures[0].dpi == 30
    report.plot_ensemble_curve(case["ensembles"]["ablation"], "ablation", out, None, dpi=30)
    assert not any(label.startswith("the report") for label in legend_labels(figures[1]))


def test_reliability(case, figures):
    png, svg = figure_pair(case, "baseline/reliability")
    probs = [case["test_probs"]["baseline"][str(s)] for s in EXPERIMENTS["baseline"]]
    args = reliability_args("baseline", case["ensembles"]["baseline"], case["data"], probs, png, svg)
    assert main(args) == 0
    assert_figures(png, svg)
    summary = EnsembleSummary.load(case["ensembles"]["baseline"])
    titles = [ax.get_title() for ax in figures[0].axes]
    assert f"seed {summary.best_single_seed}" in titles[0]
    assert f"mean of {summary.chosen_k} members" in titles[1]
    assert "(10 equal-width bins)" in figures[0]._suptitle.get_text()


def test_reliability_needs_one_test_file_per_seed(case, tmp_path, capsys):
    probs = [case["test_probs"]["baseline"][str(s)] for s in EXPERIMENTS["baseline"]]
    png, svg = tmp_path / "r.png", tmp_path / "r.svg"
    assert main(reliability_args("baseline", case["ensembles"]["baseline"], case["data"], probs[:2],
                                 png, svg)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "2 test probability files for the 3 seeds" in err[0], err
    assert not png.exists() and not svg.exists()


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


@pytest.mark.parametrize("what,args", [
    ("curves", ["--experiment", "x", "--histories", "h.csv", "--out", "a.png", "a.svg"]),          # no --dpi
    ("ensemble", ["--experiment", "x", "--summary", "e.json", "--dpi", "40", "--out", "a.png", "a.svg"]),
    ("reliability", ["--experiment", "x", "--summary", "e.json", "--data", "d.npz", "--test", "p.npy",
                     "--dpi", "40", "--out", "a.png", "a.svg"]),            # no --ece-bins
    ("summary", ["--experiments", "{}", "--runs", "{}", "--published", "null", "--out", "s.md", "s.csv"]),
])
def test_report_options_are_required(what, args, capsys):
    with pytest.raises(SystemExit) as info:
        main(["report", what, *args])
    assert info.value.code == 2
    assert "required" in capsys.readouterr().err


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


def summary_args(case, out_md, out_csv, comparisons=None, published=None, ensembles=None, runs=None):
    return ["report", "summary", "--experiments", json.dumps(ensembles or case["ensembles"]),
            "--runs", json.dumps(runs or case["runs"]),
            "--comparisons", str(comparisons or case["comparisons"]),
            "--published", json.dumps(PUBLISHED if published is None else published),
            "--shift", "{}", "--diversity", "{}", "--ood", "{}", "--selective", "{}",
            "--frontier", str(case["frontier"]),
            "--methods", json.dumps({e: case["methods"][e] for e in (ensembles or case["ensembles"])}),
            "--out", str(out_md), str(out_csv)]


def run_summary(case, out_md, out_csv, **files):
    return main(summary_args(case, out_md, out_csv, **files))


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
        nlls = [ref_nll(np.load(case["test_probs"][name][str(seed)]), case["y_test"]) for seed in seeds]
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
    # write_summary itself takes no comparisons (a workflow without pairs) and no published numbers
    out_md, out_csv = tmp_path / "s" / "summary.md", tmp_path / "s" / "summary.csv"
    summary.write_summary(case["ensembles"], case["runs"], None, None, out_md, out_csv)
    text = out_md.read_text()
    assert "Paired comparisons" not in text
    assert all(name in text for name in EXPERIMENTS)
    with open(out_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and all(r["published_test_acc"] == "" for r in rows)
    assert_no_temp_files(out_md.parent)


def test_summary_cli_with_published_null(case, tmp_path):
    # the rule passes null when report.published is null
    out_md, out_csv = tmp_path / "summary.md", tmp_path / "summary.csv"
    args = summary_args(case, out_md, out_csv)
    args[args.index("--published") + 1] = "null"
    assert main(args) == 0
    with open(out_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and all(r["published_test_acc"] == "" for r in rows)
    assert "## Paired comparisons" in out_md.read_text()


def test_summary_with_empty_comparisons(case, tmp_path):
    empty = tmp_path / "comparisons.json"
    empty.write_text(json.dumps({"format": "cifar-ensembles/comparisons-1", "test": "exact McNemar",
                                 "pairs": []}))
    out_md, out_csv = tmp_path / "summary.md", tmp_path / "summary.csv"
    assert run_summary(case, out_md, out_csv, comparisons=empty) == 0
    assert "Paired comparisons" not in out_md.read_text()


# ---------------------------------------------------------------- damaged files the report reads back


def one_error_line(capsys, command: str) -> str:
    """The one line `main` printed on stderr for a user error, without its prefix."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    prefix = f"cifar-ensembles {command}: error: "
    assert lines[0].startswith(prefix), lines
    return lines[0][len(prefix):]


def assert_command_fails_on(proc, path, problem: str) -> None:
    """A real `cifar-ensembles` subprocess: exit 2, one line on stderr naming the file, no traceback."""
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("cifar-ensembles report: error: ")
    assert_damaged(lines[0], path, problem)


def nothing_written(*paths) -> bool:
    return not any(Path(p).exists() for p in paths)


# -- benchmark.tsv (Snakemake's, read back for the cost figure and the summary)


def test_read_benchmark_reads_seconds(tmp_path):
    path = tmp_path / "benchmark.tsv"
    write_benchmark(path, 12.5)
    assert read_benchmark_seconds(path) == 12.5


BAD_BENCHMARKS = {
    "empty": ("", "not a Snakemake benchmark file"),
    "header only": (BENCHMARK_HEADER + "\n", "not a Snakemake benchmark file"),
    "no s column": ("seconds\tmax_rss\n12.5\t800\n", "not a Snakemake benchmark file"),
    "not a number": (BENCHMARK_HEADER + "\nNA\t0:00:12\t1\t1\t1\t1\t1\t1\t1\t1\n", "ValueError"),
    "empty row": (BENCHMARK_HEADER + "\n\t\n", "not a Snakemake benchmark file"),
    "nan": (BENCHMARK_HEADER + "\nnan\t0:00:12\t1\t1\t1\t1\t1\t1\t1\t1\n", "s = nan"),
    "negative": (BENCHMARK_HEADER + "\n-3.0\t0:00:12\t1\t1\t1\t1\t1\t1\t1\t1\n", "s = -3.0"),
}


@pytest.mark.parametrize("kind", list(BAD_BENCHMARKS))
def test_read_benchmark_rejects_bad_files(tmp_path, kind):
    content, problem = BAD_BENCHMARKS[kind]
    path = tmp_path / "bad_benchmark.tsv"
    path.write_text(content)
    with pytest.raises(DamagedFile) as info:
        read_benchmark_seconds(path)
    assert_damaged(str(info.value), path, problem)


def test_read_benchmark_missing_file(tmp_path):
    with pytest.raises(UserError) as info:
        read_benchmark_seconds(tmp_path / "missing.tsv")
    assert_damaged(str(info.value), tmp_path / "missing.tsv", "missing")


def test_cost_cli_reports_bad_benchmark(case, tmp_path, capsys):
    bad = tmp_path / "broken.tsv"
    bad.write_text("nothing here\n")
    runs = {"x": {"0": {"benchmark": str(bad), "history": case["solo"]}}}
    out = tmp_path / "figs"
    assert main(["report", "cost", "--runs", json.dumps(runs), "--dpi", DPI,
                 "--out", str(out / "cost.png"), str(out / "cost.svg")]) == 2
    assert_damaged(one_error_line(capsys, "report"), bad, "not a Snakemake benchmark file")
    assert not out.exists() or not list(out.iterdir())


def test_summary_cli_reports_bad_benchmark(case, tmp_path, capsys):
    bad = tmp_path / "benchmark.tsv"
    bad.write_text(BAD_BENCHMARKS["nan"][0])
    runs = json.loads(json.dumps(case["runs"]))
    runs["ablation"]["2"]["benchmark"] = str(bad)
    out_md, out_csv = tmp_path / "summary.md", tmp_path / "summary.csv"
    assert run_summary(case, out_md, out_csv, runs=runs) == 2
    assert_damaged(one_error_line(capsys, "report"), bad, "s = nan")
    assert nothing_written(out_md, out_csv)


def test_cost_command_bad_benchmark_exits_2_without_traceback(case, tmp_path):
    bad = tmp_path / "benchmark.tsv"
    bad.write_text(BAD_BENCHMARKS["not a number"][0])
    runs = {"x": {"0": {"benchmark": str(bad), "history": case["solo"]}}}
    png, svg = tmp_path / "cost.png", tmp_path / "cost.svg"
    proc = cli("report", "cost", "--runs", json.dumps(runs), "--dpi", DPI, "--out", png, svg, timeout=300)
    assert_command_fails_on(proc, bad, "ValueError")
    assert nothing_written(png, svg)


# -- history.csv


def test_history_round_trip_is_exact(tmp_path):
    rows = history_rows(np.random.default_rng(5), epochs=3, ema=False)
    path = tmp_path / "history.csv"
    write_history(path, rows)
    assert read_history(path) == rows               # floats in repr form: bit for bit
    with open(path, newline="") as f:
        assert tuple(next(csv.reader(f))) == HISTORY_FIELDS == tuple(HISTORY_COLUMNS)
    columns = report.history_columns(path)
    assert np.isnan(columns["ema_val_acc"]).all()
    assert columns["train_loss"].tolist() == [r.train_loss for r in rows]


def _history_text() -> str:
    return history_csv(history_rows(np.random.default_rng(7), epochs=3))


def _replace_cell(column: str, value: str, line: int = 2):
    def edit(text: str) -> str:
        lines = text.splitlines()
        cells = lines[line - 1].split(",")
        cells[HISTORY_COLUMNS.index(column)] = value
        lines[line - 1] = ",".join(cells)
        return "\n".join(lines) + "\n"
    return edit


def _drop_last_cell(text: str) -> str:
    lines = text.splitlines()
    lines[2] = lines[2].rsplit(",", 1)[0]
    return "\n".join(lines) + "\n"


# Each edits a good history.csv (or replaces it); `problem` is part of the one-line error.
BAD_HISTORIES = {
    "bad header": (lambda t: t.replace("train_loss", "loss", 1), "header must be epoch,lr,train_loss"),
    "columns in another order": (lambda t: t.replace("val_loss,val_acc", "val_acc,val_loss", 1), "header"),
    "empty": (lambda t: "", "header must be"),
    "header only": (lambda t: t.splitlines()[0] + "\n", "no rows"),
    "non-number cell": (_replace_cell("train_loss", "abc"),
                        'train_loss: expected a finite number, got "abc"'),
    "nan cell": (_replace_cell("train_acc", "nan"), "train_acc: expected a finite number, got nan"),
    "infinite cell": (_replace_cell("lr", "inf", line=3), "line 3"),
    "empty train cell": (_replace_cell("train_loss", ""), "train_loss"),
    "fractional epoch": (_replace_cell("epoch", "1.5"), "epoch: expected an integer, got 1.5"),
    "short row": (_drop_last_cell, "line 3 has 9 cells, expected 10"),
    "not text": (lambda t: b"epoch,lr\n\xff\xfe\x00garbage\n", "not a readable history (UnicodeDecodeError"),
}


def write_bad_history(path: Path, kind: str) -> str:
    edit, problem = BAD_HISTORIES[kind]
    content = edit(_history_text())
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return problem


@pytest.mark.parametrize("kind", list(BAD_HISTORIES))
def test_read_history_rejects_damaged_files(tmp_path, kind):
    path = tmp_path / "history.csv"
    problem = write_bad_history(path, kind)
    with pytest.raises(DamagedFile) as info:
        read_history(path)
    assert_damaged(str(info.value), path, problem)
    assert str(info.value).startswith(f"{path}: ")


def test_read_history_missing_file(tmp_path):
    with pytest.raises(DamagedFile) as info:
        read_history(tmp_path / "history.csv")
    assert_damaged(str(info.value), tmp_path / "history.csv", "missing")


@pytest.mark.parametrize("kind", list(BAD_HISTORIES))
def test_curves_cli_damaged_history_is_one_line(case, tmp_path, capsys, kind):
    bad = tmp_path / "1" / "history.csv"
    bad.parent.mkdir()
    problem = write_bad_history(bad, kind)
    png, svg = tmp_path / "out" / "c.png", tmp_path / "out" / "c.svg"
    assert main(curves_args("x", [case["solo"], bad], png, svg)) == 2
    assert_damaged(one_error_line(capsys, "report"), bad, problem)
    assert not (tmp_path / "out").exists()


def test_cost_and_summary_cli_damaged_history(case, tmp_path, capsys):
    bad = tmp_path / "history.csv"
    problem = write_bad_history(bad, "non-number cell")
    runs = json.loads(json.dumps(case["runs"]))
    runs["baseline"]["1"]["history"] = str(bad)
    png, svg = tmp_path / "cost.png", tmp_path / "cost.svg"
    args = ["report", "cost", "--runs", json.dumps(runs), "--dpi", DPI, "--out", str(png), str(svg)]
    assert main(args) == 2
    assert_damaged(one_error_line(capsys, "report"), bad, problem)
    out_md, out_csv = tmp_path / "summary.md", tmp_path / "summary.csv"
    assert run_summary(case, out_md, out_csv, runs=runs) == 2
    assert_damaged(one_error_line(capsys, "report"), bad, problem)
    assert nothing_written(png, svg, out_md, out_csv)


def test_curves_command_damaged_history_exits_2_without_traceback(case, tmp_path):
    bad = tmp_path / "history.csv"
    problem = write_bad_history(bad, "bad header")
    png, svg = tmp_path / "c.png", tmp_path / "c.svg"
    proc = cli(*curves_args("x", [bad], png, svg), timeout=300)
    assert_command_fails_on(proc, bad, problem)
    assert nothing_written(png, svg)


# -- ensemble.json


def _set(keys, value):
    """Set raw[k1][k2]... = value (an edit of the parsed file)."""
    def edit(raw):
        node = raw
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value
    return edit


def _delete(keys):
    def edit(raw):
        node = raw
        for k in keys[:-1]:
            node = node[k]
        del node[keys[-1]]
    return edit


def _shorten(keys):
    def edit(raw):
        node = raw
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = node[keys[-1]][:-1]
    return edit


# kind: (edit of the parsed JSON, or of its text with `text=True`; part of the one-line error)
DAMAGED_SUMMARIES = {
    "missing key": (_delete(["chosen_k"]), "damaged ensemble summary (chosen_k: missing)"),
    "missing nested key": (_delete(["singles", 1, "calibration", "after", "ece"]),
                           "singles[1].calibration.after.ece: missing"),
    "unknown key": (_set(["chosen_size"], 2), "chosen_size: unknown key"),
    "wrong type": (_set(["chosen_k"], "2"), 'chosen_k: expected an integer, got "2"'),
    "wrong nested type": (_set(["singles", 0, "calibration", "temperature"], "warm"),
                          "singles[0].calibration.temperature: expected a finite number"),
    "boolean for a number": (_set(["test_accuracy"], True), "test_accuracy: expected a finite number"),
    "ci of three values": (_set(["test_ci"], [0.1, 0.2, 0.3]), "test_ci: expected 2 values, got 3"),
    "NaN written as NaN": (_set(["test_accuracy"], math.nan), "NaN is not a finite number"),
    "Infinity": (_set(["greedy", "val_nll", 0], math.inf), "Infinity is not a finite number"),
    "a number too large for a float": (
        lambda text: re.sub(r'"val_accuracy": [^,]+', '"val_accuracy": 1e999', text, count=1),
        "(val_accuracy: expected a finite number, got inf)"),
    "wrong format": (_set(["format"], "cifar-ensembles/ensemble-0"), "expected 'cifar-ensembles/ensemble-1'"),
    "no format": (_delete(["format"]), "format None"),
    "a list": (lambda text: "[]", "format 'list'"),
    "truncated": (lambda text: text[: len(text) // 2], "not a readable ensemble summary (JSONDecodeError"),
    "empty": (lambda text: "", "not a readable ensemble summary"),
    # each field well typed, but the parts do not fit together
    "chosen_k beyond the seeds": (_set(["chosen_k"], 4), "chosen_k 4 for 3 seeds"),
    "chosen_k zero": (_set(["chosen_k"], 0), "chosen_k 0 for 3 seeds"),
    "members of another k": (_set(["members"], [2]), "members are not the first chosen_k seeds"),
    "a single missing": (_shorten(["singles"]), "singles are not one per seed"),
    "singles of other seeds": (_set(["singles", 0, "seed"], 7), "singles are not one per seed"),
    "best single not a seed": (_set(["best_single_seed"], 9), "best_single_seed 9 is not one of the seeds"),
    "first_k curve short": (_shorten(["first_k", "test", "soft"]), "first_k.test curves"),
    "no test curves": (_delete(["first_k", "test"]), "first_k must have val and test curves"),
    "subset curve short": (_shorten(["subsets", "val", "soft", "std"]), "subsets.val curves"),
    "subset counts short": (_shorten(["subsets", "test", "exhaustive"]), "subsets.test curves"),
    "greedy order short": (_shorten(["greedy", "order"]), "greedy selection does not fit the seeds"),
    "greedy size too large": (_set(["greedy", "chosen_size"], 5), "greedy selection does not fit the seeds"),
}
TEXT_EDITS = {"a number too large for a float", "a list", "truncated", "empty"}


def write_damaged_summary(good, path: Path, kind: str) -> str:
    edit, problem = DAMAGED_SUMMARIES[kind]
    text = Path(good).read_text()
    if kind in TEXT_EDITS:
        text = edit(text)
    else:
        raw = json.loads(text)
        edit(raw)
        text = json.dumps(raw, indent=1)      # json writes NaN and Infinity as such
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return problem


def test_the_case_summaries_load(case):
    for path in case["ensembles"].values():
        summary = EnsembleSummary.load(path)
        assert len(summary.seeds) in (2, 3)


@pytest.mark.parametrize("kind", list(DAMAGED_SUMMARIES))
def test_damaged_ensemble_summary_is_one_line(case, tmp_path, kind):
    bad = tmp_path / "ensemble.json"
    problem = write_damaged_summary(case["ensembles"]["baseline"], bad, kind)
    with pytest.raises(DamagedFile) as info:
        EnsembleSummary.load(bad)
    assert_damaged(str(info.value), bad, problem)
    assert str(info.value).startswith(f"{bad}: ")


@pytest.mark.parametrize("kind", list(DAMAGED_SUMMARIES))
def test_ensemble_curve_cli_damaged_summary_is_one_line(case, tmp_path, capsys, kind):
    bad = tmp_path / "baseline" / "ensemble.json"
    problem = write_damaged_summary(case["ensembles"]["baseline"], bad, kind)
    png, svg = tmp_path / "out" / "e.png", tmp_path / "out" / "e.svg"
    assert main(ensemble_args("baseline", bad, "null", png, svg)) == 2
    assert_damaged(one_error_line(capsys, "report"), bad, problem)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["reliability", "accuracy", "summary"])
def test_every_report_reading_the_summary_names_it(case, tmp_path, capsys, command):
    bad = tmp_path / "ablation" / "ensemble.json"
    problem = write_damaged_summary(case["ensembles"]["ablation"], bad, "NaN written as NaN")
    ensembles = {**case["ensembles"], "ablation": str(bad)}
    out = (tmp_path / "out" / "a", tmp_path / "out" / "b")
    if command == "reliability":
        probs = [case["test_probs"]["ablation"][str(s)] for s in EXPERIMENTS["ablation"]]
        args = reliability_args("ablation", bad, case["data"], probs, *out)
    elif command == "accuracy":
        args = ["report", "accuracy", "--experiments", json.dumps(ensembles), "--dpi", DPI,
                "--out", *map(str, out)]
    else:
        args = summary_args(case, *out, ensembles=ensembles)
    assert main(args) == 2
    assert_damaged(one_error_line(capsys, "report"), bad, problem)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["NaN written as NaN", "subset curve short"])
def test_ensemble_curve_command_damaged_summary_exits_2_without_traceback(case, tmp_path, kind):
    bad = tmp_path / "ensemble.json"
    problem = write_damaged_summary(case["ensembles"]["baseline"], bad, kind)
    png, svg = tmp_path / "e.png", tmp_path / "e.svg"
    proc = cli(*ensemble_args("baseline", bad, "null", png, svg), timeout=300)
    assert_command_fails_on(proc, bad, problem)
    assert nothing_written(png, svg)


# -- comparisons.json

DAMAGED_COMPARISONS = {
    "missing key": (_delete(["pairs", 0, "ensemble", "p_value"]), "pairs[0].ensemble.p_value: missing"),
    "unknown key": (_set(["pairs", 0, "q_value"], 0.5), "pairs[0].q_value: unknown key"),
    "wrong type": (_set(["pairs", 0, "shared_seeds"], "1,2"),
                   'pairs[0].shared_seeds: expected a list, got "1,2"'),
    "NaN written as NaN": (_set(["pairs", 0, "per_seed", 1, "p_value"], math.nan),
                           "NaN is not a finite number"),
    "no pairs": (_delete(["pairs"]), "pairs: missing"),
    "a list": (lambda text: "[]", "format 'list'"),
    "truncated": (lambda text: text[: len(text) // 3], "not a readable comparison file"),
}


def write_damaged_comparisons(good, path: Path, kind: str) -> str:
    edit, problem = DAMAGED_COMPARISONS[kind]
    text = Path(good).read_text()
    if kind in ("a list", "truncated"):
        text = edit(text)
    else:
        raw = json.loads(text)
        edit(raw)
        text = json.dumps(raw)
    path.write_text(text)
    return problem


def test_the_case_comparisons_load(case):
    comparisons = Comparisons.load(case["comparisons"])
    assert [(p.a, p.b, p.shared_seeds) for p in comparisons.pairs] == [("baseline", "ablation", [1, 2])]


@pytest.mark.parametrize("kind", list(DAMAGED_COMPARISONS))
def test_summary_cli_damaged_comparisons_is_one_line(case, tmp_path, capsys, kind):
    bad = tmp_path / "comparisons.json"
    problem = write_damaged_comparisons(case["comparisons"], bad, kind)
    with pytest.raises(DamagedFile) as info:
        Comparisons.load(bad)
    assert_damaged(str(info.value), bad, problem)
    out_md, out_csv = tmp_path / "summary.md", tmp_path / "summary.csv"
    assert run_summary(case, out_md, out_csv, comparisons=bad) == 2
    assert_damaged(one_error_line(capsys, "report"), bad, problem)
    assert nothing_written(out_md, out_csv)


def test_summary_cli_missing_comparisons(case, tmp_path, capsys):
    out_md, out_csv = tmp_path / "summary.md", tmp_path / "summary.csv"
    assert run_summary(case, out_md, out_csv, comparisons=tmp_path / "comparisons.json") == 2
    assert_damaged(one_error_line(capsys, "report"), tmp_path / "comparisons.json", "missing")


def test_summary_command_damaged_comparisons_exits_2_without_traceback(case, tmp_path):
    bad = tmp_path / "comparisons.json"
    problem = write_damaged_comparisons(case["comparisons"], bad, "NaN written as NaN")
    out_md, out_csv = tmp_path / "summary.md", tmp_path / "summary.csv"
    proc = cli(*summary_args(case, out_md, out_csv, comparisons=bad), timeout=300)
    assert_command_fails_on(proc, bad, problem)
    assert nothing_written(out_md, out_csv)


# -- probs_test.npy (read back by the reliability figure)


@pytest.mark.parametrize("kind", ["nan", "rows not summing to 1", "pickled object array"])
def test_reliability_cli_damaged_probabilities_is_one_line(case, tmp_path, capsys, kind):
    probs = [case["test_probs"]["baseline"][str(s)] for s in EXPERIMENTS["baseline"]]
    bad = tmp_path / "probs_test.npy"
    p = np.load(probs[1])
    if kind == "nan":
        p[3, 0], problem = np.nan, "not finite"
        np.save(bad, p)
    elif kind == "rows not summing to 1":
        p[7] *= 2.0
        np.save(bad, p)
        problem = "row 7 sums to 2"
    else:
        np.save(bad, np.array([dict(enumerate(row)) for row in p], dtype=object), allow_pickle=True)
        problem = "Object arrays cannot be loaded"
    png, svg = tmp_path / "out" / "r.png", tmp_path / "out" / "r.svg"
    assert main(reliability_args("baseline", case["ensembles"]["baseline"], case["data"],
                                 [probs[0], bad, probs[2]], png, svg)) == 2
    assert_damaged(one_error_line(capsys, "report"), bad, problem)
    assert not (tmp_path / "out").exists()
