"""CPU throughput benchmark: `python -m benchmarks.throughput [--json PATH] [--quick]`.

Measures, on real Fashion-MNIST (resources/fashion_mnist/data.npz, or Debian's files),
with torch limited to `--threads` threads (default 1, the default profile's per-job threads):

- our Trainer's training images/s (Trainer.fit over its real DataLoader, evaluation
  excluded) against a bare PyTorch loop with the same model, batch size, SGD and device,
  interleaved rounds, medians: trainer_vs_bare_ratio (goal >= 0.95);
- SAM and ASAM step time / SGD step time (Trainer.train_step, same batch; goal <= 2.05);
- images/s of each augmentation pipeline against the training step's images/s, and the
  fraction of the trainer's loop spent waiting for the next batch (goal <= 5%), for every
  input path; `data_wait_fraction` is the batched path's (augment.device: gpu, which on a
  CPU runs batched in the training process);
- the speed settings (channels_last, bf16) through the trainer;
- ensemble analysis on 11 members x 10,000 images x 10 classes: one call of every public
  function of cifar_ensembles.ensemble and cifar_ensembles.metrics;
- `snakemake -n` for 4 experiments x 11 seeds;
- two 1-thread training processes side by side against one 2-thread process (aggregate
  images/s), the default profile's `set-threads` choice.

It prints a table and writes JSON (default benchmarks/results/throughput.json). On 2 cores
it takes about 3-4 minutes (`--quick`: about 1 minute, smaller samples).
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from .common import (
    ROOT,
    bare_loop,
    describe,
    load_fashion_mnist,
    log,
    machine,
    make_spec,
    median_of,
    quiet,
    run_concurrent,
    table,
    take,
    trainer_epoch,
    write_json,
)

GOALS = {"trainer_vs_bare_ratio": (">=", 0.95), "sam_vs_sgd_ratio": ("<=", 2.05),
         "asam_vs_sgd_ratio": ("<=", 2.05), "data_wait_fraction": ("<=", 0.05)}


# --------------------------------------------------------------- trainer vs bare loop
def trainer_vs_bare(data, steps, rounds, threads) -> dict:
    spec = make_spec()
    sub = take(data, steps * spec["batch_size"], 64)
    trainer_ips, bare_ips, waits = [], [], []
    for r in range(rounds):
        b = bare_loop(spec, sub, steps, threads)
        t = trainer_epoch(spec, sub, threads)
        bare_ips.append(b["images_per_second"])
        trainer_ips.append(t["images_per_second"])
        waits.append(t["data_wait_fraction"])
        log(f"  round {r + 1}: bare {b['images_per_second']:.0f} img/s, "
            f"trainer {t['images_per_second']:.0f} img/s")
    trainer, bare = median_of(trainer_ips), median_of(bare_ips)
    return {"config": describe(spec), "steps": steps, "rounds": rounds,
            "trainer_images_per_second": trainer, "bare_images_per_second": bare,
            "trainer_rounds": trainer_ips, "bare_rounds": bare_ips,
            "trainer_data_wait_fraction": median_of(waits), "ratio": trainer / bare}


# --------------------------------------------------------------------- speed settings
SETTINGS = {
    "fp32": {},
    "fp32 channels_last": {"channels_last": True},
    "bf16": {"precision": "bf16"},
    "bf16 channels_last": {"precision": "bf16", "channels_last": True},
}


def settings(data, steps, threads, fp32_ips) -> dict:
    out = {"fp32": fp32_ips}
    for name, change in SETTINGS.items():
        if name == "fp32":
            continue
        spec = make_spec(**change)
        sub = take(data, steps * spec["batch_size"], 64)
        out[name] = trainer_epoch(spec, sub, threads)["images_per_second"]
        log(f"  {name}: {out[name]:.0f} img/s")
    return out


# ----------------------------------------------------------------------- SAM vs SGD
def sam_vs_sgd(data, steps, rounds, threads) -> dict:
    from cifar_ensembles.train import Trainer

    sub = take(data, 4 * 64, 64)
    trainers = {}
    for name in ("sgd", "sam", "asam"):
        spec = make_spec(optimizer={"name": name, "rho": 0.05 if name == "sam" else 0.5})
        trainers[name] = Trainer(spec, sub, 0, threads, log=quiet)
    x, y = next(iter(trainers["sgd"].loader))
    times = {name: [] for name in trainers}
    for trainer in trainers.values():  # warm-up
        trainer.train_step(x, y)
    for r in range(rounds):
        for name, trainer in trainers.items():
            start = time.perf_counter()
            for _ in range(steps):
                trainer.train_step(x, y)
            times[name].append((time.perf_counter() - start) / steps)
        log(f"  round {r + 1}: " + ", ".join(f"{n} {1000 * t[-1]:.0f} ms" for n, t in times.items()))
    step = {name: median_of(t) for name, t in times.items()}
    return {"step_seconds": step, "rounds": times,
            "sam_vs_sgd_ratio": step["sam"] / step["sgd"], "asam_vs_sgd_ratio": step["asam"] / step["sgd"]}


# ------------------------------------------------------------------ augmentation pipelines
BATCHED = "gpu path (batched, on cpu)"
PIPELINES = {  # name: (augment, loader.num_workers)
    "none": ({"name": "none"}, 0),
    "torchvision": ({"name": "torchvision"}, 0),
    "albumentations": ({"name": "albumentations"}, 0),
    "albumentations, 1 worker": ({"name": "albumentations"}, 1),
    BATCHED: ({"name": "albumentations", "device": "gpu"}, 0),
}


def pipeline_images_per_second(aug: dict, workers: int, data, n: int, batch: int) -> float:
    """Images/s of the input path alone, as the trainer runs it (its DataLoader, or the
    batched device path on the CPU)."""
    from cifar_ensembles.augment import EpochBatches, SeededImages, build_train_transform, normalization
    from cifar_ensembles.gpu_augment import BatchedAugment, DeviceBatches

    x, y = data["x_train"][:n], data["y_train"][:n]
    mean, std = normalization(aug, data["mean"], data["std"], x.shape[-1])
    if aug.get("device") == "gpu":
        loader = DeviceBatches(x, y, BatchedAugment(aug, x.shape[1], mean, std), batch, 0, "cpu")
    else:
        transform = build_train_transform(aug, x.shape[1], mean, std)
        loader = torch.utils.data.DataLoader(SeededImages(x, y, transform),
                                             batch_sampler=EpochBatches(n, batch, 0, 0),
                                             num_workers=workers, persistent_workers=workers > 0)
    next(iter(loader))  # imports, worker start, first-call costs
    start = time.perf_counter()
    images = sum(len(yb) for _, yb in loader)
    return images / (time.perf_counter() - start)


def augmentation(data, steps, threads, step_ips, n_images) -> dict:
    """Each input path alone, then inside the trainer: images/s and the data-wait fraction."""
    torch.set_num_threads(threads)
    out = {}
    for name, (aug, workers) in PIPELINES.items():
        ips = pipeline_images_per_second(aug, workers, data, n_images, 64)
        spec = make_spec(augment=aug, loader={"num_workers": workers})
        t = trainer_epoch(spec, take(data, steps * spec["batch_size"], 64), threads)
        out[name] = {"images_per_second": ips, "times_training_step": ips / step_ips, "num_workers": workers,
                     "trainer_images_per_second": t["images_per_second"],
                     "data_wait_fraction": t["data_wait_fraction"]}
        log(f"  {name}: {ips:.0f} img/s alone, trainer {t['images_per_second']:.0f} img/s, "
            f"data wait {100 * t['data_wait_fraction']:.1f}%")
    return out


# ------------------------------------------------------------------------ ensemble analysis
def softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def ensemble_analysis(members=11, images=10_000, classes=10, seed=0) -> dict:
    """One call of each public function of cifar_ensembles.ensemble and .metrics (whatever
    exists at run time), with arguments chosen by parameter name; unknown ones are skipped."""
    from cifar_ensembles import ensemble, metrics

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, images)
    logits = rng.normal(0, 2, (members, images, classes))
    logits[:, np.arange(images), labels] += 2.0  # members right ~70% of the time
    probs = softmax(logits).astype(np.float32)
    mean_probs = probs.mean(axis=0)
    correct = mean_probs.argmax(-1) == labels
    k = min(6, members)
    subsets = np.array(list(itertools.combinations(range(members), k))[:500], dtype=np.int64)
    indices = rng.integers(0, images, (1000, images), dtype=np.int32)
    common = {
        "labels": labels, "y": labels, "val_labels": labels, "test_labels": labels,
        "subsets": subsets, "m": members, "k": k, "n": images, "n_resamples": 1000, "seed": 0,
        "temperature": 1.5, "correct": correct, "correct_a": correct,
        "correct_b": probs[0].argmax(-1) == labels, "indices": indices,
        "val_curve": np.linspace(0.8, 0.9, members), "curve": np.linspace(0.8, 0.9, members),
    }
    timings, skipped = {}, {}
    for module, probs_arg in ((ensemble, probs), (metrics, mean_probs)):
        values = {**common, "probs": probs_arg, "val_probs": probs_arg, "test_probs": probs_arg,
                  "member_probs": probs}
        for name, fn in inspect.getmembers(module, inspect.isfunction):
            if name.startswith("_") or fn.__module__ != module.__name__:
                continue
            args, missing = [], None
            for p in inspect.signature(fn).parameters.values():
                if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                    continue
                if p.name in values:
                    args.append(values[p.name])
                elif p.default is p.empty:
                    missing = p.name
                    break
                else:
                    break  # keep the remaining defaults
            label = f"{module.__name__.rsplit('.', 1)[-1]}.{name}"
            if missing:
                skipped[label] = f"no value for {missing!r}"
                continue
            start = time.perf_counter()
            try:
                fn(*args)
            except Exception as err:  # a function whose arguments we guessed wrong
                skipped[label] = f"{err.__class__.__name__}: {str(err)[:80]}"
                continue
            timings[label] = time.perf_counter() - start
    core = [f"ensemble.{n}" for n in ("first_k_accuracy", "soft_vote", "hard_vote")]
    return {"shape": [members, images, classes], "seconds": timings, "skipped": skipped,
            "core_seconds": sum(timings.get(n, 0.0) for n in core),
            "total_seconds": sum(timings.values())}


# ------------------------------------------------------------------------------ dry run
def dry_run(experiments=4, seeds=11) -> dict:
    names = [f"bench{i}" for i in range(experiments)]
    optimizers = [{"name": "sgd", "lr": 0.05}, {"name": "adam", "lr": 1e-3},
                  {"name": "sam", "lr": 0.05}, {"name": "asam", "lr": 0.05}]
    config = {"dataset": "fashion_mnist", "data": {"source": "/usr/share/datasets/fashion-mnist"},
              "run_experiments": names,
              "experiments": {n: {"seeds": list(range(seeds)), "epochs": 3,
                                  "optimizer": optimizers[i % len(optimizers)],
                                  "model": {"name": "resnet18_cifar", "width": 16, "pretrained": False,
                                            "input_size": None}}
                              for i, n in enumerate(names)}}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "bench.yaml"
        cfg.write_text(json.dumps(config))  # JSON is YAML
        cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "-d", str(Path(tmp) / "wd"),
               "-n", "--configfile", str(cfg), "--cores", "1"]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        seconds = time.perf_counter() - start
    out = {"experiments": experiments, "seeds": seeds, "seconds": seconds, "returncode": proc.returncode}
    match = re.search(r"^total\s+(\d+)", proc.stdout + proc.stderr, re.M)
    if match:
        out["jobs"] = int(match.group(1))
    if proc.returncode != 0:
        out["error"] = (proc.stderr.strip().splitlines() or [""])[-1][:300]
        out["seconds"] = None
    return out


# ------------------------------------------------------------------ threads: 2 x 1 vs 1 x 2
def threads_comparison(data, seconds) -> dict:
    from cifar_ensembles import prepare

    spec = make_spec(optimizer={"name": "adam", "lr": 2e-3, "weight_decay": 0.0},
                     augment={"name": "torchvision"})  # the demo's ensemble_adam job
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.npz"
        prepare.write(path, take(data, 4096, 64))
        jobs = [{"spec": spec, "threads": 1, "seed": s} for s in (0, 1)]
        two_single = run_concurrent(jobs, str(path), seconds)
        log(f"  2 jobs x 1 thread: {two_single['aggregate_images_per_second']:.0f} img/s")
        one_double = run_concurrent([{"spec": spec, "threads": 2, "seed": 0}], str(path), seconds)
        log(f"  1 job x 2 threads: {one_double['aggregate_images_per_second']:.0f} img/s")
    a, b = two_single["aggregate_images_per_second"], one_double["aggregate_images_per_second"]
    return {"config": describe(spec), "seconds": seconds, "two_jobs_one_thread": two_single,
            "one_job_two_threads": one_double, "two_x1_vs_one_x2": a / b}


# ------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.throughput", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "throughput.json"))
    p.add_argument("--threads", type=int, default=1, help="torch threads per measurement (default 1)")
    p.add_argument("--quick", action="store_true", help="smaller samples (about a minute)")
    p.add_argument("--skip", nargs="*", default=[], choices=["threads", "dry_run", "settings"],
                   help="sections to leave out")
    a = p.parse_args(argv)
    steps, rounds, sam_steps, seconds, n_aug = (6, 1, 2, 6, 1024) if a.quick else (20, 3, 6, 20, 4096)
    t0 = time.perf_counter()
    results = {"machine": machine(), "threads": a.threads, "quick": a.quick}
    data, source = load_fashion_mnist()
    results["data"] = {"source": source, "train_images": int(len(data["y_train"])),
                       "shape": list(data["x_train"].shape[1:])}
    torch.set_num_threads(a.threads)

    log("trainer vs bare loop ...")
    results["trainer_vs_bare"] = tvb = trainer_vs_bare(data, steps, rounds, a.threads)
    if "settings" not in a.skip:
        log("speed settings ...")
        results["settings"] = settings(data, steps, a.threads, tvb["trainer_images_per_second"])
    log("SAM / ASAM vs SGD ...")
    results["sam"] = sam = sam_vs_sgd(data, sam_steps, rounds, a.threads)
    log("augmentation pipelines and data wait ...")
    results["augmentation"] = aug = augmentation(data, steps, a.threads, tvb["bare_images_per_second"], n_aug)
    log("ensemble analysis ...")
    results["ensemble"] = ens = ensemble_analysis()
    if "dry_run" not in a.skip:
        log("snakemake -n, 4 experiments x 11 seeds ...")
        results["dry_run"] = dry = dry_run()
    else:
        dry = {"seconds": None}
    if "threads" not in a.skip:
        log("2 jobs x 1 thread vs 1 job x 2 threads ...")
        results["threads_comparison"] = thr = threads_comparison(data, seconds)
    else:
        thr = {"two_x1_vs_one_x2": None}

    waits = {name: v["data_wait_fraction"] for name, v in aug.items()}
    results.update({
        "trainer_vs_bare_ratio": tvb["ratio"],
        "sam_vs_sgd_ratio": sam["sam_vs_sgd_ratio"],
        "asam_vs_sgd_ratio": sam["asam_vs_sgd_ratio"],
        # the batched path (augment.device: gpu) is the fast input path; every path is listed
        "data_wait_fraction": waits[BATCHED],
        "data_wait_fraction_max": max(waits.values()),
        "data_wait_fraction_by_pipeline": waits,
        "ensemble_analysis_seconds": ens["total_seconds"],
        "ensemble_core_seconds": ens["core_seconds"],
        "dry_run_seconds": dry["seconds"],
        "two_x1_vs_one_x2": thr["two_x1_vs_one_x2"],
        "benchmark_seconds": time.perf_counter() - t0,
    })
    results["machine"]["load_average_end"] = machine().get("load_average")
    write_json(a.json, results)
    print(report(results))
    print(f"\nJSON: {a.json}")
    return 0


def verdict(key, value):
    if key not in GOALS or value is None:
        return ""
    op, goal = GOALS[key]
    ok = value >= goal if op == ">=" else value <= goal
    return f"goal {op} {goal}: {'met' if ok else 'MISSED'}"


def report(r: dict) -> str:
    tvb, sam = r["trainer_vs_bare"], r["sam"]
    rows = [
        ("trainer images/s", tvb["trainer_images_per_second"], tvb["config"]),
        ("bare loop images/s", tvb["bare_images_per_second"], "same model, batch, SGD, device"),
        ("trainer_vs_bare_ratio", r["trainer_vs_bare_ratio"],
         verdict("trainer_vs_bare_ratio", r["trainer_vs_bare_ratio"])),
        ("SGD step ms", 1000 * sam["step_seconds"]["sgd"], ""),
        ("sam_vs_sgd_ratio", r["sam_vs_sgd_ratio"], verdict("sam_vs_sgd_ratio", r["sam_vs_sgd_ratio"])),
        ("asam_vs_sgd_ratio", r["asam_vs_sgd_ratio"], verdict("asam_vs_sgd_ratio", r["asam_vs_sgd_ratio"])),
    ]
    for name, v in r["augmentation"].items():
        rows.append((f"aug {name} images/s", v["images_per_second"],
                     f"{v['times_training_step']:.0f}x the step"))
    for name, v in r["augmentation"].items():
        rows.append((f"data wait, {name}", v["data_wait_fraction"],
                     verdict("data_wait_fraction", v["data_wait_fraction"])))
    rows.append(("data_wait_fraction", r["data_wait_fraction"], f"{BATCHED}: "
                 + verdict("data_wait_fraction", r["data_wait_fraction"])))
    for name, ips in (r.get("settings") or {}).items():
        rows.append((f"trainer {name} images/s", ips, ""))
    rows.append(("ensemble_analysis_seconds", r["ensemble_analysis_seconds"],
                 f"{len(r['ensemble']['seconds'])} functions, 11 x 10,000 x 10 "
                 f"(first_k + votes: {r['ensemble_core_seconds']:.3f} s)"))
    dry = r.get("dry_run") or {}
    rows.append(("dry_run_seconds", r["dry_run_seconds"],
                 f"snakemake -n, 4 experiments x 11 seeds, {dry.get('jobs', '?')} jobs"
                 if dry else "skipped"))
    thr = r.get("threads_comparison")
    if thr:
        rows.append(("2 jobs x 1 thread images/s",
                     thr["two_jobs_one_thread"]["aggregate_images_per_second"], thr["config"]))
        rows.append(("1 job x 2 threads images/s",
                     thr["one_job_two_threads"]["aggregate_images_per_second"], ""))
        rows.append(("two_x1_vs_one_x2", r["two_x1_vs_one_x2"], "aggregate images/s ratio"))
    m = r["machine"]
    head = (f"{m.get('cpu_model', '?')}, {m.get('cpus')} CPUs, torch {m['torch']}, {r['threads']} thread(s) "
            f"per measurement, load average {m.get('load_average')} -> {m.get('load_average_end')}, "
            f"{r['benchmark_seconds']:.0f} s")
    return head + "\n\n" + table(rows, ("measure", "value", "note"))


if __name__ == "__main__":
    sys.exit(main())
