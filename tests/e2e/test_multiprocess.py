"""The training loop on two processes (jax.distributed, 2 CPU devices each, one 4-device mesh)
equals one process with 4 devices, its checkpoints restore across process counts, and a SIGTERM
to one process stops both at the same checkpoint, from which the run resumes exactly.

Tolerance: both runs execute the same XLA programs on the same global arrays; only the
cross-process collectives differ (gloo instead of in-process), which may sum in another order.
Float32 rounding of that order is ~1e-7 relative per reduction and a few steps of AdamW amplify it
little, so rtol=1e-4 / atol=1e-5 holds with margin, while a wrong batch, shard or seed (a
different sample, reward or update) moves every metric by far more. Discrete metrics (rewards,
accuracy, lengths) come out exactly equal unless a rounding flips a sampled token.
"""
import os
import shutil
import signal
import socket
import subprocess
import time

import numpy as np
import pytest
from conftest import xla_flags

# mesh (2, 2, 1): the `data` axis spans the two processes and `fsdp` each one's devices, as on a pod
# slice (qwen1_5b.py:pod).
MESH = "--config.mesh.shape=(2,2,1)"
RTOL, ATOL = 1e-4, 1e-5
STEPS = 4  # of the reference run; the SIGTERM lands after step 2


def _command(tiny_run, workdir, steps, *extra):
    # Every workdir starts from the session's cached tokenizer and SFT warm start (the
    # comparison is of the RL loop).
    return tiny_run.command(workdir, steps, MESH, *extra)


def _env(devices):
    # The session's compilation cache (conftest): the resumed runs compile (almost) nothing.
    # (JAX_SHARE_BINARY_BETWEEN_HOSTS=1 would halve the two processes' compiling, but hangs on CPU.)
    return dict(os.environ, XLA_FLAGS=xla_flags(devices), JAX_PLATFORMS="cpu")


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _one_process(tiny_run, workdir, steps, *extra, timeout=400):
    done = subprocess.run(_command(tiny_run, workdir, steps, *extra), cwd=tiny_run.root, env=_env(4), capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr


def _start_two(tiny_run, workdir, steps, *extra):
    """Both processes of a 2-host run (2 CPU devices each), started; stderr piped."""
    port = _free_port()
    return [subprocess.Popen(
        _command(tiny_run, workdir, steps, "--config.distributed=True",
                 f"--config.distributed_coordinator=localhost:{port}",
                 "--config.distributed_num_processes=2", f"--config.distributed_process_id={i}", *extra),
        cwd=tiny_run.root, env=_env(2), stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True)
        for i in range(2)]


def _finish(procs, timeout) -> list[str]:
    """Waits for both processes (killing any still alive on the way out), asserts both exited 0;
    returns their stderr."""
    errs = []
    try:
        errs = [p.communicate(timeout=timeout)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, err in zip(procs, errs):
        assert p.returncode == 0, err[-3000:]
    return errs


def _two_processes(tiny_run, workdir, steps, *extra, timeout=400):
    errs = _finish(_start_two(tiny_run, workdir, steps, *extra), timeout)
    assert "process 1 of 2, 2 local of 4 devices" in errs[1]
    return errs[0]


def _assert_close(got, want, steps):
    """`got` and `want` (step -> metrics) both have each of `steps`, with equal metrics there."""
    for step in steps:
        assert step in got and step in want, (step, sorted(got), sorted(want))
        assert got[step].keys() == want[step].keys()
        for key, value in want[step].items():
            np.testing.assert_allclose(got[step][key], value, rtol=RTOL, atol=ATOL,
                                       err_msg=f"{key} at step {step}")


def _max_diff(a, b):
    return max(abs(a[s][k] - b[s][k]) for s in a.keys() & b.keys() for k in a[s])


@pytest.fixture(scope="module")
def one(tiny_run, tmp_path_factory):
    """The workdir of an uninterrupted 1-process (4-device) run of STEPS steps, every checkpoint
    kept: the reference the 2-process runs are compared with."""
    workdir = tmp_path_factory.mktemp("one")
    t0 = time.time()
    _one_process(tiny_run, workdir, STEPS, f"--config.train.keep_checkpoints={STEPS}")
    print(f"1 process, {STEPS} steps: {time.time() - t0:.0f}s")
    return workdir


@pytest.fixture(scope="module")
def stopped(tiny_run, tmp_path_factory):
    """A 2-process run of STEPS steps whose process 1 alone got SIGTERM after step 2 (a maintenance
    notice on one host of a pod). Returns (workdir, [the step of each checkpoint], both stderrs)."""
    workdir = tiny_run.warm(tmp_path_factory.mktemp("stopped"))
    procs = _start_two(tiny_run, workdir, STEPS, "--config.train.checkpoint_every=100")
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 400
    while time.time() < deadline and procs[1].poll() is None:
        if metrics.exists() and any('"step": 2,' in line and "loss" in line
                                    for line in metrics.read_text().splitlines()):
            break
        time.sleep(0.1)
    t0 = time.time()
    if procs[1].poll() is None:
        procs[1].send_signal(signal.SIGTERM)
    else:
        _finish(procs, 1)  # kills the other process
        raise AssertionError("the run ended before it could be signalled")
    errs = _finish(procs, 180)
    print(f"both processes exited {time.time() - t0:.0f}s after the SIGTERM")
    saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    return workdir, saved, errs


@pytest.mark.slow
def test_sigterm_to_one_host_stops_both_at_the_same_checkpoint_and_two_processes_equal_one(tiny_run, stopped, one):
    """Both processes checkpoint the same step and exit 0 within a bounded time, and the steps
    they ran equal one process's."""
    workdir, saved, errs = stopped
    assert len(saved) == 1 and 2 <= saved[0] < STEPS, saved  # checkpoint_every=100: only the stop's
    for err in errs:  # both decided to stop at that step
        assert f"checkpoints step {saved[0]} and stops" in err or "checkpointing and stopping" in err, err[-2000:]
    assert "process 1 of 2, 2 local of 4 devices" in errs[1]
    two, reference = tiny_run.metrics(workdir), tiny_run.metrics(one)
    assert sorted(two) == list(range(1, saved[0] + 1))
    print(f"1 vs 2 processes, steps 1-{saved[0]}: max |difference| {_max_diff(two, reference):.3g}")
    _assert_close(two, reference, two)
    assert all(two[s]["loss"] != 0 and two[s]["grad_norm"] > 0 for s in two)  # real updates happened


@pytest.mark.slow
def test_checkpoints_cross_process_counts_and_the_stopped_run_resumes_exactly(tiny_run, stopped, one, tmp_path):
    """The stopped 2-process run's checkpoint, resumed by one process, and the 1-process run's
    step-2 checkpoint, resumed (resharded) by two processes, continue as the uninterrupted run."""
    workdir, saved, _ = stopped
    two_to_one = tmp_path / "two_to_one"
    shutil.copytree(workdir, two_to_one)
    one_to_two = tiny_run.warm(tmp_path / "one_to_two")
    shutil.copytree(one / "checkpoints" / "2", one_to_two / "checkpoints" / "2")
    t0 = time.time()
    assert f"resumed from step {saved[0]}" in _one_process(tiny_run, two_to_one, STEPS)
    assert "resumed from step 2" in _two_processes(tiny_run, one_to_two, 3)
    print(f"resumed runs: {time.time() - t0:.0f}s")
    reference = tiny_run.metrics(one)
    resumed = tiny_run.metrics(two_to_one)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    _assert_close(resumed, reference, range(saved[0] + 1, STEPS + 1))
    _assert_close(tiny_run.metrics(one_to_two), reference, [3])


@pytest.mark.slow
def test_ctrl_c_on_one_host_stops_both_and_a_third_run_is_refused(tiny_run, tmp_path):
    """Ctrl-C reaching one process of two goes through the same collective stop as SIGTERM (both
    checkpoint the same step and exit 0), and while they run the workdir's lock (taken by process
    0) refuses another run in one sentence."""
    workdir = tiny_run.warm(tmp_path)
    procs = _start_two(tiny_run, workdir, 50, "--config.train.checkpoint_every=100")
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 400
    while time.time() < deadline and procs[1].poll() is None:
        if metrics.exists() and any('"step": 2,' in line and "loss" in line
                                    for line in metrics.read_text().splitlines()):
            break
        time.sleep(0.1)
    try:
        third = subprocess.run(_command(tiny_run, workdir, 50), cwd=tiny_run.root, env=_env(4), capture_output=True,
                               text=True, timeout=120)
        assert third.returncode == 2 and "Traceback" not in third.stderr, third.stderr[-3000:]
        assert f"is in use by pid {procs[0].pid} on host" in third.stderr.strip().splitlines()[-1]
        assert procs[1].poll() is None, "the run ended before it could be signalled"
        procs[1].send_signal(signal.SIGINT)
    except BaseException:
        _finish(procs, 1)
        raise
    errs = _finish(procs, 180)
    saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert len(saved) == 1 and 2 <= saved[0] < 50, saved
    assert "Ctrl-C" in errs[1]
    for err in errs:
        assert f"checkpoints step {saved[0]} and stops" in err, err[-2000:]
    assert sorted(tiny_run.metrics(workdir)) == list(range(1, saved[0] + 1))
    assert not (workdir / "lock.json").exists()
