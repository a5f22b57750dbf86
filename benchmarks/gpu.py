"""CUDA benchmark of the report's recipes (run through benchmarks/gpu.sh): under 5 minutes
on one H100/H200.

Synthetic uint8 CIFAR-shaped data (32x32x3, 10 classes; the device machine has no
internet), the report's network at CIFAR's size (resnet18_cifar, config.yaml's width 64,
from scratch), augment.mode batched (the recipes' augmentations made on the GPU: per-image
workers would measure the CPUs, not the training), everything else as config.yaml
resolves it. Sections, in this order:

1. batch 512, bf16, channels_last, SGD, cross-entropy, torchvision augmentations batched:
   our Trainer (Trainer.fit over one epoch, evaluation excluded) against the bare PyTorch
   loop, images/s (goal: >= 80,000 on one H100) and the trainer's data-wait fraction;
2. the report's two recipes at batch 16, exactly as config.yaml's experiments give them:
   `single_asam` (ASAM over SGD, lr 1e-4, momentum 0.9, weight decay 5e-4, rho 0.5,
   eta 0.01, cosine per step, ASL, EMA 0.999) and `ensemble_adam` (Adam lr 1e-4, StepLR,
   ASL); each trained eager by 1, 2, 4 and 8 concurrent processes (one thread each, the
   trainer's own loop: Trainer.train_step over its input pipeline for a fixed time from a
   common start), aggregate images/s; 1 process is the recipe's eager speed, which is also
   set against SGD's step (single_asam with plain SGD, no EMA);
3. both recipes with `runtime.compile: reduce-overhead` (torch.compile with CUDA graphs),
   one process each (compiling side by side, measured one after the other), within what
   is left of `--budget` (default 200 s; past it they are killed and listed as skipped).

gpu.sh then starts CUDA MPS (nvidia-cuda-mps-control -d) when the machine has it and
reruns section 2's concurrent processes under it (`--phase mps`, merged into the same
JSON), or records why not. Writes JSON ($OUT/gpu_benchmark.json when $OUT is set, else
benchmarks/results/gpu.json) and prints a table. A failing section is recorded in
`errors` and the rest still runs. `--smoke` runs every section on the CPU with tiny sizes
(the compile section only with --smoke-compile: a cold torch.compile on a CPU takes
minutes), to prove the script works end to end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from cifar_ensembles.typed import to_data

from .common import (
    CIFAR_RESNET,
    ROOT,
    WorkerPool,
    bare_loop,
    describe,
    experiment_specs,
    log,
    machine,
    runtime_spec,
    synthetic_cifar,
    table,
    take,
    task,
    trainer_epoch,
    training_spec,
    write_data,
    write_json,
)

GOAL_B512 = 80_000
RECIPES = ("single_asam", "ensemble_adam")
# The report's values (section II and III), checked against what config.yaml resolves to.
REPORT = {
    "single_asam": {"batch_size": 16, "optimizer.name": "asam", "optimizer.base": "sgd",
                    "optimizer.lr": 1e-4, "optimizer.momentum": 0.9, "optimizer.weight_decay": 5e-4,
                    "optimizer.rho": 0.5, "optimizer.eta": 0.01, "scheduler.name": "cosine",
                    "scheduler.interval": "step", "loss.name": "asl", "ema.enabled": True,
                    "ema.decay": 0.999},
    "ensemble_adam": {"batch_size": 16, "optimizer.name": "adam", "optimizer.lr": 1e-4,
                      "scheduler.name": "step", "loss.name": "asl", "ema.enabled": False},
}


class Budget:
    def __init__(self, seconds: float):
        self.start, self.seconds = time.perf_counter(), seconds

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.start)


def sizes(smoke: bool) -> dict:
    if smoke:
        return dict(device="cpu", image=16, width=4, big_batch=32, big_steps=3, pool_images=256,
                    concurrent=(1, 2), seconds=1.0, warmup=1, compile_warmup=3, threads=1)
    return dict(device="cuda", image=32, width=None, big_batch=512, big_steps=150, pool_images=4096,
                concurrent=(1, 2, 4, 8), seconds=3.0, warmup=10, compile_warmup=5, threads=4)


# ------------------------------------------------------------------------------- specs
def b512_specs(z: dict):
    model = {**CIFAR_RESNET, **({"width": z["width"]} if z["width"] else {})}
    spec = training_spec({"epochs": 1, "batch_size": z["big_batch"], "precision": "bf16", "model": model,
                          "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4},
                          "scheduler": {"name": "constant"}, "loss": {"name": "cross_entropy"},
                          "augment": {"name": "torchvision", "mode": "batched"}, "ema": {"enabled": False}})
    runtime = runtime_spec({"device": z["device"], "channels_last": True, "compile": False,
                            "loader": {"num_workers": 0}})
    return spec, runtime


def recipe_specs(name: str, z: dict, compile_mode=False, training: dict | None = None):
    """An experiment of config.yaml on resnet18_cifar at 32x32, augment.mode batched."""
    model = {**CIFAR_RESNET, **({"width": z["width"]} if z["width"] else {})}
    changes = {"model": model, "augment": {"mode": "batched"}, **(training or {})}
    return experiment_specs(name, training=changes, runtime={"device": z["device"], "compile": compile_mode,
                                                             "loader": {"num_workers": 0}})


def recipe_differences(name: str, spec) -> dict:
    """Where the resolved recipe departs from the report's values (none expected)."""
    data, out = to_data(spec), {}
    for dotted, want in REPORT[name].items():
        value = data
        for key in dotted.split("."):
            value = value[key]
        if value != want:
            out[dotted] = {"config": value, "report": want}
    return out


# ----------------------------------------------------------------------------- sections
def b512(z: dict, data: dict) -> dict:
    spec, runtime = b512_specs(z)
    sub = take(data, z["big_steps"] * z["big_batch"], 512)
    log(f"batch {z['big_batch']} bf16 channels_last SGD, augment batched: trainer and bare loop ...")
    t = trainer_epoch(spec, runtime, sub, threads=z["threads"], warmup=z["warmup"])
    b = bare_loop(spec, runtime, sub, z["big_steps"], threads=z["threads"], warmup=z["warmup"])
    log(f"  trainer {t['images_per_second']:.0f} img/s, bare {b['images_per_second']:.0f} img/s, "
        f"data wait {100 * t['data_wait_fraction']:.1f}%")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"config": describe(spec, runtime), "trainer": t, "bare": b,
            "trainer_vs_bare_ratio": t["images_per_second"] / b["images_per_second"],
            "goal_images_per_second": GOAL_B512}


def concurrent(z: dict, data_path: str, with_sgd: bool, timeout: float) -> dict:
    """Section 2: one pool of max(concurrent) processes, each with both recipes built and
    warmed up (process 0 also SGD's reference); 1/2/4/8 of them train a recipe together."""
    tasks = [task(name, *recipe_specs(name, z)) for name in RECIPES]
    sgd = task("sgd", *recipe_specs("single_asam", z, training={"optimizer": {"name": "sgd"},
                                                                "ema": {"enabled": False}}))
    first = [*tasks, sgd] if with_sgd else tasks
    jobs = [first] + [tasks] * (max(z["concurrent"]) - 1)
    out = {"recipes": {t["name"]: describe(*recipe_specs(t["name"], z)) for t in tasks},
           "seconds": z["seconds"], "images_per_second": {name: {} for name in RECIPES}, "runs": {}}
    log(f"  starting {len(jobs)} training processes ...")
    start = time.monotonic()
    with WorkerPool(jobs, data_path, threads=1, warmup=z["warmup"], timeout=timeout) as pool:
        out["startup_seconds"] = time.monotonic() - start
        for n in z["concurrent"]:
            for t, name in enumerate(RECIPES):
                r = pool.run({i: t for i in range(n)}, z["seconds"])
                out["images_per_second"][name][str(n)] = r["aggregate_images_per_second"]
                out["runs"][f"{name} x{n}"] = r["jobs"]
                log(f"  {name}, {n} process(es): {r['aggregate_images_per_second']:.0f} img/s in all")
        if with_sgd:
            r = pool.run({0: len(tasks)}, z["seconds"])
            out["sgd"] = r["jobs"][0]
            log(f"  sgd reference: {r['aggregate_images_per_second']:.0f} img/s")
    return out


def compiled(z: dict, data_path: str, timeout: float) -> dict:
    """Section 3: each recipe with compile: reduce-overhead in its own process."""
    jobs = [[task(name, *recipe_specs(name, z, compile_mode="reduce-overhead"))] for name in RECIPES]
    out = {}
    log(f"  compiling both recipes side by side (at most {timeout:.0f} s) ...")
    start = time.monotonic()
    with WorkerPool(jobs, data_path, threads=1, warmup=z["compile_warmup"], timeout=timeout,
                    tolerant=True) as pool:
        seconds = time.monotonic() - start
        for i, name in enumerate(RECIPES):
            if i in pool.failed:
                out[name] = {"error": pool.failed[i]}
                log(f"  {name}: {pool.failed[i]}")
                continue
            r = pool.run({i: 0}, z["seconds"])["jobs"][0]
            out[name] = {**r, "warmup_seconds": pool.ready[i]["warmup_seconds"][0]}
            log(f"  {name}: {r['images_per_second']:.0f} img/s (warm-up with compile "
                f"{out[name]['warmup_seconds']:.0f} s)")
    out["startup_seconds"] = seconds
    return out


def attempt(results: dict, key: str, fn, *args):
    """Run a section; a failure is recorded under errors[key] and the run goes on."""
    try:
        results[key] = fn(*args)
    except Exception as err:
        results.setdefault("errors", {})[key] = f"{err.__class__.__name__}: {err}"
        log(f"  {key} failed: {err.__class__.__name__}: {err}")
        traceback.print_exc(file=sys.stderr)


# ------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (proves the script runs)")
    p.add_argument("--smoke-compile", action="store_true", help="with --smoke: also run the compile section")
    p.add_argument("--budget", type=float, default=200.0,
                   help="seconds for sections 1-3; the compile section gets what is left")
    p.add_argument("--phase", choices=["main", "mps"], default="main",
                   help="mps: only section 2's concurrent processes (gpu.sh runs it under CUDA MPS), "
                        "merged into the JSON of the main phase")
    p.add_argument("--mps-note", default=None,
                   help="with --phase mps: record this (why MPS is not measured) and measure nothing")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    out_dir = os.environ.get("OUT")
    default_json = ROOT / "benchmarks" / "results" / ("gpu_smoke.json" if a.smoke else "gpu.json")
    json_path = a.json or str(Path(out_dir) / "gpu_benchmark.json" if out_dir else default_json)
    z = sizes(a.smoke)
    budget = Budget(a.budget)
    if a.phase == "mps":
        return mps_phase(a, z, json_path)
    if z["device"] == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks.gpu: no CUDA device (use --smoke on a CPU)")
    results = {"machine": machine(), "smoke": a.smoke, "skipped": [],
               "sizes": {k: v for k, v in z.items() if k != "concurrent"},
               "concurrent_levels": z["concurrent"]}
    log(f"device: {results['machine'].get('gpu', 'cpu')}")
    results["recipes"] = {name: to_data(recipe_specs(name, z)[0]) for name in RECIPES}
    results["recipe_differences"] = {name: recipe_differences(name, recipe_specs(name, z)[0])
                                     for name in RECIPES}
    for name, diff in results["recipe_differences"].items():
        if diff:
            log(f"  warning: config.yaml's {name} departs from the report: {diff}")
    data = synthetic_cifar(max(z["big_steps"] * z["big_batch"], z["pool_images"]), 512, size=z["image"])

    attempt(results, "b512", b512, z, data)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_data(Path(tmp) / "data.npz", take(data, z["pool_images"], 512))
        log(f"batch 16 recipes: {'/'.join(map(str, z['concurrent']))} concurrent eager processes ...")
        attempt(results, "concurrent", concurrent, z, path, True, max(budget.left(), 60))
        if a.smoke and not a.smoke_compile:
            results["skipped"].append("compile: reduce-overhead (--smoke without --smoke-compile)")
        else:
            left = budget.left() - 2 * (z["seconds"] + 2) - 5
            if left < 30:
                results["skipped"].append(f"compile: reduce-overhead (budget: {max(left, 0):.0f} s left)")
            else:
                log("batch 16 recipes, compile: reduce-overhead ...")
                attempt(results, "reduce_overhead", compiled, z, path, left)
                for name, r in (results.get("reduce_overhead") or {}).items():
                    if isinstance(r, dict) and "error" in r and "within" in r["error"]:
                        results["skipped"].append(f"compile: reduce-overhead, {name} ({r['error']})")
    results["mps"] = {"used": False, "note": "the MPS phase has not run (python -m benchmarks.gpu alone)"}
    results["benchmark_seconds"] = time.perf_counter() - budget.start
    summarize(results)
    write_json(json_path, results)
    print(report(results))
    print(f"\nJSON: {json_path}")
    return 1 if results.get("errors") else 0


def mps_phase(a, z: dict, json_path: str) -> int:
    """Section 2's concurrent processes again (under MPS when gpu.sh started it), merged
    into the main phase's JSON. Makes no CUDA context itself."""
    start = time.perf_counter()
    path = Path(json_path)
    if path.exists():
        results = json.loads(path.read_text())
    else:
        results = {"smoke": a.smoke, "skipped": [], "machine": {"gpu": "unknown machine"},
                   "errors": {"main": f"the main phase wrote no JSON at {path}"}}
    if a.mps_note:
        results["mps"] = {"used": False, "note": a.mps_note}
        log(f"MPS: {a.mps_note}")
    else:
        daemon = not a.smoke
        results["mps"] = {"used": daemon, "note": "nvidia-cuda-mps-control -d started by gpu.sh" if daemon
                          else "smoke run on a CPU: no MPS daemon; the phase ran to prove the script"}
        data = synthetic_cifar(z["pool_images"], 512, size=z["image"])
        with tempfile.TemporaryDirectory() as tmp:
            data_path = write_data(Path(tmp) / "data.npz", data)
            log(f"batch 16 recipes under MPS: {'/'.join(map(str, z['concurrent']))} concurrent processes ...")
            results.get("errors", {}).pop("concurrent_mps", None)
            attempt(results, "concurrent_mps", concurrent, z, data_path, False, 90)
    results["mps_phase_seconds"] = time.perf_counter() - start
    summarize(results)
    write_json(json_path, results)
    print(report(results))
    print(f"\nJSON: {json_path}")
    return 1 if (results.get("errors") or {}).get("concurrent_mps") else 0


def summarize(r: dict) -> None:
    """The headline numbers at the top level of the JSON."""
    big = r.get("b512") or {}
    con, ro, mps = r.get("concurrent") or {}, r.get("reduce_overhead") or {}, r.get("concurrent_mps") or {}
    eager = {name: (con.get("images_per_second") or {}).get(name, {}).get("1") for name in RECIPES}
    sgd = (con.get("sgd") or {}).get("images_per_second")
    r.update({
        "b512_images_per_second": (big.get("trainer") or {}).get("images_per_second"),
        "b512_bare_images_per_second": (big.get("bare") or {}).get("images_per_second"),
        "b512_trainer_vs_bare_ratio": big.get("trainer_vs_bare_ratio"),
        "b512_data_wait_fraction": (big.get("trainer") or {}).get("data_wait_fraction"),
        "b512_goal_met": ((big.get("trainer") or {}).get("images_per_second") or 0) >= GOAL_B512,
        "b16_eager_images_per_second": eager,
        "b16_reduce_overhead_images_per_second": {name: (ro.get(name) or {}).get("images_per_second")
                                                  for name in RECIPES},
        # step time of the recipe over SGD's (images/s of SGD over the recipe's), eager
        "b16_step_time_vs_sgd": {name: sgd / ips if sgd and ips else None for name, ips in eager.items()},
        "b16_concurrent_images_per_second": con.get("images_per_second"),
        "b16_concurrent_mps_images_per_second": mps.get("images_per_second"),
    })


def report(r: dict) -> str:
    big = r.get("b512") or {}
    rows = [
        ("b512 trainer images/s", r.get("b512_images_per_second"), big.get("config", "failed")),
        ("b512 bare loop images/s", r.get("b512_bare_images_per_second"),
         "same model, batch, SGD, bf16, channels_last"),
        ("b512 trainer_vs_bare_ratio", r.get("b512_trainer_vs_bare_ratio"), "goal >= 0.95"),
        ("b512 goal", r.get("b512_images_per_second"),
         "not applicable (smoke run)" if r.get("smoke")
         else f">= {GOAL_B512:,} images/s: {'met' if r.get('b512_goal_met') else 'MISSED'}"),
        ("b512 data_wait_fraction", r.get("b512_data_wait_fraction"), "batched input path; goal <= 0.05"),
    ]
    con = r.get("concurrent") or {}
    for name in RECIPES:
        rows.append((f"{name} eager images/s", (r.get("b16_eager_images_per_second") or {}).get(name),
                     (con.get("recipes") or {}).get(name, "")))
        rows.append((f"{name} step / sgd step", (r.get("b16_step_time_vs_sgd") or {}).get(name), "eager"))
        rows.append((f"{name} reduce-overhead images/s",
                     (r.get("b16_reduce_overhead_images_per_second") or {}).get(name),
                     "inductor on a CPU (no CUDA graphs), 1 process" if r.get("smoke")
                     else "CUDA graphs, 1 process"))
    mps = r.get("mps") or {}
    for key, label in (("b16_concurrent_images_per_second", "no MPS"),
                       ("b16_concurrent_mps_images_per_second",
                        "MPS" if mps.get("used") else "MPS phase without a daemon")):
        for name, levels in (r.get(key) or {}).items():
            for n, ips in levels.items():
                rows.append((f"{name} x{n} processes images/s", ips, f"aggregate, eager, {label}"))
    m = r.get("machine") or {}
    where = m.get("gpu", f"no GPU (smoke run on {m.get('cpu_model', 'a CPU')})")
    head = (f"{where}, torch {m.get('torch')}, "
            f"CUDA {m.get('cuda')}, {r.get('benchmark_seconds', 0):.0f} s"
            + (f" + MPS phase {r['mps_phase_seconds']:.0f} s" if "mps_phase_seconds" in r else ""))
    head += f"\nMPS: {'used' if mps.get('used') else 'not used'} ({mps.get('note', '-')})"
    if r.get("skipped"):
        head += "\nskipped: " + "; ".join(r["skipped"])
    for key, err in (r.get("errors") or {}).items():
        head += f"\nERROR in {key}: {err[:300]}"
    return head + "\n\n" + table(rows, ("measure", "value", "note"))


if __name__ == "__main__":
    sys.exit(main())
