"""One GPU per training job (or a share of one) on a multi-GPU workstation.

Snakemake's `--resources gpu=N` limits how many GPU jobs run at once but assigns no device
to local jobs, so every job would pick GPU 0. Before CUDA is initialised, a training job
therefore claims a GPU with lock files and sets `CUDA_VISIBLE_DEVICES` to it. Each GPU has
8 slots, one lock file each (`<lock dir>/cifar-ensembles-gpu-<index>-slot<j>.lock`,
exclusive `fcntl.flock`); a job takes 8 / `jobs_per_gpu` slots of one GPU (all 8 by
default: the GPU is its own), on the fullest GPU that still has room, so jobs that share
pack together and leave whole GPUs free for jobs that do not. The locks are held for the
life of the process; the kernel drops them when the process ends, however it ends (SIGKILL
included), so there is nothing stale to clean up. When no GPU has room the job logs a line
and waits.

Nothing happens when a scheduler already chose the devices (`CUDA_VISIBLE_DEVICES` or
`SLURM_JOB_ID` set), when fewer than two GPUs are visible, or when the device is `cpu` or an
explicit `cuda:N`. `CIFAR_ENSEMBLES_GPU_LOCK_DIR` moves the lock files (default: the temp
folder); every workflow sharing the GPUs must use the same folder.

`claim_gpu` knows nothing of torch, so it is tested on CPU machines with fake GPU counts.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import random
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, MutableMapping
from pathlib import Path

from .errors import UserError

LOCK_DIR_ENV = "CIFAR_ENSEMBLES_GPU_LOCK_DIR"
LOCK_PREFIX = "cifar-ensembles-gpu-"
SLOTS = 8  # per GPU; a job takes SLOTS // jobs_per_gpu of them (the workflow's gpu_slots)
SCHEDULER_ENV = ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_ID")
POLL_SECONDS = 10.0
REMIND_SECONDS = 600.0

_held: dict[tuple[str, int], list[int]] = {}  # (lock dir, index) -> open fds holding its slots


def lock_dir(path: str | os.PathLike | None = None) -> Path:
    """The folder of the lock files: `path`, else $CIFAR_ENSEMBLES_GPU_LOCK_DIR, else the temp folder."""
    return Path(path or os.environ.get(LOCK_DIR_ENV) or tempfile.gettempdir())


def slot_path(index: int, slot: int, directory: str | os.PathLike | None = None) -> Path:
    return lock_dir(directory) / f"{LOCK_PREFIX}{index}-slot{slot}.lock"


def _open_lock(path: Path) -> int:
    """A read-only fd (flock needs no write access, so users can share the files); created if missing.

    Opening an existing file first avoids O_CREAT on another user's file in a sticky /tmp,
    which protected_regular refuses.
    """
    try:
        return os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return os.open(path, os.O_RDONLY | os.O_CREAT, 0o666)


def _try_lock(path: Path) -> int | None:
    """The fd holding an exclusive lock on `path`, or None when another process holds it."""
    try:
        fd = _open_lock(path)
    except OSError as err:
        raise UserError(f"{path}: cannot open the GPU lock file ({err.strerror}); set {LOCK_DIR_ENV} "
                        "to a folder every job can write to") from None
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


def _take(index: int, need: int, directory: Path) -> list[int] | None:
    """Locks on `need` free slots of GPU `index`, or None (and nothing held) when it has fewer."""
    fds = []
    for slot in range(SLOTS):
        fd = _try_lock(slot_path(index, slot, directory))
        if fd is not None:
            fds.append(fd)
            if len(fds) == need:
                return fds
    _close(fds)
    return None


def _free_slots(index: int, directory: Path) -> int:
    fds = [fd for slot in range(SLOTS) if (fd := _try_lock(slot_path(index, slot, directory))) is not None]
    _close(fds)
    return len(fds)


def claim_gpu(n_gpus: int, lock_dir_path: str | os.PathLike | None = None,
              log: Callable[[str], None] | None = None, poll_seconds: float = POLL_SECONDS,
              timeout: float | None = None, jobs_per_gpu: int = 1) -> int | None:
    """Claim one of `n_gpus` GPUs (or a 1/`jobs_per_gpu` share) for the rest of this process.

    Returns the GPU's index, or None when there is nothing to choose (`n_gpus` < 2). Takes
    the fullest GPU that still has room (lowest index on a tie); when none has, logs once
    (and every 10 minutes) and retries every `poll_seconds`. `timeout` (seconds, None:
    forever) raises TimeoutError; for tests.
    """
    if n_gpus < 2:
        return None
    if jobs_per_gpu not in (1, 2, 4, 8):
        raise UserError(f"jobs_per_gpu: {jobs_per_gpu!r} must be 1, 2, 4 or 8")
    need = SLOTS // jobs_per_gpu
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    directory = lock_dir(lock_dir_path)
    for index in range(n_gpus):
        if (str(directory), index) in _held:  # this process has its GPU already
            return index
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"{directory}: cannot create the GPU lock folder ({err.strerror}); "
                        f"set {LOCK_DIR_ENV}") from None
    share = "" if jobs_per_gpu == 1 else f", shared by up to {jobs_per_gpu} jobs"
    start = time.monotonic()
    reminded = None
    quick = 0  # first passes retried soon: a job starting beside us holds slots briefly while it looks
    while True:
        free = {i: _free_slots(i, directory) for i in range(n_gpus)}
        for index in sorted((i for i in free if free[i] >= need), key=lambda i: (free[i], i)):
            fds = _take(index, need, directory)
            if fds is not None:  # (None: another job took the room since we looked)
                _held[(str(directory), index)] = fds
                waited = f", after waiting {time.monotonic() - start:.0f}s" if reminded is not None else ""
                log(f"using GPU {index} of {n_gpus}{share} (locks {directory}/"
                    f"{LOCK_PREFIX}{index}-slot*.lock{waited})")
                return index
        if quick < 3:
            quick += 1
            time.sleep(random.uniform(0.02, 0.2))
            continue
        now = time.monotonic()
        if timeout is not None and now - start >= timeout:
            raise TimeoutError(f"no GPU of {n_gpus} had room for {timeout}s")
        if reminded is None or now - reminded >= REMIND_SECONDS:
            log(f"all {n_gpus} GPUs are claimed by other cifar-ensembles jobs (lock files "
                f"{directory}/{LOCK_PREFIX}*.lock); waiting for room")
            reminded = now
        time.sleep(poll_seconds)


def release_gpu(index: int, lock_dir_path: str | os.PathLike | None = None) -> None:
    """Give a claimed GPU back before the process ends (the process's exit does it otherwise)."""
    _close(_held.pop((str(lock_dir(lock_dir_path)), index), []))


@contextlib.contextmanager
def claimed_gpu(n_gpus: int, lock_dir_path: str | os.PathLike | None = None,
                log: Callable[[str], None] | None = None, **kwargs) -> Iterator[int | None]:
    """`claim_gpu` for a block: the GPU is released when the block ends."""
    index = claim_gpu(n_gpus, lock_dir_path, log, **kwargs)
    try:
        yield index
    finally:
        if index is not None:
            release_gpu(index, lock_dir_path)


def gpu_count() -> int:
    """GPUs this process can see, counted without initialising CUDA here.

    Asks NVML the way torch.cuda.device_count() does first; that call falls back to
    cudaGetDeviceCount when NVML is missing, which initialises CUDA in this process and
    would make a later CUDA_VISIBLE_DEVICES useless, so the fallback here counts
    /dev/nvidia<N> device nodes instead.
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


def claim_gpu_for_job(device: str, log: Callable[[str], None] | None = None, jobs_per_gpu: int = 1,
                      env: MutableMapping[str, str] | None = None,
                      count: Callable[[], int] | None = None,
                      lock_dir_path: str | os.PathLike | None = None, **kwargs) -> int | None:
    """Claim a GPU and set CUDA_VISIBLE_DEVICES when this job should choose one itself.

    Call before anything initialises CUDA. Returns the claimed index, or None when the
    device is left alone: `device` is cpu or an explicit cuda:N, a scheduler set
    CUDA_VISIBLE_DEVICES or SLURM_JOB_ID, or fewer than two GPUs are visible. `count`
    (default: `gpu_count`) and `env` (default: os.environ) are there for tests.
    """
    env = os.environ if env is None else env
    if device not in ("auto", "cuda"):
        return None
    if any(name in env for name in SCHEDULER_ENV):
        return None
    n = (count or gpu_count)()
    if n < 2:
        return None
    index = claim_gpu(n, lock_dir_path or env.get(LOCK_DIR_ENV), log, jobs_per_gpu=jobs_per_gpu, **kwargs)
    if index is not None:
        env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")  # index = nvidia-smi's, in every job
        env["CUDA_VISIBLE_DEVICES"] = str(index)
    return index
