"""CPU throughput benchmark: `python -m benchmarks.throughput [--json PATH] [--quick]`.

Measures, with torch limited to `--threads` threads (default 1, the default profile's
per-job threads):

- what one training step dispatches, counted on the CPU by benchmarks.dispatch through
  Trainer.train_step (the code path a GPU runs) for the report's batch-16 ASL recipes:
  `ops_per_step` and `host_syncs_per_step` for sgd, adam, sam, asam and asam_ema (goals:
  asam_ema's aten ops <= 2.1 x sgd's; 0 host syncs in every step);
- the step time of SAM and of ASAM+EMA over SGD, `step_time_ratio` (goal <= 2.2 each; ASAM
  without EMA is listed too): a width-4 resnet18_cifar, batch 16, ASL, Trainer.train_step
  on fixed tensors after warm-up, the recipes interleaved in rounds (rotating which goes
  first), the median of the rounds' ratios;
- on real Fashion-MNIST (resources/fashion_mnist/data.npz, or Debian's files) with the demo
  preset's network (width-16 resnet18_cifar, batch 64, SGD, cross-entropy, no
  augmentation): our Trainer's training images/s (Trainer.fit over its own input pipeline,
  evaluation excluded) against a bare PyTorch loop with the same model, batch size, SGD
  and device, paired in rounds (11; which goes first alternates), the median of the
  rounds' ratios with its interquartile range: trainer_vs_bare_ratio (goal >= 0.95);
- the speed settings (channels_last, bf16) through the trainer;
- images/s of each input path (the trainer's own, training.inputs) against the bare
  training step's images/s, and the fraction of the trainer's loop spent waiting for the
  next batch (goal <= 5%), for every path; `data_wait_fraction` is augment.mode batched's
  (whole batches augmented on the training device, here the CPU);
- ensemble analysis on 11 members x 10,000 images x 10 classes: the ensemble stage's whole
  computation (stages.ensemble.analyse with config.yaml's `ensemble:`), and one call of
  every public function of cifar_ensembles.analysis.votes and cifar_ensembles.analysis.metrics;
- `snakemake -n` for 4 experiments x 11 seeds over the demo preset (its two and two more);
- two 1-thread training processes side by side against one 2-thread process (aggregate
  images/s) training the demo's ensemble_adam job, the default profile's `set-threads`
  choice.

Specs are config.yaml's (and presets/demo.yaml's) with each measurement's changes merged
over them. It prints a table and writes JSON (default benchmarks/results/throughput.json).
On 2 cores it takes about 2 minutes (`--quick`: under a minute, smaller samples).
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cifar_ensembles.config.spec import deep_merge

from .common import (
    CIFAR_RESNET,
    DEMO,
    ROOT,
    WorkerPool,
    bare_loop,
    config,
    describe,
    experiment_specs,
    load_fashion_mnist,
    log,
    machine,
    median_of,
    runtime_spec,
    table,
    take,
    task,
    trainer_epoch,
    training_spec,
    write_data,
    write_json,
)

GOALS = {"trainer_vs_bare_ratio": (">=", 0.95), "step_time_ratio": ("<=", 2.2),
         "data_wait_fraction": ("<=", 0.05), "ops_ratio": ("<=", 2.1), "host_syncs": ("<=", 0)}

# The trainer-vs-bare network: the demo preset's (width-16 resnet18_cifar, batch 64) with
# what the bare loop does: SGD at a constant rate, cross-entropy, no augmentation, no EMA.
BENCH_TRAINING = {"epochs": 1, "model": {**CIFAR_RESNET, "width": 16},
                  "optimizer": {"name": "sgd", "lr": 0.05, "weight_decay": 5e-4},
                  "scheduler": {"name": "constant"}, "loss": {"name": "cross_entropy"},
                  "augment": {"name": "none", "mode": "per_image"}, "ema": {"enabled": False}}
BENCH_RUNTIME = {"device": "cpu", "channels_last": False, "compile": False, "loader": {"num_workers": 0}}


def bench_specs(training: dict | None = None, runtime: dict | None = None):
    demo = config(DEMO)
    spec = training_spec(deep_merge(BENCH_TRAINING, training or {}), base=demo["training"])
    return spec, runtime_spec(deep_merge(BENCH_RUNTIME, runtime or {}), base=demo["runtime"])


# --------------------------------------------------------------- trainer vs bare loop
def trainer_vs_bare(data, steps, rounds, threads) -> dict:
    """The trainer's images/s over the bare loop's, paired per round: each round runs both
    back to back (which goes first alternates), so a slow spell of the machine hits both
    sides of one ratio. The median of the rounds' ratios, with its interquartile range."""
    spec, runtime = bench_specs()
    sub = take(data, steps * spec.batch_size, 64)
    trainer_ips, bare_ips, waits, ratios = [], [], [], []
    for r in range(rounds):
        runs = {}
        for side in (("bare", "trainer") if r % 2 == 0 else ("trainer", "bare")):
            runs[side] = (bare_loop(spec, runtime, sub, steps, threads) if side == "bare"
                          else trainer_epoch(spec, runtime, sub, threads))
        b, t = runs["bare"], runs["trainer"]
        bare_ips.append(b["images_per_second"])
        trainer_ips.append(t["images_per_second"])
        waits.append(t["data_wait_fraction"])
        ratios.append(t["images_per_second"] / b["images_per_second"])
        log(f"  round {r + 1}: bare {b['images_per_second']:.0f} img/s, "
            f"trainer {t['images_per_second']:.0f} img/s, ratio {ratios[-1]:.3f}")
    q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
    ratio = median_of(ratios)
    return {"config": describe(spec, runtime), "steps": steps, "rounds": rounds,
            "trainer_images_per_second": median_of(trainer_ips),
            "bare_images_per_second": median_of(bare_ips),
            "trainer_rounds": trainer_ips, "bare_rounds": bare_ips, "ratio_rounds": ratios,
            "trainer_data_wait_fraction": median_of(waits), "ratio": ratio,
            "ratio_iqr": [q1, q3], "ratio_spread": (q3 - q1) / ratio}


# --------------------------------------------------------------------- speed settings
SETTINGS = {  # name: (training changes, runtime changes)
    "fp32 channels_last": ({}, {"channels_last": True}),
    "bf16": ({"precision": "bf16"}, {}),
    "bf16 channels_last": ({"precision": "bf16"}, {"channels_last": True}),
}


def settings(data, steps, threads, fp32_ips) -> dict:
    out = {"fp32": fp32_ips}
    for name, (training, runtime) in SETTINGS.items():
        spec, rt = bench_specs(training, runtime)
        sub = take(data, steps * spec.batch_size, 64)
        out[name] = trainer_epoch(spec, rt, sub, threads)["images_per_second"]
        log(f"  {name}: {out[name]:.0f} img/s")
    return out


# ------------------------------------------------------- what a step dispatches, its time
def dispatch_counts() -> dict:
    """benchmarks.dispatch's counts: aten ops and host syncs of one Trainer.train_step."""
    from .dispatch import count_all

    counters = count_all()
    ops = {name: c.ops for name, c in counters.items()}
    syncs = {name: c.syncs for name, c in counters.items()}
    log("  " + ", ".join(f"{n} {ops[n]} ops / {syncs[n]} syncs" for n in ops))
    return {"ops_per_step": ops, "host_syncs_per_step": syncs,
            "asam_ema_vs_sgd_ops": ops["asam_ema"] / ops["sgd"],
            "top_ops": {name: dict(c.counts.most_common(8)) for name, c in counters.items()}}


STEP_RECIPES = ("sgd", "sam", "asam", "asam_ema")  # benchmarks.dispatch's recipes


def step_times(steps, rounds, threads, warmup=3) -> dict:
    """Seconds per Trainer.train_step of each recipe (width-4 resnet18_cifar, batch 16, ASL)
    on one fixed batch, interleaved in rounds; ratios to SGD per round, then medians."""
    from .dispatch import trainer_for

    trainers = {name: trainer_for(name, width=4) for name in STEP_RECIPES}
    torch.set_num_threads(threads)  # trainer_for's trainers set one thread
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, 32, 32, generator=g).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (16,), generator=g)
    for trainer in trainers.values():
        for _ in range(warmup):
            trainer.train_step(x, y)
    times = {name: [] for name in STEP_RECIPES}
    for r in range(rounds):
        order = STEP_RECIPES[r % len(STEP_RECIPES):] + STEP_RECIPES[:r % len(STEP_RECIPES)]
        for name in order:
            start = time.perf_counter()
            for _ in range(steps):
                trainers[name].train_step(x, y)
            times[name].append((time.perf_counter() - start) / steps)
        log(f"  round {r + 1}: " + ", ".join(f"{n} {1000 * times[n][-1]:.1f} ms" for n in STEP_RECIPES))
    ratios = {name: median_of([t / s for t, s in zip(times[name], times["sgd"])])
              for name in STEP_RECIPES if name != "sgd"}
    return {"config": "resnet18_cifar w4 b16 ASL, fixed batch, Trainer.train_step", "steps": steps,
            "rounds": rounds, "step_seconds": {n: median_of(t) for n, t in times.items()},
            "round_seconds": times, "ratio": ratios}


# ------------------------------------------------------------------ augmentation pipelines
BATCHED = "albumentations, batched"
PIPELINES = {  # name: (augment, loader.num_workers)
    "none": ({"name": "none", "mode": "per_image"}, 0),
    "torchvision": ({"name": "torchvision", "mode": "per_image"}, 0),
    "albumentations": ({"name": "albumentations", "mode": "per_image"}, 0),
    "albumentations, 1 worker": ({"name": "albumentations", "mode": "per_image"}, 1),
    BATCHED: ({"name": "albumentations", "mode": "batched"}, 0),
}


def pipeline_images_per_second(spec, runtime, data, n: int, threads: int) -> float:
    """Images/s of the trainer's own input path alone (training.inputs: its DataLoader, or
    the batched path on the CPU), batches delivered on the device and laid out."""
    from cifar_ensembles.training.inputs import build_inputs
    from cifar_ensembles.transforms.augment import normalization

    x, y = data["x_train"][:n], data["y_train"][:n]
    mean, std = normalization(spec.augment.normalize, data["mean"], data["std"], x.shape[-1])
    inputs = build_inputs(spec.augment, runtime.loader, x, y, mean, std, spec.batch_size, 0,
                          torch.device("cpu"), runtime.channels_last, threads)
    batches = inputs.epoch(0, 0)
    next(batches)  # imports, worker start, first-call costs
    start = time.perf_counter()
    images = sum(len(yb) for _, yb in batches)
    return images / (time.perf_counter() - start)


def augmentation(data, steps, threads, step_ips, n_images) -> dict:
    """Each input path alone, then inside the trainer: images/s and the data-wait fraction."""
    torch.set_num_threads(threads)
    out = {}
    for name, (aug, workers) in PIPELINES.items():
        spec, runtime = bench_specs({"augment": aug}, {"loader": {"num_workers": workers}})
        ips = pipeline_images_per_second(spec, runtime, data, n_images, threads)
        t = trainer_epoch(spec, runtime, take(data, steps * spec.batch_size, 64), threads)
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
    """The ensemble stage's computation (stages.ensemble.analyse, config.yaml's `ensemble:`),
    then one call of each public function of cifar_ensembles.analysis.votes and .metrics (whatever
    exists at run time), with arguments chosen by parameter name (config.yaml's `ensemble:`
    values for its settings); unknown ones are skipped."""
    from cifar_ensembles.analysis import metrics
    from cifar_ensembles.analysis import votes as ensemble
    from cifar_ensembles.config.convert import from_data
    from cifar_ensembles.config.spec import EnsembleSpec
    from cifar_ensembles.stages.ensemble import analyse

    spec = from_data(EnsembleSpec, config()["ensemble"], "ensemble")
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, images)

    def member_probs():
        logits = rng.normal(0, 2, (members, images, classes))
        logits[:, np.arange(images), labels] += 2.0  # members right ~70% of the time
        return softmax(logits).astype(np.float32)

    probs, val_probs = member_probs(), member_probs()
    start = time.perf_counter()
    analyse(list(range(members)), val_probs, labels, probs, labels, spec)
    stage_seconds = time.perf_counter() - start

    mean_probs = probs.mean(axis=0)
    correct = mean_probs.argmax(-1) == labels
    k = min(6, members)
    subsets = np.array(list(itertools.combinations(range(members), k))[:spec.max_subsets], dtype=np.int64)
    indices = metrics.bootstrap_indices(images, spec.bootstrap, spec.bootstrap_seed)
    common = {
        "labels": labels, "y": labels, "val_labels": labels, "test_labels": labels,
        "subsets": subsets, "m": members, "k": k, "n": images, "n_resamples": spec.bootstrap,
        "seed": spec.subset_seed, "max_subsets": spec.max_subsets, "n_bins": spec.ece_bins,
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
    return {"shape": [members, images, classes], "stage_seconds": stage_seconds, "seconds": timings,
            "skipped": skipped, "core_seconds": sum(timings.get(n, 0.0) for n in core),
            "total_seconds": sum(timings.values())}


# ------------------------------------------------------------------------------ dry run
def dry_run(seeds=11) -> dict:
    """`snakemake -n` over the demo preset with 4 experiments of `seeds` seeds each: the
    demo's two (single_asam, ensemble_adam; so every setting that names one of them still
    holds) and two more (SGD, ASAM)."""
    experiments = {"single_asam": {}, "ensemble_adam": {}, "bench_sgd": {"optimizer": {"name": "sgd"}},
                   "bench_asam": {"optimizer": {"name": "asam"}}}
    names = list(experiments)
    bench = {"run_experiments": names,
             "experiments": {n: {"seeds": list(range(seeds)), **own} for n, own in experiments.items()}}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "bench.yaml"
        cfg.write_text(json.dumps(bench))  # JSON is YAML
        cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "-d", str(Path(tmp) / "wd"),
               "-n", "--configfile", str(DEMO), str(cfg), "--cores", "1"]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        seconds = time.perf_counter() - start
    out = {"experiments": names, "seeds": seeds, "seconds": seconds, "returncode": proc.returncode}
    match = re.search(r"^total\s+(\d+)", proc.stdout + proc.stderr, re.M)
    if match:
        out["jobs"] = int(match.group(1))
    if proc.returncode != 0:
        out["error"] = (proc.stderr.strip().splitlines() or [""])[-1][:300]
        out["seconds"] = None
    return out


# ------------------------------------------------------------------ threads: 2 x 1 vs 1 x 2
def threads_comparison(data, seconds) -> dict:
    """The demo's ensemble_adam job: two 1-thread processes side by side, then one 2-thread
    process, each training for `seconds` (aggregate images/s)."""
    spec, runtime = experiment_specs("ensemble_adam", presets=(DEMO,))
    jobs = [task("ensemble_adam", spec, runtime)]
    with tempfile.TemporaryDirectory() as tmp:
        path = write_data(Path(tmp) / "data.npz", take(data, 4096, 64))
        with WorkerPool([jobs, jobs], path, threads=1) as pool:
            two_single = pool.run({0: 0, 1: 0}, seconds)
        log(f"  2 jobs x 1 thread: {two_single['aggregate_images_per_second']:.0f} img/s")
        with WorkerPool([jobs], path, threads=2) as pool:
            one_double = pool.run({0: 0}, seconds)
        log(f"  1 job x 2 threads: {one_double['aggregate_images_per_second']:.0f} img/s")
    a, b = two_single["aggregate_images_per_second"], one_double["aggregate_images_per_second"]
    return {"config": describe(spec, runtime), "seconds": seconds, "two_jobs_one_thread": two_single,
            "one_job_two_threads": one_double, "two_x1_vs_one_x2": a / b}


# ------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.throughput", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "throughput.json"))
    p.add_argument("--threads", type=int, default=1, help="torch threads per measurement (default 1)")
    p.add_argument("--quick", action="store_true", help="smaller samples (under a minute)")
    p.add_argument("--skip", nargs="*", default=[], choices=["threads", "dry_run", "settings"],
                   help="sections to leave out")
    a = p.parse_args(argv)
    steps, rounds, step_rounds, step_steps, seconds, n_aug = (
        (6, 3, 5, 4, 6, 1024) if a.quick else (20, 11, 9, 8, 20, 4096))
    t0 = time.perf_counter()
    results = {"machine": machine(), "threads": a.threads, "quick": a.quick}
    torch.set_num_threads(a.threads)

    log("what one training step dispatches (benchmarks.dispatch) ...")
    results["dispatch"] = disp = dispatch_counts()
    log("step time of SAM, ASAM, ASAM+EMA over SGD (width 4, batch 16, ASL) ...")
    results["step_times"] = st = step_times(step_steps, step_rounds, a.threads)
    data, source = load_fashion_mnist()
    results["data"] = {"source": source, "train_images": int(len(data["y_train"])),
                       "shape": list(data["x_train"].shape[1:])}
    torch.set_num_threads(a.threads)
    log("trainer vs bare loop ...")
    results["trainer_vs_bare"] = tvb = trainer_vs_bare(data, steps, rounds, a.threads)
    if "settings" not in a.skip:
        log("speed settings ...")
        results["settings"] = settings(data, steps, a.threads, tvb["trainer_images_per_second"])
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
        "ops_per_step": disp["ops_per_step"],
        "host_syncs_per_step": disp["host_syncs_per_step"],
        "asam_ema_vs_sgd_ops": disp["asam_ema_vs_sgd_ops"],
        "step_time_ratio": st["ratio"],
        "trainer_vs_bare_ratio": tvb["ratio"],
        # the batched path is the fast input path; every path is listed
        "data_wait_fraction": waits[BATCHED],
        "data_wait_fraction_max": max(waits.values()),
        "data_wait_fraction_by_pipeline": waits,
        "ensemble_stage_seconds": ens["stage_seconds"],
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


def verdict(goal, value):
    if value is None:
        return ""
    op, target = GOALS[goal]
    ok = value >= target if op == ">=" else value <= target
    return f"goal {op} {target}: {'met' if ok else 'MISSED'}"


def report(r: dict) -> str:
    tvb, st = r["trainer_vs_bare"], r["step_times"]
    ops, syncs = r["ops_per_step"], r["host_syncs_per_step"]
    rows = [(f"ops / host syncs per step, {name}", f"{ops[name]} / {syncs[name]}",
             verdict("host_syncs", syncs[name]).replace("<= 0", "0 syncs")) for name in ops]
    rows += [
        ("asam_ema ops / sgd ops", r["asam_ema_vs_sgd_ops"], verdict("ops_ratio", r["asam_ema_vs_sgd_ops"])),
        ("SGD step ms (w4 b16 ASL)", 1000 * st["step_seconds"]["sgd"], st["config"]),
    ]
    for name, ratio in r["step_time_ratio"].items():
        rows.append((f"step_time_ratio {name} / sgd", ratio,
                     verdict("step_time_ratio", ratio) if name in ("sam", "asam_ema") else ""))
    rows += [
        ("trainer images/s", tvb["trainer_images_per_second"], tvb["config"]),
        ("bare loop images/s", tvb["bare_images_per_second"], "same model, batch, SGD, device"),
        ("trainer_vs_bare_ratio", r["trainer_vs_bare_ratio"],
         verdict("trainer_vs_bare_ratio", r["trainer_vs_bare_ratio"])),
        ("  its interquartile range", "{:.3f}-{:.3f}".format(*tvb["ratio_iqr"]),
         f"{tvb['rounds']} paired rounds, spread {100 * tvb['ratio_spread']:.1f}% of the median"),
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
    rows.append(("ensemble_stage_seconds", r["ensemble_stage_seconds"],
                 "stages.ensemble.analyse, 11 x 10,000 x 10, config.yaml's ensemble:"))
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
