"""CUDA benchmark of the study's GPU path, run through benchmarks/gpu.sh as one prepared
command: under 8 minutes on one H100/H200, compiles included (default budget 420 s).

Synthetic uint8 CIFAR-shaped data (32x32x3, 10 classes; the device machine has no
internet), augment.mode batched (the recipes' augmentations made on the GPU), everything
else as config.yaml resolves it. Sections, most valuable first; each starts only when at
least its floor of the budget is left (else it is listed under `skipped`), may take at most
its cap, and the JSON is rewritten after each one (and inside `recipes` after each
measurement), so a run cut off by a time limit still returns what it measured:

1. `recipes` (floor 150 s, cap 300 s): the report's two recipes at batch 16 on its network
   at CIFAR's size (resnet18_cifar, width 64, from scratch), exactly as config.yaml's
   experiments give them: `single_asam` (ASAM over SGD, EMA) and `ensemble_adam`. One
   process per recipe: eager images/s (measured one recipe at a time), then both compile
   `runtime.compile: reduce-overhead` side by side, then the compiled ones are measured
   one at a time. Per compiled recipe: compile seconds (the first step, which compiles
   every graph), CUDA-graph skips (expected 0; TORCHINDUCTOR_CUDAGRAPH_OR_ERROR is set
   where torch has it, so a skip is an error, not a silent fallback), dynamo's distinct
   graphs and recompiles (expected 2 and 1 for ASAM, whose second pass freezes BatchNorm's
   statistics; 1 and 0 for Adam), the growth of BatchNorm's num_batches_tracked over the
   measured steps (must equal their number), and the largest loss difference from eager
   over the first 6 steps (same seed, same batches; CUDA graphs are recorded on the second
   and replayed from the third). single_asam's step is also set
   against plain SGD's (the same run with SGD, no EMA).
2. `resnet18_224` (floor 40 s, cap 90 s): both recipes eager at batch 16 on the network the
   default config trains: torchvision resnet18 at 224 px (random weights: none needed).
3. `channels_last` (floor 35 s, cap 90 s): both recipes eager at batch 16 with
   runtime.channels_last on and off.
4. `b512` (floor 45 s, cap 120 s): batch 512, bf16, channels_last, SGD, cross-entropy:
   our Trainer (one epoch, evaluation excluded) against the bare PyTorch loop, images/s
   (goal >= 80,000 on one H100) and the trainer's data-wait fraction.
5. `concurrent` (floor 70 s, cap 150 s): 1, 2, 4 and 8 processes training a recipe
   eager together, aggregate images/s.
6. gpu.sh then starts CUDA MPS (when the machine has nvidia-cuda-mps-control) and reruns
   section 5 under it (`--phase mps`, floor 60 s, merged into the same JSON).

Every section runs in its own processes, under a timeout; their stderr is kept in the
log folder beside the JSON (<json name>_logs/), and the first line of every error is
printed and recorded under `errors`. `--smoke` runs every section on the CPU with tiny
sizes (torch.compile without CUDA graphs there: a cold compile of both recipes takes about
two minutes on two cores, a warm one seconds), to prove the script end to end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import torch

from cifar_ensembles.config.convert import to_data

from .common import (
    CIFAR_RESNET,
    ROOT,
    WorkerPool,
    _say,
    bare_loop,
    batches,
    describe,
    error_line,
    experiment_specs,
    first_line,
    log,
    machine,
    quiet,
    run_steps,
    runtime_spec,
    sync,
    synthetic_cifar,
    table,
    take,
    task,
    trainer_epoch,
    training_spec,
    warm_up,
    write_data,
    write_json,
)

GOAL_B512 = 80_000
RECIPES = ("single_asam", "ensemble_adam")
DEFAULT_BUDGET = 420.0  # seconds for everything gpu.sh runs, MPS phase included
FIRST_STEPS = 6  # steps whose losses are compared with eager (CUDA graphs record on the 2nd)
# name: (floor, cap) in seconds, in the order they run (most valuable first)
SECTIONS = {"recipes": (150, 300), "resnet18_224": (40, 90), "channels_last": (35, 90),
            "b512": (45, 120), "concurrent": (70, 150)}
MPS_FLOOR = 60  # gpu.sh skips the MPS phase with less left (kept in step with gpu.sh)
SMOKE_FLOOR = 10  # every floor on a smoke run
# What a correct reduce-overhead step gives (per recipe); num_batches_tracked_growth must
# equal measured_steps.
EXPECTED = {"single_asam": {"cudagraph_skips": 0, "graphs": 2, "recompiles": 1},
            "ensemble_adam": {"cudagraph_skips": 0, "graphs": 1, "recompiles": 0}}
COMPILED_KEYS = ("images_per_second", "speedup_vs_eager", "compile_seconds", "first_steps_seconds",
                 "cudagraphs", "cudagraph_or_error", "cudagraph_skips", "cudagraph_skip_reasons",
                 "graphs", "recompiles", "graph_breaks", "num_batches_tracked_growth", "measured_steps",
                 "loss_diff_vs_eager", "losses_eager", "losses_compiled", "checks_passed", "error")
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


def sizes(smoke: bool) -> dict:
    if smoke:
        return dict(device="cpu", image=16, width=4, input_size=32, big_batch=32, big_steps=3,
                    pool_images=256, concurrent=(1, 2), seconds=1.0, concurrent_seconds=0.5, warmup=1,
                    compile_warmup=2, threads=1, big_threads=1)
    return dict(device="cuda", image=32, width=None, input_size=None, big_batch=512, big_steps=150,
                pool_images=4096, concurrent=(1, 2, 4, 8), seconds=3.0, concurrent_seconds=2.0, warmup=10,
                compile_warmup=5, threads=1, big_threads=4)


# ------------------------------------------------------------------------------- specs
def recipe_specs(name: str, z: dict, compile_mode=False, training: dict | None = None,
                 runtime: dict | None = None):
    """An experiment of config.yaml on resnet18_cifar at 32x32, augment.mode batched."""
    model = {**CIFAR_RESNET, **({"width": z["width"]} if z["width"] else {})}
    changes = {"model": model, "augment": {"mode": "batched"}, **(training or {})}
    return experiment_specs(name, training=changes,
                            runtime={"device": z["device"], "compile": compile_mode,
                                     "loader": {"num_workers": 0}, **(runtime or {})})


def default_network_specs(name: str, z: dict):
    """An experiment on the network the default config trains (torchvision resnet18 at
    config.yaml's input size, 224; 32 on a smoke run), random weights."""
    model = {"pretrained": False, **({"input_size": z["input_size"]} if z["input_size"] else {})}
    return experiment_specs(name, training={"model": model, "augment": {"mode": "batched"}},
                            runtime={"device": z["device"], "compile": False, "loader": {"num_workers": 0}})


def sgd_specs(z: dict):
    """single_asam with plain SGD and no EMA: the reference step."""
    return recipe_specs("single_asam", z, training={"optimizer": {"name": "sgd"}, "ema": {"enabled": False}})


def b512_specs(z: dict):
    model = {**CIFAR_RESNET, **({"width": z["width"]} if z["width"] else {})}
    spec = training_spec({"epochs": 1, "batch_size": z["big_batch"], "precision": "bf16", "model": model,
                          "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4},
                          "scheduler": {"name": "constant"}, "loss": {"name": "cross_entropy"},
                          "augment": {"name": "torchvision", "mode": "batched"}, "ema": {"enabled": False}})
    runtime = runtime_spec({"device": z["device"], "channels_last": True, "compile": False,
                            "loader": {"num_workers": 0}})
    return spec, runtime


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


# ------------------------------------------------------------- compile diagnostics
class CompileLog(logging.Handler):
    """Counts dynamo's recompiles and keeps inductor's CUDA-graph skip messages, from torch's
    log channels (which set_logs turns on; their text also goes to the worker's log)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.recompiles, self.skips = 0, []

    def emit(self, record):
        with contextlib.suppress(Exception):
            msg = record.getMessage()
            if msg.startswith("Recompiling function"):
                self.recompiles += 1
            elif "cudagraph" in record.name and "skip" in msg.lower():
                self.skips.append(msg.strip().splitlines()[0][:300])


def cudagraph_or_error_available() -> bool:
    import torch._inductor.config as inductor_config

    return hasattr(inductor_config.triton, "cudagraph_or_error")


def watch_compiles() -> tuple[CompileLog | None, bool]:
    """Turn on what makes a compile visible: recompile, graph-break and CUDA-graph logs
    (counted by a CompileLog) and cudagraph_or_error where torch has it. Returns the
    CompileLog (None when torch's log channels could not be set) and whether a skip is now
    an error."""
    import torch._inductor.config as inductor_config

    or_error = cudagraph_or_error_available()
    if or_error:
        inductor_config.triton.cudagraph_or_error = True
    handler = CompileLog()
    for channels in ({"recompiles": True, "graph_breaks": True, "cudagraphs": True},
                     {"recompiles": True, "graph_breaks": True}):
        try:
            torch._logging.set_logs(**channels)
            break
        except Exception as err:
            log(f"torch._logging.set_logs({channels}) failed: {first_line(err)}")
    else:
        handler = None
    if handler is not None:
        for name in ("torch._dynamo", "torch._inductor"):
            logging.getLogger(name).addHandler(handler)
    return handler, or_error


def compile_stats(handler: CompileLog | None) -> dict:
    """Inductor's CUDA-graph skips, dynamo's distinct graphs, recompiles and graph breaks
    since the counters were last cleared."""
    from torch._dynamo.utils import counters

    frames = int(counters["frames"]["ok"])
    return {"cudagraph_skips": int(counters["inductor"]["cudagraph_skips"]),
            "cudagraph_skip_reasons": handler.skips[:3] if handler else None,
            "graphs": int(counters["stats"]["unique_graphs"]),
            # from the recompiles log channel; without it, compiled frames beyond the first
            "recompiles": handler.recompiles if handler else max(frames - 1, 0),
            "graph_breaks": int(sum(counters["graph_break"].values()))}


def batchnorm_tracked(model) -> list[int]:
    return [int(m.num_batches_tracked) for m in model.modules()
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.num_batches_tracked is not None]


def first_steps(trainer, n: int) -> tuple[list[float], list[float]]:
    """The trainer's first n steps from its first batch: losses and seconds per step (the
    device synchronized), compiles included."""
    losses, seconds = [], []
    it = batches(trainer)
    for _ in range(n):
        x, y = next(it)
        start = time.monotonic()
        loss, _ = trainer.train_step(x, y)
        losses.append(float(loss))
        sync(trainer.device)
        seconds.append(round(time.monotonic() - start, 4))
    return losses, seconds


# ------------------------------------------------------------------ worker processes
def recipe_worker(job: dict) -> None:
    """One recipe of section 1 in its own process. Builds the eager trainer (and SGD's for
    single_asam), records eager's first losses, warms up, says it is ready; then answers
    commands from stdin: {"measure": "eager"|"sgd"|"compiled", "seconds": S},
    {"compile": true} (build the reduce-overhead trainer and take its first steps),
    {"quit": true}. A failing command answers {"error": first line, ...} and the process
    goes on."""
    from cifar_ensembles.files import splits
    from cifar_ensembles.training import Trainer

    z, name = job["z"], job["recipe"]
    handler, or_error = watch_compiles()
    data = splits.load(job["data"])
    trainers = {"eager": Trainer(*recipe_specs(name, z), data, 0, z["threads"], log=quiet)}
    losses_eager, _ = first_steps(trainers["eager"], FIRST_STEPS)
    warm_up(trainers["eager"], z["warmup"])
    if name == "single_asam":
        trainers["sgd"] = Trainer(*sgd_specs(z), data, 0, z["threads"], log=quiet)
        warm_up(trainers["sgd"], z["warmup"])
    _say({"ready": True, "losses_eager": losses_eager})
    for line in sys.stdin:
        command = json.loads(line)
        if command.get("quit"):
            break
        try:
            if command.get("compile"):
                from torch._dynamo.utils import counters

                counters.clear()
                spec, runtime = recipe_specs(name, z, compile_mode="reduce-overhead")
                trainer = trainers["compiled"] = Trainer(spec, runtime, data, 0, z["threads"], log=quiet)
                losses, seconds = first_steps(trainer, FIRST_STEPS)
                warm_up(trainer, z["compile_warmup"])
                _say({"compile_seconds": seconds[0], "first_steps_seconds": seconds,
                      "cudagraphs": trainer.parts.compile_mode == "reduce-overhead",
                      "cudagraph_or_error": or_error, "losses_eager": losses_eager, "losses_compiled": losses,
                      "loss_diff_vs_eager": max(abs(a - b) for a, b in zip(losses, losses_eager)),
                      **compile_stats(handler)})
            else:
                trainer = trainers[command["measure"]]
                before = batchnorm_tracked(trainer.model)
                r = run_steps(trainer, seconds=command["seconds"])
                growth = sorted({b - a for a, b in zip(before, batchnorm_tracked(trainer.model))})
                r["num_batches_tracked_growth"] = growth[0] if len(growth) == 1 else growth
                r["measured_steps"] = r["steps"]
                if command["measure"] == "compiled":
                    r.update(compile_stats(handler))
                _say(r)
        except Exception as err:
            traceback.print_exc()
            _say({"error": first_line(err), **(compile_stats(handler) if command.get("compile") else {})})


def eager_worker(job: dict) -> None:
    """Sections 2 and 3: each task built, warmed up and trained for job["seconds"], one after
    the other; one message per task, then {"done": true}."""
    from cifar_ensembles.config.convert import from_data
    from cifar_ensembles.config.spec import RuntimeSpec, TrainingSpec
    from cifar_ensembles.files import splits
    from cifar_ensembles.training import Trainer

    data = splits.load(job["data"])
    for t in job["tasks"]:
        try:
            spec = from_data(TrainingSpec, t["training"], "training")
            runtime = from_data(RuntimeSpec, t["runtime"], "runtime")
            trainer = Trainer(spec, runtime, data, 0, job["threads"], log=quiet)
            warm_up(trainer, job["warmup"])
            _say({"task": t["name"], **run_steps(trainer, seconds=job["seconds"])})
            del trainer
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception as err:
            traceback.print_exc()
            _say({"task": t["name"], "error": first_line(err)})
    _say({"done": True})


def b512_worker(job: dict) -> None:
    z = job["z"]
    spec, runtime = b512_specs(z)
    data = take(synthetic_cifar(z["big_steps"] * z["big_batch"], 512, size=z["image"]),
                z["big_steps"] * z["big_batch"], 512)
    t = trainer_epoch(spec, runtime, data, threads=z["big_threads"], warmup=z["warmup"])
    b = bare_loop(spec, runtime, data, z["big_steps"], threads=z["big_threads"], warmup=z["warmup"])
    _say({"config": describe(spec, runtime), "trainer": t, "bare": b,
          "trainer_vs_bare_ratio": t["images_per_second"] / b["images_per_second"],
          "goal_images_per_second": GOAL_B512})


WORKERS = {"recipe": recipe_worker, "eager": eager_worker, "b512": b512_worker}


class WorkerError(RuntimeError):
    pass


class Worker:
    """`python -m benchmarks.gpu worker KIND JSON` in its own session, its stderr kept in
    `log_path`; messages are the "@@ " lines of its stdout, commands JSON lines on stdin."""

    def __init__(self, kind: str, job: dict, log_path: Path, env: dict | None = None):
        self.log_path, self.kind = Path(log_path), kind
        env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", **(env or {}),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), str(ROOT),
                                                           os.environ.get("PYTHONPATH")]))}
        with open(self.log_path, "w") as err:
            command = [sys.executable, "-m", "benchmarks.gpu", "worker", kind, json.dumps(job)]
            pipe = subprocess.PIPE
            self.proc = subprocess.Popen(command, cwd=ROOT, env=env, stdin=pipe, stdout=pipe,
                                         stderr=err, text=True, start_new_session=True)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.startswith("@@ "):
                self.lines.put(json.loads(line[3:]))
        self.lines.put(None)

    def send(self, command: dict) -> None:
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()

    def answer(self, timeout: float, errors: bool = True) -> dict:
        """The next message; WorkerError (one line) when the process exits or is late, or
        (`errors`) when the message is an error."""
        try:
            message = self.lines.get(timeout=max(timeout, 0.1))
        except queue.Empty:
            self.kill()
            raise WorkerError(f"no answer in the time left ({max(timeout, 0):.0f} s): killed "
                              f"(its log: {self.log_path.name})") from None
        if message is None:
            code = self.proc.wait()
            raise WorkerError(f"exited ({code}): {error_line(self.log_text())} "
                              f"(its log: {self.log_path.name})")
        if errors and message.get("error"):
            raise WorkerError(message["error"])
        return message

    def log_text(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")
        return ""

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            if self.proc.poll() is None:
                self.send({"quit": True})
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        self.kill()  # what it started (torch.compile's workers) goes with it


def compile_env() -> dict:
    """TORCHINDUCTOR_CUDAGRAPH_OR_ERROR=1 where this torch has it (a CUDA-graph skip raises)."""
    return {"TORCHINDUCTOR_CUDAGRAPH_OR_ERROR": "1"} if cudagraph_or_error_available() else {}


# ----------------------------------------------------------------------------- sections
class Run:
    """The results, their JSON (rewritten by save()), the deadline and the log folder."""

    def __init__(self, results: dict, json_path: str, deadline: float, smoke: bool):
        self.results, self.json_path, self.deadline, self.smoke = results, json_path, deadline, smoke
        self.log_dir = Path(json_path).with_name(Path(json_path).stem + "_logs")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.start = time.time()
        self.current = None  # the section running

    def interrupted(self, err: BaseException) -> None:
        """Record why the run stopped early (SIGTERM from a time limit, Ctrl-C)."""
        why = "SIGTERM (a time limit)" if isinstance(err, SystemExit) and err.code == 128 + signal.SIGTERM \
            else first_line(err)
        self.error("interrupted", f"{why} during {self.current or 'set-up'}")

    def left(self) -> float:
        return self.deadline - time.time()

    def save(self) -> None:
        self.results["benchmark_seconds"] = time.time() - self.start
        summarize(self.results)
        write_json(self.json_path, self.results)

    def error(self, key: str, message: str) -> None:
        self.results.setdefault("errors", {})[key] = message
        log(f"ERROR in {key}: {message}")

    def section(self, name: str, fn, *args) -> None:
        """Run one section if its floor is left, under min(cap, what is left)."""
        floor, cap = SECTIONS[name]
        floor = SMOKE_FLOOR if self.smoke else floor
        status = self.results["sections"]
        left = self.left()
        if left < floor:
            status[name] = {"status": "skipped", "seconds": 0.0}
            self.results["skipped"].append(f"{name} (budget: {max(left, 0):.0f} s left, floor {floor} s)")
            log(f"{name}: skipped, {max(left, 0):.0f} s left of the budget (floor {floor} s)")
            self.save()
            return
        timeout = min(cap, left)
        log(f"{name} (at most {timeout:.0f} s) ...")
        self.current = name
        start = time.monotonic()
        status[name] = {"status": "running", "timeout": round(timeout)}
        self.save()
        try:
            fn(self, timeout, *args)
            failed = any(k == name or k.startswith(name + ".") for k in self.results.get("errors", {}))
            state = "error" if failed else "ok"
        except Exception as err:
            self.error(name, first_line(err))
            traceback.print_exc(file=sys.stderr)
            state = "error"
        seconds = round(time.monotonic() - start, 1)
        status[name] = {"status": state, "seconds": seconds, "timeout": round(timeout)}
        self.current = None
        self.save()


def recipe_template(name: str, z: dict) -> dict:
    return {"config": describe(*recipe_specs(name, z)), "eager": None, "sgd": None,
            "reduce_overhead": {**dict.fromkeys(COMPILED_KEYS), "config": describe(
                *recipe_specs(name, z, compile_mode="reduce-overhead")), "expected": EXPECTED[name]}}


def recipes(run: Run, timeout: float, z: dict, data_path: str) -> None:
    """Section 1 (see the module's docstring)."""
    out = run.results["recipes"]
    end = time.monotonic() + timeout
    left = lambda: end - time.monotonic()  # noqa: E731
    workers = {name: Worker("recipe", {"recipe": name, "z": z, "data": data_path},
                            run.log_dir / f"recipes_{name}.log", compile_env()) for name in RECIPES}
    alive = dict(workers)

    def ask(name: str, key: str, command: dict | None, wait: float) -> dict:
        """Send `command` (None: only wait) to the recipe's worker; its answer, or
        {"error": first line} with the error recorded (a worker that died or was late is
        dropped; a failed command's answer keeps what else it says)."""
        w = alive[name]
        try:
            if command is not None:
                w.send(command)
            r = w.answer(min(wait, left()), errors=False)
        except (WorkerError, OSError) as err:
            r = {"error": f"{err.__class__.__name__}: {err}" if isinstance(err, OSError) else str(err)}
            if w.proc.poll() is not None:
                alive.pop(name)
        if r.get("error"):
            run.error(f"recipes.{name}.{key}", r["error"])
        run.save()
        return r

    try:
        log(f"  batch 16 recipes: building and warming up {', '.join(RECIPES)} (eager) ...")
        for name in RECIPES:
            r = ask(name, "startup", None, 180)
            if r.get("error"):
                out[name]["eager"] = r
                out[name]["reduce_overhead"]["error"] = f"not compiled: the process failed ({r['error']})"
        for name in [n for n in RECIPES if n in alive]:
            r = out[name]["eager"] = ask(name, "eager", {"measure": "eager", "seconds": z["seconds"]},
                                         z["seconds"] + 60)
            if not r.get("error"):
                log(f"  {name} eager: {r['images_per_second']:.0f} img/s")
            if name == "single_asam" and name in alive:
                r = out[name]["sgd"] = ask(name, "sgd", {"measure": "sgd", "seconds": z["seconds"]},
                                           z["seconds"] + 60)
                if not r.get("error"):
                    log(f"  single_asam with SGD (no EMA), eager: {r['images_per_second']:.0f} img/s")
        compiling = [n for n in RECIPES if n in alive]
        log(f"  compile: reduce-overhead, {' and '.join(compiling)} side by side ...")
        for name in compiling:
            with contextlib.suppress(OSError):
                alive[name].send({"compile": True})
        compile_start = time.monotonic()
        measuring = len(compiling) * (z["seconds"] + 5)  # kept for measuring what compiled
        for name in compiling:
            ro = out[name]["reduce_overhead"]
            r = ask(name, "compile", None, left() - measuring)
            if r.get("error", "").startswith("no answer"):
                r["error"] = (f"not compiled {time.monotonic() - compile_start:.0f} s after it began, when "
                              f"the section's time ran out: {r['error']}")
                run.results["errors"][f"recipes.{name}.compile"] = r["error"]
            ro.update({k: v for k, v in r.items() if k in COMPILED_KEYS})
            if r.get("error"):
                continue
            log(f"  {name}: compiled in {r['compile_seconds']:.1f} s, graphs {r['graphs']}, recompiles "
                f"{r['recompiles']}, cudagraph skips {r['cudagraph_skips']}, loss diff vs eager "
                f"{r['loss_diff_vs_eager']:.2e}")
            run.save()
        for name in compiling:
            ro = out[name]["reduce_overhead"]
            if name not in alive or ro["error"]:
                continue
            r = ask(name, "compiled", {"measure": "compiled", "seconds": z["seconds"]}, z["seconds"] + 60)
            ro.update({k: v for k, v in r.items() if k in COMPILED_KEYS})
            if r.get("error"):
                continue
            eager = (out[name]["eager"] or {}).get("images_per_second")
            ro["speedup_vs_eager"] = r["images_per_second"] / eager if eager else None
            ro["checks_passed"] = compiled_checks(ro)
            log(f"  {name} reduce-overhead: {r['images_per_second']:.0f} img/s, num_batches_tracked "
                f"+{r['num_batches_tracked_growth']} over {r['measured_steps']} steps, "
                f"checks {'passed' if ro['checks_passed'] else 'FAILED'}")
            run.save()
    finally:
        for w in workers.values():
            w.close()


def compiled_checks(ro: dict) -> bool:
    want = ro["expected"]
    return (all(ro.get(k) == v for k, v in want.items())
            and ro.get("num_batches_tracked_growth") == ro.get("measured_steps"))


def eager_tasks(run: Run, timeout: float, key: str, tasks: list[dict], z: dict, data_path: str) -> None:
    """Sections 2 and 3: `tasks` trained one after the other in one process."""
    out = run.results[key]
    end = time.monotonic() + timeout
    w = Worker("eager", {"tasks": tasks, "data": data_path, "threads": z["threads"], "warmup": z["warmup"],
                         "seconds": z["seconds"]}, run.log_dir / f"{key}.log")
    try:
        while True:
            try:
                r = w.answer(end - time.monotonic(), errors=False)
            except WorkerError as err:
                run.error(key, str(err))
                return
            if r.get("done"):
                return
            name = r.pop("task")
            out[name] = r
            if r.get("error"):
                run.error(f"{key}.{name}", r["error"])
            else:
                log(f"  {name}: {r['images_per_second']:.0f} img/s")
            run.save()
    finally:
        w.close()


def resnet18_224(run: Run, timeout: float, z: dict, data_path: str) -> None:
    tasks = [task(name, *default_network_specs(name, z)) for name in RECIPES]
    run.results["resnet18_224"] = {"configs": {name: describe(*default_network_specs(name, z))
                                               for name in RECIPES}}
    eager_tasks(run, timeout, "resnet18_224", tasks, z, data_path)


def channels_last(run: Run, timeout: float, z: dict, data_path: str) -> None:
    tasks = [task(f"{name} channels_last {'on' if on else 'off'}",
                  *recipe_specs(name, z, runtime={"channels_last": on}))
             for name in RECIPES for on in (True, False)]
    run.results["channels_last"] = {}
    eager_tasks(run, timeout, "channels_last", tasks, z, data_path)


def b512(run: Run, timeout: float, z: dict) -> None:
    w = Worker("b512", {"z": z}, run.log_dir / "b512.log")
    try:
        r = w.answer(timeout)
    finally:
        w.close()
    run.results["b512"] = r
    log(f"  trainer {r['trainer']['images_per_second']:.0f} img/s, bare {r['bare']['images_per_second']:.0f} "
        f"img/s, data wait {100 * r['trainer']['data_wait_fraction']:.1f}%")


def concurrent(run: Run, timeout: float, key: str, z: dict, data_path: str) -> None:
    """Section 5 (and the MPS phase): one pool of max(concurrent) processes, each with both
    recipes built and warmed up; 1/2/4/8 of them train a recipe together."""
    tasks = [task(name, *recipe_specs(name, z)) for name in RECIPES]
    jobs = [tasks] * max(z["concurrent"])
    out = run.results[key] = {"seconds": z["concurrent_seconds"], "runs": {},
                              "images_per_second": {n: {} for n in RECIPES}}
    end = time.monotonic() + timeout
    log(f"  starting {len(jobs)} training processes ...")
    start = time.monotonic()
    with WorkerPool(jobs, data_path, threads=1, warmup=z["warmup"], timeout=timeout,
                    log_dir=run.log_dir, name=f"{key}_") as pool:
        out["startup_seconds"] = time.monotonic() - start
        for n in z["concurrent"]:
            for t, name in enumerate(RECIPES):
                if end - time.monotonic() < z["concurrent_seconds"] + 5:
                    run.results["skipped"].append(f"{key}: {name} x{n} and later (its time is up)")
                    return
                r = pool.run({i: t for i in range(n)}, z["concurrent_seconds"])
                out["images_per_second"][name][str(n)] = r["aggregate_images_per_second"]
                out["runs"][f"{name} x{n}"] = r["jobs"]
                log(f"  {name}, {n} process(es): {r['aggregate_images_per_second']:.0f} img/s in all")
                run.save()


# ------------------------------------------------------------------------------ main
def versions() -> dict:
    """Versions and the device, printed first."""
    info = {"python": platform.python_version(), "torch": str(torch.__version__),
            "cuda": torch.version.cuda, "cudnn": None, "triton": None,
            "cudagraph_or_error": cudagraph_or_error_available()}
    with contextlib.suppress(Exception):
        info["cudnn"] = torch.backends.cudnn.version()
    with contextlib.suppress(Exception):
        import triton

        info["triton"] = triton.__version__
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, capability=f"{p.major}.{p.minor}", gpus=torch.cuda.device_count(),
                    gpu_memory_gib=round(p.total_memory / 2**30, 1))
    return info


def install_stop_handler() -> None:
    """SIGTERM (gpu.sh's time limit) ends the run through its finally blocks: workers are
    killed and the JSON keeps what was measured."""
    def stop(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (proves the script runs)")
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET,
                   help=f"seconds for the whole run, MPS phase included (default {DEFAULT_BUDGET:.0f})")
    p.add_argument("--deadline", type=float, default=None,
                   help="end of the budget as a Unix time (gpu.sh passes it; overrides --budget)")
    p.add_argument("--phase", choices=["main", "mps"], default="main",
                   help="mps: only the concurrent processes (gpu.sh runs it under CUDA MPS), "
                        "merged into the JSON of the main phase")
    p.add_argument("--mps-note", default=None,
                   help="with --phase mps: record this (why MPS is not measured) and measure nothing")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    install_stop_handler()
    out_dir = os.environ.get("OUT")
    default_json = ROOT / "benchmarks" / "results" / ("gpu_smoke.json" if a.smoke else "gpu.json")
    json_path = a.json or str(Path(out_dir) / "gpu_benchmark.json" if out_dir else default_json)
    deadline = a.deadline if a.deadline is not None else time.time() + a.budget
    z = sizes(a.smoke)
    if a.phase == "mps":
        return mps_phase(a, z, json_path, deadline)
    info = versions()
    log("versions: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    if z["device"] == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks.gpu: no CUDA device (use --smoke on a CPU)")
    results = {"versions": info, "machine": machine(), "smoke": a.smoke,
               "budget_seconds": deadline - time.time(), "skipped": [], "errors": {},
               "sizes": {k: v for k, v in z.items() if k != "concurrent"},
               "concurrent_levels": z["concurrent"],
               "sections": dict.fromkeys([*SECTIONS, "mps"], "pending"),
               "recipe_configs": {name: to_data(recipe_specs(name, z)[0]) for name in RECIPES},
               "recipe_differences": {name: recipe_differences(name, recipe_specs(name, z)[0])
                                      for name in RECIPES},
               "recipes": {name: recipe_template(name, z) for name in RECIPES},
               "mps": {"used": False, "note": "the MPS phase has not run (python -m benchmarks.gpu alone)"}}
    run = Run(results, json_path, deadline, a.smoke)
    log(f"JSON: {json_path} (rewritten after every section), logs: {run.log_dir}")
    for name, diff in results["recipe_differences"].items():
        if diff:
            log(f"  warning: config.yaml's {name} departs from the report: {diff}")
    run.save()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = write_data(Path(tmp) / "data.npz", synthetic_cifar(z["pool_images"], 512, size=z["image"]))
            run.section("recipes", recipes, z, path)
            run.section("resnet18_224", resnet18_224, z, path)
            run.section("channels_last", channels_last, z, path)
            run.section("b512", b512, z)
            run.section("concurrent", concurrent, "concurrent", z, path)
    except BaseException as err:  # SIGTERM, Ctrl-C: keep what was measured
        run.interrupted(err)
        raise
    finally:
        run.save()
    print(report(results))
    print(f"\nJSON: {json_path}")
    return 1 if results.get("errors") else 0


def mps_phase(a, z: dict, json_path: str, deadline: float) -> int:
    """Section 5's concurrent processes again (under MPS when gpu.sh started it), merged
    into the main phase's JSON. Makes no CUDA context itself."""
    path = Path(json_path)
    if path.exists():
        results = json.loads(path.read_text())
    else:
        results = {"smoke": a.smoke, "skipped": [], "sections": {}, "versions": {},
                   "errors": {"main": f"the main phase wrote no JSON at {path}"}}
    results.setdefault("errors", {}).pop("concurrent_mps", None)
    run = Run(results, json_path, deadline, a.smoke)
    run.start = time.time() - results.get("benchmark_seconds", 0)
    start = time.time()
    left = run.left()
    floor = SMOKE_FLOOR if a.smoke else MPS_FLOOR
    if a.mps_note:
        results["mps"] = {"used": False, "note": a.mps_note}
        results["sections"]["mps"] = {"status": "skipped", "seconds": 0.0}
        if a.mps_note.startswith("skipped"):
            results["skipped"].append(f"mps ({a.mps_note})")
        log(f"MPS: {a.mps_note}")
    elif left < floor:
        results["mps"] = {"used": False, "note": f"skipped: {max(left, 0):.0f} s left of the budget"}
        results["sections"]["mps"] = {"status": "skipped", "seconds": 0.0}
        results["skipped"].append(f"mps (budget: {max(left, 0):.0f} s left, floor {floor} s)")
    else:
        daemon = not a.smoke
        results["mps"] = {"used": daemon, "note": "nvidia-cuda-mps-control -d started by gpu.sh" if daemon
                          else "smoke run on a CPU: no MPS daemon; the phase ran to prove the script"}
        timeout = min(SECTIONS["concurrent"][1], left)
        results["sections"]["mps"] = {"status": "running", "timeout": round(timeout)}
        run.save()
        try:
            with tempfile.TemporaryDirectory() as tmp:
                data = synthetic_cifar(z["pool_images"], 512, size=z["image"])
                data_path = write_data(Path(tmp) / "data.npz", data)
                levels = "/".join(map(str, z["concurrent"]))
                log(f"batch 16 recipes under MPS: {levels} concurrent processes ...")
                concurrent(run, timeout, "concurrent_mps", z, data_path)
            state = "ok"
        except Exception as err:
            run.error("concurrent_mps", first_line(err))
            state = "error"
        except BaseException as err:
            run.current = "mps"
            run.interrupted(err)
            raise
        finally:
            results["mps_phase_seconds"] = time.time() - start
            run.save()
        results["sections"]["mps"] = {"status": state, "seconds": round(time.time() - start, 1),
                                      "timeout": round(timeout)}
    results["mps_phase_seconds"] = time.time() - start
    run.save()
    print(report(results, only="MPS"))
    print(f"\nJSON: {json_path}")
    return 1 if results["errors"].get("concurrent_mps") else 0


# ------------------------------------------------------------------------------ output
def summarize(r: dict) -> None:
    """The headline numbers at the top level of the JSON (every key present, None when not
    measured)."""
    big = r.get("b512") or {}
    recipes_out = r.get("recipes") or {}
    eager = {n: ((recipes_out.get(n) or {}).get("eager") or {}).get("images_per_second") for n in RECIPES}
    sgd = ((recipes_out.get("single_asam") or {}).get("sgd") or {}).get("images_per_second")
    cl = r.get("channels_last") or {}
    r224 = r.get("resnet18_224") or {}
    r.update({
        "b16_eager_images_per_second": eager,
        "b16_reduce_overhead": {n: {k: ((recipes_out.get(n) or {}).get("reduce_overhead") or {}).get(k)
                                    for k in COMPILED_KEYS if k not in ("losses_eager", "losses_compiled")}
                                for n in RECIPES},
        # step time of the recipe over SGD's (images/s of SGD over the recipe's), eager
        "b16_step_time_vs_sgd": {n: sgd / ips if sgd and ips else None for n, ips in eager.items()},
        "resnet18_224_b16_eager_images_per_second": {n: (r224.get(n) or {}).get("images_per_second")
                                                     for n in RECIPES},
        "b16_channels_last_images_per_second": {
            n: {s: (cl.get(f"{n} channels_last {s}") or {}).get("images_per_second") for s in ("on", "off")}
            for n in RECIPES},
        "b512_images_per_second": (big.get("trainer") or {}).get("images_per_second"),
        "b512_bare_images_per_second": (big.get("bare") or {}).get("images_per_second"),
        "b512_trainer_vs_bare_ratio": big.get("trainer_vs_bare_ratio"),
        "b512_data_wait_fraction": (big.get("trainer") or {}).get("data_wait_fraction"),
        "b512_goal_met": ((big.get("trainer") or {}).get("images_per_second") or 0) >= GOAL_B512,
        "b16_concurrent_images_per_second": (r.get("concurrent") or {}).get("images_per_second"),
        "b16_concurrent_mps_images_per_second": (r.get("concurrent_mps") or {}).get("images_per_second"),
    })


def report(r: dict, only: str | None = None) -> str:
    """The header (device, sections, MPS, skips, errors) and the table of measures (only
    the rows whose note contains `only`, when given)."""
    smoke = r.get("smoke")
    rows = []
    for name in RECIPES:
        rec = (r.get("recipes") or {}).get(name) or {}
        ro = (r.get("b16_reduce_overhead") or {}).get(name) or {}
        rows += [
            (f"{name} eager images/s", (r.get("b16_eager_images_per_second") or {}).get(name),
             rec.get("config", "")),
            (f"{name} step / sgd step", (r.get("b16_step_time_vs_sgd") or {}).get(name), "eager"),
            (f"{name} reduce-overhead images/s", ro.get("images_per_second"),
             "inductor on a CPU (no CUDA graphs)" if smoke else "CUDA graphs"),
            (f"{name} reduce-overhead / eager", ro.get("speedup_vs_eager"), ""),
            (f"{name} compile seconds", ro.get("compile_seconds"), "first step, both recipes compiling"),
            (f"{name} cudagraph_skips", ro.get("cudagraph_skips"),
             f"expected 0; cudagraph_or_error {ONOFF[ro.get('cudagraph_or_error')]}"),
            (f"{name} graphs / recompiles",
             f"{fmt_none(ro.get('graphs'))} / {fmt_none(ro.get('recompiles'))}",
             "expected {graphs} / {recompiles}".format(**EXPECTED[name])),
            (f"{name} num_batches_tracked_growth", ro.get("num_batches_tracked_growth"),
             f"must equal the measured steps ({fmt_none(ro.get('measured_steps'))})"),
            (f"{name} loss_diff_vs_eager", sci(ro.get("loss_diff_vs_eager")),
             f"max over the first {FIRST_STEPS} steps"),
            (f"{name} compiled checks", CHECKS[ro.get("checks_passed")], ""),
        ]
    for name in RECIPES:
        rows.append((f"{name} resnet18 224px eager images/s",
                     (r.get("resnet18_224_b16_eager_images_per_second") or {}).get(name),
                     ((r.get("resnet18_224") or {}).get("configs") or {}).get(name, "")))
    for name, values in (r.get("b16_channels_last_images_per_second") or {}).items():
        rows.append((f"{name} channels_last on / off images/s",
                     f"{fmt_none(values.get('on'))} / {fmt_none(values.get('off'))}", "eager"))
    big = r.get("b512") or {}
    rows += [
        ("b512 trainer images/s", r.get("b512_images_per_second"), big.get("config", "")),
        ("b512 bare loop images/s", r.get("b512_bare_images_per_second"), "same model, batch, SGD, bf16"),
        ("b512 trainer_vs_bare_ratio", r.get("b512_trainer_vs_bare_ratio"), "goal >= 0.95"),
        ("b512 goal", r.get("b512_images_per_second"), "not applicable (smoke run)" if smoke
         else f">= {GOAL_B512:,} images/s: {'met' if r.get('b512_goal_met') else 'MISSED'}"),
        ("b512 data_wait_fraction", r.get("b512_data_wait_fraction"), "goal <= 0.05"),
    ]
    mps = r.get("mps") or {}
    for key, label in (("b16_concurrent_images_per_second", "no MPS"),
                       ("b16_concurrent_mps_images_per_second",
                        "MPS" if mps.get("used") else "MPS phase without a daemon")):
        for name, levels in (r.get(key) or {}).items():
            for n, ips in levels.items():
                rows.append((f"{name} x{n} processes images/s", ips, f"aggregate, eager, {label}"))
    v = r.get("versions") or {}
    head = (f"{v.get('gpu') or 'no GPU (smoke run on a CPU)'}, torch {v.get('torch')}, CUDA {v.get('cuda')}, "
            f"{r.get('benchmark_seconds', 0):.0f} s in all")
    head += "\nsections: " + ", ".join(section_state(k, s) for k, s in (r.get("sections") or {}).items())
    head += f"\nMPS: {'used' if mps.get('used') else 'not used'} ({mps.get('note', '-')})"
    if r.get("skipped"):
        head += "\nskipped: " + "; ".join(r["skipped"])
    for key, err in (r.get("errors") or {}).items():
        head += f"\nERROR in {key}: {err[:300]}"
    if only is not None:
        rows = [row for row in rows if only in row[2]]
    return head + "\n\n" + table(rows, ("measure", "value", "note"))


CHECKS = {True: "passed", False: "FAILED", None: None}
ONOFF = {True: "on", False: "off (not in this torch)", None: "-"}


def section_state(name: str, s) -> str:
    if not isinstance(s, dict):
        return f"{name} {s}"
    return f"{name} {s['status']}" + (f" ({s['seconds']:.0f} s)" if s.get("seconds") else "")


def sci(value) -> str | None:
    return None if value is None else f"{value:.2e}"


def fmt_none(value) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if isinstance(value, float) else str(value)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "worker":
        WORKERS[sys.argv[2]](json.loads(sys.argv[3]))
    else:
        sys.exit(main())
