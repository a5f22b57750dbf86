"""`cifar-ensembles`: the command the workflow's rules call, one subcommand per stage.

Each stage takes its slice of the resolved config as one JSON argument (`--spec`; the
train stage also `--runtime`), checked field by field; no option here has a default that
stands for a config value. Exit status: 0 done; 2 a problem the user must fix (bad
config, bad or damaged input, a diverged training run), named in one line on stderr;
75 (EX_TEMPFAIL) training stopped by SIGTERM/SIGUSR1 after writing its checkpoint: rerun
to resume.
"""

from __future__ import annotations

import argparse
import functools
import sys

from .config.convert import from_data, from_json
from .config.spec import (
    EnsembleSpec,
    MemberSpec,
    OodSetSpec,
    PredictSpec,
    PublishedSpec,
    RunCostSpec,
    RuntimeSpec,
    ScoringSpec,
    SelectiveSpec,
    ShiftSetSpec,
    SourceSpec,
    SplitSpec,
    TrainingSpec,
    TtaSpec,
    WeightsSpec,
)
from .errors import Preempted, UserError

EXIT_USER_ERROR = 2
EXIT_PREEMPTED = 75

# The shapes of the JSON file maps the rules pass, checked like specs.
FILES_BY_EXPERIMENT = dict[str, str]  # {experiment: ensemble.json}
FILES_BY_CORRUPTION = dict[str, str]  # {corruption: file}
FILES_BY_SET = dict[str, str]  # {OOD set: file, or its kind}
RUN_FILES = dict[str, dict[str, dict[str, str]]]  # {experiment: {seed: {benchmark: tsv, history: csv}}}
PROBS_BY_SEED = dict[str, dict[str, str]]  # {experiment: {seed: probs_test.npy}}
FILE_LISTS = dict[str, list[str]]  # {set: [final models' probabilities, and the extra members']}


def _files(tp, text: str, option: str):
    """A JSON map of files (`option`'s value), checked against its shape in one line."""
    value = from_json(tp, text, option)
    if not value:
        raise UserError(f"{option}: names no experiment")
    return value


def _spec(tp, text: str, option: str = "--spec"):
    """A stage's spec from its JSON argument, checked field by field (one-line errors)."""
    return from_json(tp, text, option)


def cmd_download(a) -> None:
    from .stages.download import download_dataset

    out = download_dataset(a.dataset, _spec(SourceSpec, a.spec), a.out)
    print(f"{a.dataset}: verified files in {out}", file=sys.stderr)


def cmd_download_weights(a) -> None:
    from .stages.download import download_weights

    out = download_weights(_spec(WeightsSpec, a.spec), a.out)
    print(f"ImageNet weights verified -> {out}", file=sys.stderr)


def cmd_prepare(a) -> None:
    from .stages.prepare import prepare_to_file

    prepared = prepare_to_file(a.dataset, _spec(SplitSpec, a.spec), a.raw, a.out)
    print(f"{a.dataset}: {len(prepared['y_train'])} train, {len(prepared['y_val'])} val, "
          f"{len(prepared['y_test'])} test images -> {a.out}", file=sys.stderr)


def _log_with_prefix(name: str, msg: str) -> None:
    print(f"[{name}] {msg}", file=sys.stderr, flush=True)


def cmd_train(a) -> None:
    from .compute.gpu_claim import claim_gpu_for_job
    from .files import splits
    from .stages.train import train_to_files

    spec, runtime = _spec(TrainingSpec, a.spec), _spec(RuntimeSpec, a.runtime, "--runtime")
    log = functools.partial(_log_with_prefix, a.name) if a.name else None
    # Several GPUs and no scheduler: take a free one (lock held until exit) before CUDA starts.
    claim_gpu_for_job(runtime.device, log, runtime.jobs_per_gpu)
    data = splits.load(a.data)
    train_to_files(spec, runtime, data, a.seed, a.out_dir, a.checkpoint, a.threads, a.weights, log)


def cmd_predict(a) -> None:
    from .compute.gpu_claim import SLOTS, claim_gpu_for_job
    from .stages.predict import predict_to_files

    spec = _spec(PredictSpec, a.spec)
    claim_gpu_for_job(spec.device, None, jobs_per_gpu=SLOTS)  # one slot: predictions are short
    predict_to_files(a.model, a.data, a.split, a.probs, a.metrics, spec, a.threads)


def cmd_predict_member(a) -> None:
    from .compute.gpu_claim import SLOTS, claim_gpu_for_job
    from .stages.predict import predict_member_to_files

    spec = _spec(PredictSpec, a.spec)
    tta = a.member == "tta"
    member = from_data(MemberSpec, {"weights": a.weights, "member": None if tta else a.member, "tta": tta},
                       "--member")
    claim_gpu_for_job(spec.device, None, jobs_per_gpu=SLOTS)
    tta = _spec(TtaSpec, a.tta, "--tta") if a.tta is not None else None
    predict_member_to_files(member, tta, a.data, {"val": a.val, "test": a.test}, a.metrics, spec, a.threads)


def cmd_ensemble(a) -> None:
    from .stages.ensemble import ensemble_to_files

    ensemble_to_files(a.data, a.seeds, a.val, a.test, _spec(EnsembleSpec, a.spec), a.csv, a.json)


def cmd_compare(a) -> None:
    from .stages.ensemble import compare_to_files

    compare_to_files(_files(PROBS_BY_SEED, a.experiments, "--experiments"), a.data, a.out)


def cmd_shift_set(a) -> None:
    from .stages.shift import make_shift_set

    x = make_shift_set(a.dataset, a.corruption, _spec(ShiftSetSpec, a.spec), a.data, a.out)
    print(f"{a.corruption}: severities 1-5 of {x.shape[1]} test images -> {a.out}", file=sys.stderr)


def cmd_predict_members(a) -> None:
    """Every member of one experiment on one prepared set (predict-shift, predict-ood)."""
    from .compute.gpu_claim import SLOTS, claim_gpu_for_job
    from .stages import predict

    spec = _spec(PredictSpec, a.spec)
    models = a.models if a.models else from_json(list[MemberSpec], a.members, "--members")
    if not models:
        raise UserError("--members: names no member")
    tta = _spec(TtaSpec, a.tta, "--tta") if a.tta else None
    claim_gpu_for_job(spec.device, None, jobs_per_gpu=SLOTS)  # one slot, as predict
    {"predict-shift": predict.predict_shift, "predict-ood": predict.predict_ood}[a.command](
        models, a.set, a.out, spec, a.threads, tta)


def cmd_shift(a) -> None:
    from .stages.shift import BaselineFiles, shift_summary_to_file

    baseline = from_json(BaselineFiles | None, a.baseline, "--baseline")
    shift_summary_to_file(a.experiment, a.summary, a.test, _files(FILES_BY_CORRUPTION, a.shift, "--shift"),
                          _files(FILES_BY_CORRUPTION, a.sets, "--sets"), a.data,
                          _spec(EnsembleSpec, a.spec), baseline, a.out)


def cmd_diversity(a) -> None:
    from .stages.shift import diversity_to_file

    diversity_to_file(a.seeds, a.test, a.data, from_json(FILES_BY_CORRUPTION, a.shift, "--shift"),
                      from_json(FILES_BY_CORRUPTION, a.sets, "--sets"), a.out)


def cmd_ood_set(a) -> None:
    from .stages.ood import make_ood_set

    x = make_ood_set(a.name, _spec(OodSetSpec, a.spec), a.data, a.out)
    print(f"{a.name}: {len(x)} images of {' x '.join(map(str, x.shape[1:]))} -> {a.out}", file=sys.stderr)


def cmd_ood(a) -> None:
    from .stages.ood import ood_summary_to_file

    ood_summary_to_file(a.experiment, a.summary, a.test, _files(FILES_BY_SET, a.ood, "--ood"),
                        _files(FILES_BY_SET, a.sets, "--sets"), _files(FILES_BY_SET, a.kinds, "--kinds"),
                        a.data, _spec(EnsembleSpec, a.spec), a.out)


def cmd_selective(a) -> None:
    from .stages.ood import selective_to_file

    selective_to_file(a.experiment, a.summary, a.test, a.data,
                      from_json(FILES_BY_CORRUPTION, a.shift, "--shift"),
                      from_json(FILES_BY_CORRUPTION, a.sets, "--sets"), _spec(SelectiveSpec, a.spec), a.out)


def cmd_methods(a) -> None:
    from .stages.frontier import methods_to_file

    extras = from_json(list[tuple[int, str]], a.extras, "--extras")
    shift = from_json(FILE_LISTS, a.shift, "--shift")
    ood = from_json(FILE_LISTS, a.ood, "--ood")
    sets = from_json(FILES_BY_CORRUPTION, a.sets, "--sets")
    methods_to_file(a.experiment, a.data, a.seeds, a.val, a.test, extras, a.extra_val or [],
                    a.extra_test or [], shift, sets, ood, _spec(ScoringSpec, a.spec), a.tta_views, a.out)


def cmd_frontier(a) -> None:
    from .stages.frontier import frontier_to_file

    frontier_to_file(_files(FILES_BY_EXPERIMENT, a.methods, "--methods"), _files(RUN_FILES, a.runs, "--runs"),
                     from_json(dict[str, RunCostSpec], a.costs, "--costs"), a.data, a.out)


def _published(text: str, one_experiment: bool):
    """report.published (JSON): all experiments' entries, or one experiment's (or null)."""

    return from_json(PublishedSpec | None if one_experiment else dict[str, PublishedSpec] | None,
                     text, "--published")


def cmd_curves(a) -> None:
    from .stages.report import figures

    figures.plot_training_curves(a.histories, a.experiment, a.out, a.dpi)


def cmd_ensemble_curve(a) -> None:
    from .stages.report import figures

    figures.plot_ensemble_curve(a.summary, a.experiment, a.out, _published(a.published, True), a.dpi)


def cmd_reliability(a) -> None:
    from .stages.report import figures

    figures.plot_reliability(a.summary, a.data, a.test, a.experiment, a.out, a.ece_bins, a.dpi)


def cmd_accuracy(a) -> None:
    from .stages.report import figures

    figures.plot_accuracy_bars(_files(FILES_BY_EXPERIMENT, a.experiments, "--experiments"), a.out, a.dpi)


def cmd_cost(a) -> None:
    from .stages.report import figures

    figures.plot_cost(_files(RUN_FILES, a.runs, "--runs"), a.out, a.dpi)


def cmd_shift_figure(a) -> None:
    from .stages.report import shift_figures

    shift_figures.plot_shift(_files(FILES_BY_EXPERIMENT, a.summaries, "--summaries"), a.out, a.dpi)


def cmd_diversity_figure(a) -> None:
    from .stages.report import shift_figures

    shift_figures.plot_diversity(a.diversity, a.summary, a.experiment, a.out, a.dpi)


def cmd_ood_figure(a) -> None:
    from .stages.report import ood_figures

    ood_figures.plot_ood(_files(FILES_BY_EXPERIMENT, a.summaries, "--summaries"), a.out, a.dpi)


def cmd_selective_figure(a) -> None:
    from .stages.report import ood_figures

    ood_figures.plot_selective(a.selective, a.experiment, a.out, a.dpi)


def cmd_frontier_figure(a) -> None:
    from .stages.report import frontier_figures

    frontier_figures.plot_frontier(a.frontier, a.out, a.dpi)


def cmd_summary(a) -> None:
    from .stages.report import summary

    experiments = _files(FILES_BY_EXPERIMENT, a.experiments, "--experiments")
    runs = _files(RUN_FILES, a.runs, "--runs")
    if set(runs) != set(experiments):
        raise UserError("--runs: must name the same experiments as --experiments")
    shift = from_json(FILES_BY_EXPERIMENT, a.shift, "--shift")
    diversity = from_json(FILES_BY_EXPERIMENT, a.diversity, "--diversity")
    ood = from_json(FILES_BY_EXPERIMENT, a.ood, "--ood")
    selective = from_json(FILES_BY_EXPERIMENT, a.selective, "--selective")
    methods = _files(FILES_BY_EXPERIMENT, a.methods, "--methods")
    if set(methods) != set(experiments):
        raise UserError("--methods: must name the same experiments as --experiments")
    summary.write_summary(experiments, runs, a.comparisons, _published(a.published, False), *a.out,
                          shift=shift, diversity=diversity, ood=ood, selective=selective,
                          frontier=a.frontier, methods=methods)


def _add_report_parsers(sub) -> None:
    p = sub.add_parser("report", help="figures and summary tables, from files only")
    what = p.add_subparsers(dest="what", required=True)

    def figure(name, help_text, func):
        s = what.add_parser(name, help=help_text)
        s.set_defaults(func=func)
        s.add_argument("--dpi", type=int, required=True)
        s.add_argument("--out", nargs=2, required=True, metavar=("PNG", "SVG"))
        return s

    s = figure("curves", "training curves of one experiment", cmd_curves)
    s.add_argument("--experiment", required=True)
    s.add_argument("--histories", nargs="+", required=True, help="history.csv per seed")
    s = figure("ensemble", "accuracy vs ensemble size", cmd_ensemble_curve)
    s.add_argument("--experiment", required=True)
    s.add_argument("--summary", required=True, help="ensemble.json")
    s.add_argument("--published", required=True, help="report.published of this experiment (JSON or null)")
    s = figure("reliability", "reliability diagrams", cmd_reliability)
    s.add_argument("--experiment", required=True)
    s.add_argument("--summary", required=True, help="ensemble.json")
    s.add_argument("--data", required=True, help="data.npz (for the test labels)")
    s.add_argument("--test", nargs="+", required=True, help="probs_test.npy per seed, in seed order")
    s.add_argument("--ece-bins", type=int, required=True)
    s = figure("accuracy", "single vs ensemble accuracy per experiment", cmd_accuracy)
    s.add_argument("--experiments", required=True, help="{name: ensemble.json}")
    s = figure("cost", "cost per model", cmd_cost)
    s.add_argument("--runs", required=True,
                   help="{name: {seed: {benchmark: tsv, history: csv}}}")
    s = figure("shift", "accuracy and ECE against severity, every experiment", cmd_shift_figure)
    s.add_argument("--summaries", required=True, help="{name: shift.json}")
    s = figure("diversity", "disagreement between members, gain against ensemble size", cmd_diversity_figure)
    s.add_argument("--experiment", required=True)
    s.add_argument("--diversity", required=True, help="diversity.json")
    s.add_argument("--summary", required=True, help="ensemble.json")
    s = figure("ood", "ROC curves and AUROC against ensemble size per OOD set, every experiment",
               cmd_ood_figure)
    s.add_argument("--summaries", required=True, help="{name: ood.json}")
    s = figure("selective", "risk-coverage curves of one experiment", cmd_selective_figure)
    s.add_argument("--experiment", required=True)
    s.add_argument("--selective", required=True, help="selective.json")
    s = figure("frontier", "accuracy, NLL and ECE against training cost, every method", cmd_frontier_figure)
    s.add_argument("--frontier", required=True, help="frontier.json")
    s = what.add_parser("summary", help="summary.md and summary.csv")
    s.set_defaults(func=cmd_summary)
    s.add_argument("--experiments", required=True, help="{name: ensemble.json}")
    s.add_argument("--runs", required=True)
    s.add_argument("--comparisons", required=True, help="comparisons.json")
    s.add_argument("--shift", required=True, help="{name: shift.json} ({} when the shift stage is off)")
    s.add_argument("--diversity", required=True, help="{name: diversity.json}")
    # file maps, not config values: the rule always passes them; without them, no such section
    s.add_argument("--ood", required=True, help="{name: ood.json} ({} when the OOD stage is off)")
    s.add_argument("--selective", required=True, help="{name: selective.json}")
    s.add_argument("--frontier", required=True, help="frontier.json")
    s.add_argument("--methods", required=True, help="{name: methods.json}")
    s.add_argument("--published", required=True, help="report.published (JSON)")
    s.add_argument("--out", nargs=2, required=True, metavar=("MD", "CSV"))


def _add_data_parsers(sub) -> None:
    s = sub.add_parser("download", help="fetch a dataset (torchvision download or local source), MD5-checked")
    s.add_argument("--dataset", required=True)
    s.add_argument("--spec", required=True, help="{source, url, md5} (JSON)")
    s.add_argument("--out", required=True, help="folder to fill with the verified raw files")
    s.set_defaults(func=cmd_download)

    s = sub.add_parser("download-weights", help="fetch ImageNet ResNet-18 weights (hash-checked)")
    s.add_argument("--spec", required=True, help="pretrained_weights (JSON)")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_download_weights)

    s = sub.add_parser("prepare", help="split and pack a dataset into data.npz")
    s.add_argument("--dataset", required=True)
    s.add_argument("--spec", required=True,
                   help="{val_size, split_seed, subset} (JSON)")
    s.add_argument("--raw", required=True)
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_prepare)


def _add_model_parsers(sub) -> None:
    s = sub.add_parser("train", help="train one model for one seed")
    s.add_argument("--data", required=True)
    s.add_argument("--spec", required=True, help="the training spec (JSON)")
    s.add_argument("--runtime", required=True, help="the runtime spec (JSON)")
    s.add_argument("--seed", required=True, type=int)
    s.add_argument("--out-dir", required=True)
    s.add_argument("--checkpoint", help="resume from / save to this path (not a workflow output)")
    s.add_argument("--threads", required=True, type=int)
    s.add_argument("--weights", help="pretrained weights file (for model.pretrained)")
    s.add_argument("--name", help="prefix for progress lines, e.g. experiment/seed")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("predict", help="class probabilities of one model on one split")
    s.add_argument("--model", required=True)
    s.add_argument("--data", required=True)
    s.add_argument("--split", required=True, choices=("val", "test"))
    s.add_argument("--probs", required=True)
    s.add_argument("--metrics", required=True)
    s.add_argument("--spec", required=True, help="{device, batch_size} (JSON)")
    s.add_argument("--threads", required=True, type=int)
    s.set_defaults(func=cmd_predict)

    s = sub.add_parser("predict-member", help="an extra member (snapshot, SWA, TTA) on val and test")
    s.add_argument("--weights", required=True, help="model.pt (--member tta), or members.pt")
    s.add_argument("--member", required=True, help="tta (model.pt with test-time views), swa or epochN")
    s.add_argument("--tta", help="the tta spec (JSON), for --member tta")
    s.add_argument("--data", required=True)
    s.add_argument("--val", required=True, help="probabilities on the validation split (.npy)")
    s.add_argument("--test", required=True, help="probabilities on the test split (.npy)")
    s.add_argument("--metrics", required=True)
    s.add_argument("--spec", required=True, help="{device, batch_size} (JSON)")
    s.add_argument("--threads", required=True, type=int)
    s.set_defaults(func=cmd_predict_member)


def _add_ensemble_parsers(sub) -> None:
    s = sub.add_parser("ensemble", help="voting, subsets, greedy selection, calibration; k chosen on val")
    s.add_argument("--data", required=True, help="data.npz (for the labels)")
    s.add_argument("--seeds", required=True, type=int, nargs="+")
    s.add_argument("--val", required=True, nargs="+", help="probs_val.npy per seed, in seed order")
    s.add_argument("--test", required=True, nargs="+", help="probs_test.npy per seed, in seed order")
    s.add_argument("--spec", required=True, help="the ensemble spec (JSON)")
    s.add_argument("--csv", required=True)
    s.add_argument("--json", required=True)
    s.set_defaults(func=cmd_ensemble)

    s = sub.add_parser("compare", help="paired McNemar tests between experiments that share seeds")
    s.add_argument("--data", required=True)
    s.add_argument("--experiments", required=True, help="{name: {seed: probs_test.npy}}")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_compare)


def _add_members_parser(sub, name: str, help_text: str) -> None:
    s = sub.add_parser(name, help=help_text)
    s.add_argument("--set", required=True)
    which = s.add_mutually_exclusive_group(required=True)
    which.add_argument("--models", nargs="+", help="model.pt per seed, in seed order")
    which.add_argument("--members", help="extra members [{weights, member, tta}] (JSON), in order")
    s.add_argument("--tta", help="the tta spec (JSON), for members with tta: true")
    s.add_argument("--out", required=True)
    s.add_argument("--spec", required=True, help="{device, batch_size} (JSON)")
    s.add_argument("--threads", required=True, type=int)
    s.set_defaults(func=cmd_predict_members)


def _add_shift_parsers(sub) -> None:
    s = sub.add_parser("shift-set", help="one corruption at severities 1-5 of the test split")
    s.add_argument("--dataset", required=True)
    s.add_argument("--corruption", required=True)
    s.add_argument("--spec", required=True, help="{source, md5, images, seed, corruption} (JSON)")
    s.add_argument("--data", required=True)
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_shift_set)

    _add_members_parser(sub, "predict-shift", "one experiment's members on one corrupted set")

    s = sub.add_parser("shift", help="scores under shift, corruption error, the ensemble's gain")
    s.add_argument("--experiment", required=True)
    s.add_argument("--summary", required=True, help="ensemble.json")
    s.add_argument("--test", required=True, nargs="+", help="probs_test.npy per seed, in seed order")
    s.add_argument("--shift", required=True, help="{corruption: shift probabilities .npy}")
    s.add_argument("--sets", required=True, help="{corruption: set .npz}")
    s.add_argument("--data", required=True)
    s.add_argument("--spec", required=True, help="the ensemble spec (JSON)")
    s.add_argument("--baseline", required=True,
                   help="{name, test, shift} of shift.baseline, or null")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_shift)

    s = sub.add_parser("diversity", help="disagreement, KL, oracle accuracy, NLL gain of the members")
    s.add_argument("--seeds", required=True, type=int, nargs="+")
    s.add_argument("--test", required=True, nargs="+", help="probs_test.npy per seed, in seed order")
    s.add_argument("--data", required=True)
    s.add_argument("--shift", required=True, help="{corruption: shift probabilities .npy} (may be {})")
    s.add_argument("--sets", required=True, help="{corruption: set .npz}")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_diversity)


def _add_frontier_parsers(sub) -> None:
    s = sub.add_parser("methods", help="every method of one experiment's members, scored alike")
    s.add_argument("--experiment", required=True)
    s.add_argument("--data", required=True, help="data.npz (for the labels)")
    s.add_argument("--seeds", required=True, type=int, nargs="+")
    s.add_argument("--val", required=True, nargs="+", help="probs_val.npy per seed, in seed order")
    s.add_argument("--test", required=True, nargs="+", help="probs_test.npy per seed, in seed order")
    s.add_argument("--extras", required=True, help="[[seed index, member name], ...] (JSON), in order")
    s.add_argument("--extra-val", nargs="*", help="probs_val.npy per extra member, in order")
    s.add_argument("--extra-test", nargs="*", help="probs_test.npy per extra member, in order")
    s.add_argument("--shift", required=True, help="{corruption: [final models' .npy, extra members' .npy]}")
    s.add_argument("--sets", required=True, help="{corruption: its corrupted set}")
    s.add_argument("--ood", required=True, help="{OOD set: [final models' .npy, extra members' .npy]}")
    s.add_argument("--tta-views", required=True, type=int, help="test-time views of a TTA member")
    s.add_argument("--spec", required=True, help="{bootstrap, bootstrap_seed, ece_bins} (JSON)")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_methods)

    s = sub.add_parser("frontier", help="every method's cost and the Pareto front -> frontier.json")
    s.add_argument("--methods", required=True, help="{name: methods.json}")
    s.add_argument("--runs", required=True, help="{name: {seed: {benchmark: tsv, history: csv}}}")
    s.add_argument("--costs", required=True, help="{name: {epochs, batch_size, passes_per_step}} (JSON)")
    s.add_argument("--data", required=True, help="data.npz (for the training images)")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_frontier)


def _add_ood_parsers(sub) -> None:
    s = sub.add_parser("ood-set", help="one OOD set at the test split's shape")
    s.add_argument("--name", required=True, help="the set's name in ood.sets")
    s.add_argument("--spec", required=True, help="{images, seed, set} (JSON)")
    s.add_argument("--data", required=True, help="data.npz (the test split's shape)")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_ood_set)

    _add_members_parser(sub, "predict-ood", "one experiment's members on one OOD set")

    s = sub.add_parser("ood", help="OOD detection: scores, AUROC/AUPR/FPR95, single vs ensemble, by size")
    s.add_argument("--experiment", required=True)
    s.add_argument("--summary", required=True, help="ensemble.json")
    s.add_argument("--test", required=True, nargs="+", help="probs_test.npy per seed, in seed order")
    s.add_argument("--ood", required=True, help="{set: OOD probabilities .npy}")
    s.add_argument("--sets", required=True, help="{set: prepared set .npz}")
    s.add_argument("--kinds", required=True, help="{set: its kind}")
    s.add_argument("--data", required=True)
    s.add_argument("--spec", required=True, help="the ensemble spec (JSON)")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_ood)

    s = sub.add_parser("selective", help="risk-coverage curves on clean and corrupted test images")
    s.add_argument("--experiment", required=True)
    s.add_argument("--summary", required=True, help="ensemble.json")
    s.add_argument("--test", required=True, nargs="+", help="probs_test.npy per seed, in seed order")
    s.add_argument("--data", required=True)
    s.add_argument("--shift", required=True, help="{corruption: shift probabilities .npy} (may be {})")
    s.add_argument("--sets", required=True, help="{corruption: set .npz}")
    s.add_argument("--spec", required=True, help="the selective spec (JSON)")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_selective)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cifar-ensembles", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for add in (_add_data_parsers, _add_model_parsers, _add_ensemble_parsers, _add_shift_parsers,
                _add_ood_parsers, _add_frontier_parsers, _add_report_parsers):
        add(sub)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    try:
        args.func(args)
    except UserError as err:
        print(f"cifar-ensembles {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Preempted as err:
        print(f"cifar-ensembles {args.command}: stopped: {err}", file=sys.stderr)
        return EXIT_PREEMPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
