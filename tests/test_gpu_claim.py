"""GPU claims on multi-GPU workstations, tested on CPUs with fake GPU counts.

Several processes claim distinct GPUs through lock files; a process that ends, even by
SIGKILL, gives its GPU back; a claimant waits (and says so) while all are taken; jobs that
share GPUs (jobs_per_gpu) pack onto the fullest GPU with room; the policy
leaves schedulers, `cpu`, explicit `cuda:N` and one-GPU machines alone; `cifar-ensembles
train` sets CUDA_VISIBLE_DEVICES before training starts.
"""

from __future__ import annotations

import fcntl
import multiprocessing as mp
import os
import queue
import time

import pytest
from conftest import make_data, tiny_runtime, tiny_spec

from cifar_ensembles import gpu_claim, splits
from cifar_ensembles.errors import UserError
from cifar_ensembles.typed import to_json

CTX = mp.get_context("spawn")  # a clean child: no locks or threads inherited from this process
WAIT = 30.0  # seconds a test waits for a child before failing


def _holder(n_gpus: int, lock_dir: str, events, release, jobs_per_gpu: int = 1) -> None:
    """Child: claim a GPU, report it, hold it until `release` (its own pipe) speaks or closes.

    One pipe per child, not a shared Event: a SIGKILLed waiter would leave a shared
    primitive's bookkeeping behind and deadlock the others.
    """
    pid = os.getpid()
    index = gpu_claim.claim_gpu(n_gpus, lock_dir, log=lambda msg: events.put((pid, "log", msg)),
                                poll_seconds=0.05, jobs_per_gpu=jobs_per_gpu)
    events.put((pid, "claimed", index))
    release.poll(60)


def _next(events, kind: str, timeout: float = WAIT):
    """The next event of `kind` (pid, value); other events are skipped."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no {kind!r} event within {timeout}s")
        try:
            pid, what, value = events.get(timeout=left)
        except queue.Empty:
            continue
        if what == kind:
            return pid, value


def held_slots(lock_dir, index: int) -> int:
    """Slots of GPU `index` locked by any open file (flock conflicts even within one process)."""
    held = 0
    for slot in range(gpu_claim.SLOTS):
        try:
            fd = os.open(gpu_claim.slot_path(index, slot, lock_dir), os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            held += 1
        finally:
            os.close(fd)
    return held


def held_by_someone(lock_dir, index: int) -> bool:
    return held_slots(lock_dir, index) > 0


@pytest.fixture
def hold(lock_dir):
    """hold(index, n): lock n slots of GPU `index` the way another job would; freed after the test."""
    fds = []

    def take(index: int, n: int) -> None:
        lock_dir.mkdir(exist_ok=True)
        taken = 0
        for slot in range(gpu_claim.SLOTS):
            if taken == n:
                break
            fd = os.open(gpu_claim.slot_path(index, slot, lock_dir), os.O_RDONLY | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                continue
            fds.append(fd)
            taken += 1
        assert taken == n

    yield take
    for fd in fds:
        os.close(fd)


@pytest.fixture
def lock_dir(tmp_path):
    yield tmp_path / "locks"
    for key in [k for k in gpu_claim._held if k[0] == str(tmp_path / "locks")]:
        gpu_claim.release_gpu(key[1], key[0])


@pytest.mark.parametrize("n_gpus", [0, 1])
def test_nothing_to_choose_with_fewer_than_two_gpus(lock_dir, n_gpus):
    assert gpu_claim.claim_gpu(n_gpus, lock_dir) is None
    assert not lock_dir.exists()


def test_processes_claim_distinct_gpus_and_a_killed_holder_releases(lock_dir):
    events = CTX.Queue()
    pipes = [CTX.Pipe() for _ in range(4)]
    holders = [CTX.Process(target=_holder, args=(3, str(lock_dir), events, child))
               for _, child in pipes[:3]]
    waiter = CTX.Process(target=_holder, args=(3, str(lock_dir), events, pipes[3][1]))
    try:
        for p in holders:
            p.start()
        claims = dict(_next(events, "claimed") for _ in holders)
        assert sorted(claims.values()) == [0, 1, 2]
        assert all(held_by_someone(lock_dir, i) for i in range(3))

        waiter.start()  # all three taken: it logs that it waits, and claims nothing yet
        pid, message = _next(events, "log")
        assert pid == waiter.pid and "all 3 GPUs are claimed" in message and "waiting" in message
        time.sleep(0.5)
        assert events.empty(), "the waiter claimed a GPU that was held"

        victim = next(p for p in holders if claims[p.pid] == 1)
        victim.kill()  # SIGKILL: no cleanup code runs; the kernel drops the flock
        victim.join(WAIT)
        pid, index = _next(events, "claimed")
        assert (pid, index) == (waiter.pid, 1)
    finally:
        for parent, _ in pipes:
            parent.send("release")
        for p in [*holders, waiter]:
            if p.pid is not None:
                p.join(WAIT)
                if p.is_alive():
                    p.kill()
    # every holder has exited: every GPU is free again
    assert not any(held_by_someone(lock_dir, i) for i in range(3))


def test_claim_is_held_for_the_process_and_released_on_request(lock_dir):
    messages = []
    assert gpu_claim.claim_gpu(2, lock_dir, log=messages.append) == 0
    assert "using GPU 0 of 2" in messages[0]
    assert held_by_someone(lock_dir, 0) and not held_by_someone(lock_dir, 1)
    again = gpu_claim.claim_gpu(2, lock_dir, log=messages.append)
    assert again == 0, "a second call keeps this process's GPU"
    gpu_claim.release_gpu(0, lock_dir)
    assert not held_by_someone(lock_dir, 0)


def test_context_manager_releases_at_the_end_of_the_block(lock_dir):
    with gpu_claim.claimed_gpu(2, lock_dir, log=lambda m: None) as index:
        assert index == 0 and held_by_someone(lock_dir, 0)
    assert not held_by_someone(lock_dir, 0)


def test_skips_gpus_held_elsewhere_and_waits_when_all_are(lock_dir, hold):
    hold(0, gpu_claim.SLOTS)  # other jobs hold GPU 0 and part of GPU 1
    hold(1, 1)
    assert gpu_claim.claim_gpu(3, lock_dir, log=lambda m: None) == 2
    gpu_claim.release_gpu(2, lock_dir)

    messages = []
    with pytest.raises(TimeoutError):
        gpu_claim.claim_gpu(2, lock_dir, log=messages.append, poll_seconds=0.02, timeout=1.0)
    assert len(messages) == 1 and "all 2 GPUs are claimed" in messages[0], messages


@pytest.mark.parametrize("held, jobs_per_gpu, expected", [
    ({0: 4}, 2, 0),        # a half-used GPU takes another half-GPU job: GPU 1 stays whole
    ({0: 4}, 1, 1),        # a whole-GPU job needs a GPU nobody uses
    ({0: 6, 1: 4}, 2, 1),  # GPU 0 has 2 slots left, too few for half a GPU
    ({0: 7, 1: 2}, 8, 0),  # an eighth fits in GPU 0's last slot
    ({}, 4, 0),
], ids=["pack", "exclusive", "room", "last-slot", "idle"])
def test_shared_jobs_pack_onto_the_fullest_gpu_with_room(lock_dir, hold, held, jobs_per_gpu, expected):
    for index, n in held.items():
        hold(index, n)
    assert gpu_claim.claim_gpu(2, lock_dir, log=lambda m: None, jobs_per_gpu=jobs_per_gpu) == expected
    assert held_slots(lock_dir, expected) == held.get(expected, 0) + gpu_claim.SLOTS // jobs_per_gpu


def test_processes_share_gpus_as_declared(lock_dir):
    events = CTX.Queue()
    pipes = [CTX.Pipe() for _ in range(4)]
    procs = [CTX.Process(target=_holder, args=(2, str(lock_dir), events, child, 2)) for _, child in pipes]
    try:
        for p in procs:
            p.start()
        claims = [_next(events, "claimed")[1] for _ in procs]
        assert sorted(claims) == [0, 0, 1, 1]
        assert held_slots(lock_dir, 0) == held_slots(lock_dir, 1) == gpu_claim.SLOTS
    finally:
        for parent, _ in pipes:
            parent.send("release")
        for p in procs:
            p.join(WAIT)
            if p.is_alive():
                p.kill()


def test_jobs_per_gpu_must_divide_the_slots(lock_dir):
    with pytest.raises(UserError, match="jobs_per_gpu: 3"):
        gpu_claim.claim_gpu(2, lock_dir, log=lambda m: None, jobs_per_gpu=3)


def test_unusable_lock_folder_is_one_line(tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    with pytest.raises(UserError, match="GPU lock folder.*CIFAR_ENSEMBLES_GPU_LOCK_DIR"):
        gpu_claim.claim_gpu(2, not_a_dir / "locks", log=lambda m: None)


def test_lock_dir_defaults_to_env_then_temp(monkeypatch, tmp_path):
    monkeypatch.setenv(gpu_claim.LOCK_DIR_ENV, str(tmp_path))
    assert gpu_claim.slot_path(3, 7) == tmp_path / "cifar-ensembles-gpu-3-slot7.lock"
    monkeypatch.delenv(gpu_claim.LOCK_DIR_ENV)
    assert gpu_claim.lock_dir().is_dir()


# -------------------------------------------------------------------------- policy
def test_job_claims_and_sets_cuda_visible_devices(lock_dir):
    env = {gpu_claim.LOCK_DIR_ENV: str(lock_dir)}
    assert gpu_claim.claim_gpu_for_job("auto", lambda m: None, env=env, count=lambda: 4) == 0
    assert env["CUDA_VISIBLE_DEVICES"] == "0" and env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert held_slots(lock_dir, 0) == gpu_claim.SLOTS

    other = {gpu_claim.LOCK_DIR_ENV: str(lock_dir), "CUDA_DEVICE_ORDER": "FASTEST_FIRST"}
    gpu_claim.release_gpu(0, lock_dir)
    assert gpu_claim.claim_gpu_for_job("cuda", lambda m: None, env=other, count=lambda: 4) == 0
    assert other["CUDA_VISIBLE_DEVICES"] == "0" and other["CUDA_DEVICE_ORDER"] == "FASTEST_FIRST"


@pytest.mark.parametrize("device, env, count", [
    ("cpu", {}, 4),
    ("cuda:1", {}, 4),
    ("auto", {"CUDA_VISIBLE_DEVICES": "2"}, 4),
    ("auto", {"CUDA_VISIBLE_DEVICES": ""}, 4),
    ("auto", {"SLURM_JOB_ID": "123"}, 4),
    ("auto", {}, 1),
    ("cuda", {}, 0),
], ids=["cpu", "explicit-index", "scheduler-set", "hidden", "slurm", "one-gpu", "no-gpu"])
def test_job_leaves_the_device_alone(lock_dir, device, env, count):
    before = dict(env)
    counted = []
    claimed = gpu_claim.claim_gpu_for_job(device, lambda m: None, env=env,
                                          count=lambda: counted.append(1) or count, lock_dir_path=lock_dir)
    assert claimed is None
    assert env == before
    assert not lock_dir.exists()
    if device in ("cpu", "cuda:1") or env:
        assert not counted, "counted GPUs when no claim could follow"


def test_gpu_count_needs_no_cuda():
    assert gpu_claim.gpu_count() >= 0


# ------------------------------------------------------------------------------ CLI
@pytest.fixture
def clean_env(monkeypatch, lock_dir):
    for name in ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_ID", "CUDA_DEVICE_ORDER"):
        monkeypatch.setenv(name, "x")  # recorded, so that the undo removes what the CLI sets
        monkeypatch.delenv(name)
    monkeypatch.setenv(gpu_claim.LOCK_DIR_ENV, str(lock_dir))
    return lock_dir


@pytest.fixture
def data_npz(tmp_path):
    path = tmp_path / "data.npz"
    splits.write(path, make_data(n_train=32, size=8, n_val=4, n_test=4, classes=2))
    return path


@pytest.mark.parametrize("device, claims", [("auto", True), ("cuda", True), ("cpu", False)])
def test_train_command_claims_before_training(monkeypatch, clean_env, data_npz, tmp_path, device, claims):
    from cifar_ensembles.cli import main
    from cifar_ensembles.stages import train

    monkeypatch.setattr(gpu_claim, "gpu_count", lambda: 2)
    seen = {}

    def fake_train(spec, runtime, data, seed, out_dir, *args):
        seen["visible"] = os.environ.get("CUDA_VISIBLE_DEVICES")
        seen["held"] = held_slots(clean_env, 0)

    monkeypatch.setattr(train, "train_to_files", fake_train)
    spec, runtime = to_json(tiny_spec(epochs=1)), to_json(tiny_runtime(device=device, jobs_per_gpu=4))
    assert main(["train", "--data", str(data_npz), "--spec", spec, "--runtime", runtime, "--seed", "0",
                 "--out-dir", str(tmp_path / "run"), "--threads", "1", "--name", "exp/seed0"]) == 0
    if claims:
        assert seen == {"visible": "0", "held": gpu_claim.SLOTS // 4}  # jobs_per_gpu reaches the claim
    else:
        assert seen == {"visible": None, "held": 0}
