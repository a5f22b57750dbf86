"""One GPU per job (or a share of one) among the GPUs a job can see.

Snakemake's `--resources gpu=N` limits how many GPU jobs run at once but assigns no device
to local jobs, so every job would pick the first visible GPU. Before CUDA is initialised,
a job therefore claims one of the visible GPUs with lock files and narrows
`CUDA_VISIBLE_DEVICES` to it. The visible GPUs are whatever set them: the entries of
`CUDA_VISIBLE_DEVICES` when it is set (by a user, or by SLURM inside a multi-GPU
allocation), else every GPU of the machine.

Each GPU has 8 slots, one lock file each (`<lock dir>/cifar-ensembles-gpu-<id>-slot<j>.lock`,
exclusive `fcntl.flock`, `<id>` the GPU's entry in CUDA_VISIBLE_DEVICES or its index, under
a SLURM job prefixed by the job's id, whose device numbering is its own). A training job
takes 8 / `runtime.jobs_per_gpu` slots, a prediction one. Jobs spread before they pack: a
job takes the GPU with the most free slots (the lowest index on a tie), so 11 seeds at 4
per GPU on 4 GPUs run 3/3/3/2, not 4/4/3/0. The locks are held for the life of the process;
the kernel drops them when it ends, however it ends (SIGKILL included), so there is nothing
stale to clean up. When no GPU has room the job logs a line and waits.

Nothing happens when fewer than two GPUs are visible or when the device is `cpu` or an
explicit `cuda:N`. `CIFAR_ENSEMBLES_GPU_LOCK_DIR` moves the lock files (default: the temp
folder); every workflow sharing the GPUs must use the same folder.

This module knows nothing of torch, so it is tested on CPU machines with fake GPU counts.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, MutableMapping, Sequence
from pathlib import Path

from ..errors import UserError

LOCK_DIR_ENV = "CIFAR_ENSEMBLES_GPU_LOCK_DIR"
LOCK_PREFIX = "cifar-ensembles-gpu-"
SLOTS = 8  # per GPU; a job takes SLOTS // jobs_per_gpu of them (the workflow's gpu_slots)
POLL_SECONDS = 10.0
REMIND_SECONDS = 600.0

_held: dict[tuple[str, str], list[int]] = {}  # (lock dir, GPU key) -> open fds holding its slots


def lock_dir(path: str | os.PathLike | None = None) -> Path:
    """The folder of the lock files: `path`, else $CIFAR_ENSEMBLES_GPU_LOCK_DIR, else the temp folder."""
    return Path(path or os.environ.get(LOCK_DIR_ENV) or tempfile.gettempdir())


def gpu_key(gpu_id: str, env: MutableMapping[str, str] | None = None) -> str:
    """The lock-file name part of a visible GPU: its id, made file-name safe; prefixed by the
    SLURM job's id when SLURM set CUDA_VISIBLE_DEVICES (jobs of other allocations number their
    GPUs from 0 too), not when the job counted the machine's GPUs itself."""
    env = os.environ if env is None else env
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", str(gpu_id))
    job = env.get("SLURM_JOB_ID") if "CUDA_VISIBLE_DEVICES" in env else None
    return f"slurm{job}-{safe}" if job else safe


def slot_path(key: str | int, slot: int, directory: str | os.PathLike | None = None) -> Path:
    return lock_dir(directory) / f"{LOCK_PREFIX}{key}-slot{slot}.lock"


def _open_lock(path: Path) -> int:
    """A read-only fd (flock needs no write access, so users can share the files); created if missing.

    Opening an existing file first avoids O_CREAT on another user's file in a sticky /tmp,
    which protected_regular refuses.
    """
    try:
        try:
            return os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return os.open(path, os.O_RDONLY | os.O_CREAT, 0o666)
    except OSError as err:
        raise UserError(f"{path}: cannot open the GPU lock file ({err.strerror}); set {LOCK_DIR_ENV} "
                        "to a folder every job can write to") from None


def _try_lock(path: Path) -> int | None:
    """The fd holding an exclusive lock on `path`, or None when another process holds it."""
    fd = _open_lock(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(fd)
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return None
        raise UserError(f"{path}: cannot lock the GPU lock file ({err.strerror})") from None
    return fd


def _close(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)  # closing the only fd of an open file releases its flock


def _take(key: str, need: int, directory: Path) -> list[int] | None:
    """Locks on `need` free slots of GPU `key`, or None (and nothing held) when it has fewer."""
    fds = []
    for slot in range(SLOTS):
        fd = _try_lock(slot_path(key, slot, directory))
        if fd is not None:
            fds.append(fd)
            if len(fds) == need:
                return fds
    _close(fds)
    return None


def _free_slots(key: str, directory: Path) -> int:
    fds = [fd for slot in range(SLOTS) if (fd := _try_lock(slot_path(key, slot, directory))) is not None]
    _close(fds)
    return len(fds)


@contextlib.contextmanager
def _one_claimant(directory: Path) -> Iterator[None]:
    """One job at a time counts and takes slots: jobs started together would otherwise all
    count the same free slots and pile onto the same GPU."""
    fd = _open_lock(directory / f"{LOCK_PREFIX}claim.lock")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # held for milliseconds
        yield
    finally:
        os.close(fd)


def _keys(gpus: int | Sequence[str]) -> list[str]:
    return [str(i) for i in range(gpus)] if isinstance(gpus, int) else [str(g) for g in gpus]


def claim_gpu(gpus: int | Sequence[str], lock_dir_path: str | os.PathLike | None = None,
              log: Callable[[str], None] | None = None, poll_seconds: float = POLL_SECONDS,
              timeout: float | None = None, *, jobs_per_gpu: int) -> int | None:
    """Claim one of `gpus` (a count, or the lock keys of the visible GPUs) for the rest of
    this process, or a 1/`jobs_per_gpu` share of one.

    Returns the GPU's position among `gpus`, or None when there is nothing to choose (fewer
    than two). Takes the GPU with the most free slots (the lowest position on a tie); when
    none has room, logs once (and every 10 minutes) and retries every `poll_seconds`.
    `timeout` (seconds, None: forever) raises TimeoutError; for tests.
    """
    keys = _keys(gpus)
    if len(keys) < 2:
        return None
    if jobs_per_gpu not in (1, 2, 4, 8):
        raise UserError(f"runtime.jobs_per_gpu: {jobs_per_gpu!r} must be 1, 2, 4 or 8")
    need = SLOTS // jobs_per_gpu
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    directory = lock_dir(lock_dir_path)
    for index, key in enumerate(keys):
        if (str(directory), key) in _held:  # this process has its GPU already
            return index
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"{directory}: cannot create the GPU lock folder ({err.strerror}); "
                        f"set {LOCK_DIR_ENV}") from None
    share = "" if need == SLOTS else f", {need} of its {SLOTS} slots"
    start = time.monotonic()
    reminded = None
    while True:
        with _one_claimant(directory):
            free = [_free_slots(key, directory) for key in keys]
            roomy = sorted((i for i in range(len(keys)) if free[i] >= need), key=lambda i: (-free[i], i))
            fds = _take(keys[roomy[0]], need, directory) if roomy else None
        if fds is not None:
            index = roomy[0]
            _held[(str(directory), keys[index])] = fds
            waited = f", after waiting {time.monotonic() - start:.0f}s" if reminded is not None else ""
            log(f"using GPU {index} of {len(keys)} visible{share} (locks {directory}/"
                f"{LOCK_PREFIX}{keys[index]}-slot*.lock{waited})")
            return index
        now = time.monotonic()
        if timeout is not None and now - start >= timeout:
            raise TimeoutError(f"no GPU of {len(keys)} had room for {timeout}s")
        if reminded is None or now - reminded >= REMIND_SECONDS:
            log(f"all {len(keys)} visible GPUs are claimed by other cifar-ensembles jobs (lock files "
                f"{directory}/{LOCK_PREFIX}*.lock); waiting for room")
            reminded = now
        time.sleep(poll_seconds)


def release_gpu(gpus: int | Sequence[str], index: int,
                lock_dir_path: str | os.PathLike | None = None) -> None:
    """Give a claimed GPU back before the process ends (the process's exit does it otherwise)."""
    _close(_held.pop((str(lock_dir(lock_dir_path)), _keys(gpus)[index]), []))


@contextlib.contextmanager
def claimed_gpu(gpus: int | Sequence[str], lock_dir_path: str | os.PathLike | None = None,
                log: Callable[[str], None] | None = None, **kwargs) -> Iterator[int | None]:
    """`claim_gpu` for a block: the GPU is released when the block ends."""
    index = claim_gpu(gpus, lock_dir_path, log, **kwargs)
    try:
        yield index
    finally:
        if index is not None:
            release_gpu(gpus, index, lock_dir_path)


def gpu_count() -> int:
    """GPUs of the machine, counted without initialising CUDA here.

    Asks NVML the way torch.cuda.device_count() does first; that call falls back to
    cudaGetDeviceCount when NVML is missing, which initialises CUDA in this process and
    would make a later CUDA_VISIBLE_DEVICES useless, so the fallback here counts
    /dev/nvidia<N> device nodes instead. Call it only when CUDA_VISIBLE_DEVICES is unset.
    """
    try:
        import torch
    except ImportError:
        return 0
    if not torch.backends.cuda.is_built():
        return 0
    count_nvml = getattr(torch.cuda, "_device_count_nvml", None)
    if count_nvml is not None and not torch.version.hip:
        try:
            n = int(count_nvml())
        except Exception:
            n = -1
        if n >= 0:
            return n
    try:
        return sum(1 for name in os.listdir("/dev") if re.fullmatch(r"nvidia\d+", name))
    except OSError:
        return 0


def visible_gpus(env: MutableMapping[str, str], count: Callable[[], int]) -> list[str]:
    """The ids of the GPUs this job can see: CUDA_VISIBLE_DEVICES's entries (up to the first
    empty or negative one, as CUDA reads it) when set, else every GPU's index."""
    value = env.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return [str(i) for i in range(count())]
    ids = []
    for entry in value.split(","):
        entry = entry.strip()
        if not entry or entry.startswith("-"):
            break
        ids.append(entry)
    return ids


def claim_gpu_for_job(device: str, log: Callable[[str], None] | None, jobs_per_gpu: int,
                      env: MutableMapping[str, str] | None = None,
                      count: Callable[[], int] | None = None,
                      lock_dir_path: str | os.PathLike | None = None, **kwargs) -> int | None:
    """Claim a visible GPU and narrow CUDA_VISIBLE_DEVICES to it when this job should choose.

    Call before anything initialises CUDA. Returns the claimed GPU's position among the
    visible ones, or None when the device is left alone: `device` is cpu or an explicit
    cuda:N, or fewer than two GPUs are visible. `count` (default: `gpu_count`) and `env`
    (default: os.environ) are there for tests.
    """
    env = os.environ if env is None else env
    if device not in ("auto", "cuda"):
        return None
    enumerated = "CUDA_VISIBLE_DEVICES" not in env
    ids = visible_gpus(env, count or gpu_count)
    if len(ids) < 2:
        return None
    keys = [gpu_key(i, env) for i in ids]
    index = claim_gpu(keys, lock_dir_path or env.get(LOCK_DIR_ENV), log, jobs_per_gpu=jobs_per_gpu, **kwargs)
    if index is not None:
        if enumerated:
            env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")  # index = nvidia-smi's, in every job
        env["CUDA_VISIBLE_DEVICES"] = ids[index]
    return index
