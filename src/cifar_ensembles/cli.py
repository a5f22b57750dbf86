"""`cifar-ensembles`: the command the workflow's rules call, one subcommand per stage.

Problems the user can fix end with one line on stderr and exit status 2; a training run
stopped by SIGTERM/SIGUSR1 exits 75 (EX_TEMPFAIL) after writing its checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys

from .errors import UserError

EXIT_USER_ERROR = 2
EXIT_PREEMPTED = 75


def _json_arg(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON: {err}") from None


def cmd_download(a) -> None:
    from .datasets import fetch

    out = fetch(a.dataset, a.out, source=a.source, url=a.url, md5=a.md5)
    print(f"{a.dataset}: verified files in {out}", file=sys.stderr)


def cmd_download_weights(a) -> None:
    from .weights import fetch_weights

    out = fetch_weights(a.out, url=a.url, local_file=a.file)
    print(f"ImageNet weights verified -> {out}", file=sys.stderr)


def cmd_prepare(a) -> None:
    from . import prepare
    from .datasets import load_raw

    arrays = load_raw(a.dataset, a.raw)
    prepared = prepare.split(arrays, a.val_size, a.split_seed, a.train_subset, a.test_subset)
    prepare.write(a.out, prepared)
    print(f"{a.dataset}: {len(prepared['y_train'])} train, {len(prepared['y_val'])} val, "
          f"{len(prepared['y_test'])} test images -> {a.out}", file=sys.stderr)


def cmd_train(a) -> None:
    from . import prepare
    from .gpu import claim_gpu_for_job
    from .train import train_to_files

    data = prepare.load(a.data)
    log = None
    if a.name:
        def log(msg):
            print(f"[{a.name}] {msg}", file=sys.stderr, flush=True)
    # Several GPUs and no scheduler: take a free one (lock held until exit) before CUDA starts.
    spec = a.spec if isinstance(a.spec, dict) else {}
    jobs_per_gpu = 8 // a.gpu_slots if a.gpu_slots else int(spec.get("jobs_per_gpu", 1))
    claim_gpu_for_job(str(spec.get("device", "auto")), log, jobs_per_gpu)
    train_to_files(a.spec, data, a.seed, a.out_dir, a.checkpoint, a.threads, a.weights, log)


def cmd_predict(a) -> None:
    from .gpu import claim_gpu_for_job
    from .predict import predict_to_files

    claim_gpu_for_job(a.device, None)
    predict_to_files(a.model, a.data, a.split, a.probs, a.metrics, a.batch_size, a.device, a.threads)


def cmd_ensemble(a) -> None:
    from .analysis import ensemble_to_files

    ensemble_to_files(a.data, a.seeds, a.val, a.test, a.method, a.csv, a.json,
                      max_subsets=a.max_subsets, subset_seed=a.subset_seed, bootstrap=a.bootstrap,
                      bootstrap_seed=a.bootstrap_seed, ece_bins=a.ece_bins)


def cmd_compare(a) -> None:
    from .analysis import compare_to_files

    compare_to_files(a.experiments, a.data, a.out)


def cmd_report(a) -> None:
    from . import report

    if a.what == "curves":
        report.plot_training_curves(a.inputs, a.experiment, a.out, a.dpi)
    elif a.what == "ensemble":
        report.plot_ensemble_curve(a.inputs[0], a.experiment, a.out, a.published, a.dpi)
    elif a.what == "reliability":
        ensemble_json, data, *test_probs = a.inputs
        report.plot_reliability(ensemble_json, data, test_probs, a.experiment, a.out, a.ece_bins, a.dpi)
    elif a.what == "accuracy":
        report.plot_accuracy_bars(a.experiments, a.out, a.dpi)
    elif a.what == "cost":
        report.plot_cost(a.runs, a.out, a.dpi)
    else:
        report.write_summary(a.experiments, a.runs, a.inputs[0] if a.inputs else None, a.published, *a.out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cifar-ensembles", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("download", help="fetch a dataset (torchvision download or local source), MD5-checked")
    s.add_argument("--dataset", required=True)
    s.add_argument("--out", required=True, help="folder to fill with the verified raw files")
    s.add_argument("--source", help="local archive or folder instead of downloading")
    s.add_argument("--url", help="download address (default: torchvision's)")
    s.add_argument("--md5", help="expected MD5 of the archive (default: torchvision's)")
    s.set_defaults(func=cmd_download)

    s = sub.add_parser("download-weights", help="fetch ImageNet ResNet-18 weights (hash-checked)")
    s.add_argument("--out", required=True)
    s.add_argument("--url", help="default: torchvision's ResNet18_Weights.IMAGENET1K_V1")
    s.add_argument("--file", help="a local state dict instead of downloading")
    s.set_defaults(func=cmd_download_weights)

    s = sub.add_parser("prepare", help="split and pack a dataset into data.npz")
    s.add_argument("--dataset", required=True)
    s.add_argument("--raw", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--val-size", type=int, default=5000)
    s.add_argument("--split-seed", type=int, default=0)
    s.add_argument("--train-subset", type=int)
    s.add_argument("--test-subset", type=int)
    s.set_defaults(func=cmd_prepare)

    s = sub.add_parser("train", help="train one model for one seed")
    s.add_argument("--data", required=True)
    s.add_argument("--spec", required=True, type=_json_arg, help="the experiment's training config, as JSON")
    s.add_argument("--seed", required=True, type=int)
    s.add_argument("--out-dir", required=True)
    s.add_argument("--checkpoint", help="resume from / save to this path (not a workflow output)")
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--weights", help="pretrained weights file (for model.pretrained)")
    s.add_argument("--name", default="", help="prefix for progress lines, e.g. experiment/seed")
    s.add_argument("--gpu-slots", type=int, choices=(1, 2, 4, 8),
                   help="the job's share of a GPU's 8 slots (the workflow's gpu_slots resource)")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("predict", help="class probabilities of one model on one split")
    s.add_argument("--model", required=True)
    s.add_argument("--data", required=True)
    s.add_argument("--split", required=True, choices=("val", "test"))
    s.add_argument("--probs", required=True)
    s.add_argument("--metrics", required=True)
    s.add_argument("--batch-size", type=int, default=512)
    s.add_argument("--device", default="auto")
    s.add_argument("--threads", type=int, default=1)
    s.set_defaults(func=cmd_predict)

    s = sub.add_parser("ensemble", help="voting, subsets, greedy selection, calibration; k chosen on val")
    s.add_argument("--data", required=True, help="data.npz (for the labels)")
    s.add_argument("--seeds", required=True, type=int, nargs="+")
    s.add_argument("--val", required=True, nargs="+", help="probs_val.npy per seed, in seed order")
    s.add_argument("--test", required=True, nargs="+", help="probs_test.npy per seed, in seed order")
    s.add_argument("--method", default="soft", choices=("soft", "hard"))
    s.add_argument("--max-subsets", type=int, default=500)
    s.add_argument("--subset-seed", type=int, default=0)
    s.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the CIs")
    s.add_argument("--bootstrap-seed", type=int, default=0)
    s.add_argument("--ece-bins", type=int, default=15)
    s.add_argument("--csv", required=True)
    s.add_argument("--json", required=True)
    s.set_defaults(func=cmd_ensemble)

    s = sub.add_parser("compare", help="paired McNemar tests between experiments that share seeds")
    s.add_argument("--data", required=True)
    s.add_argument("--experiments", required=True, type=_json_arg, help="{name: {seed: probs_test.npy}}")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_compare)

    s = sub.add_parser("report", help="figures and summary tables")
    s.add_argument("what", choices=("curves", "ensemble", "reliability", "accuracy", "cost", "summary"))
    s.add_argument("--inputs", nargs="*", default=[])
    s.add_argument("--experiment", default="")
    s.add_argument("--experiments", type=_json_arg, default={}, help="{name: ensemble.json}")
    s.add_argument("--runs", type=_json_arg, default={},
                   help="{name: {seed: {benchmark: tsv, history: csv}}}")
    s.add_argument("--published", type=_json_arg, default={})
    s.add_argument("--ece-bins", type=int, default=15)
    s.add_argument("--dpi", type=int, default=150)
    s.add_argument("--out", nargs="+", required=True)
    s.set_defaults(func=cmd_report)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .train import Preempted

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

