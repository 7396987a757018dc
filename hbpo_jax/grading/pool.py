"""Grading's symbolic step, bounded in time: math-verify under a SIGALRM timer in the main thread
(`symbolic_with_alarm`), or in worker processes killed when late (`GradingPool`). A hang in C code
(a big-int power inside sympy) cannot be interrupted by a signal, only by killing the process it
runs in.

Workers are plain `python -c` subprocesses speaking JSON lines over stdin/stdout, not
multiprocessing children: spawn/forkserver children re-import the caller's __main__ (a training
script would import jax again in every replacement worker), fork is unsafe once jax runs threads,
and JSON keeps pickle out of the path of untrusted text. Each worker runs
`symbolic_with_alarm` on one (pred, truth) pair at a time; the parent kills a worker that
is late and starts another.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import dataclasses
import json
import logging
import multiprocessing.connection as mp_connection
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Iterator, Sequence

_SLACK_S = 0.5              # parent-side grace beyond timeout_s before killing a worker
_STARTUP_TIMEOUT_S = 60.0   # a worker that cannot import math-verify in this long is dead


def symbolic_match(pred: str, truth: str) -> bool:
    """math-verify equivalence of two short answers. No timeout of its own: run it in a worker
    process or under `_alarm` (math-verify's own alarms would cancel ours, so they are off)."""
    import math_verify  # imported lazily: heavy (sympy) and only needed here

    # Its "timeout is disabled" warning is wrong here: our caller provides the timeout.
    logging.getLogger("math_verify").setLevel(logging.ERROR)

    gold = math_verify.parse("$\\boxed{" + truth + "}$", parsing_timeout=None)
    target = math_verify.parse("$\\boxed{" + pred + "}$", parsing_timeout=None)
    if not gold or not target:
        return False
    return bool(math_verify.verify(gold, target, timeout_seconds=None))


class GradingTimeout(BaseException):
    """Raised by the alarm; a BaseException so library `except Exception` blocks can't eat it."""


@contextlib.contextmanager
def _alarm(seconds: float) -> Iterator[None]:
    """Raise GradingTimeout in the main thread after `seconds` (POSIX SIGALRM timer)."""
    def on_alarm(signum, frame):
        raise GradingTimeout()

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1e-3))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _can_alarm() -> bool:
    return hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()


def symbolic_with_alarm(pred: str, truth: str, timeout_s: float) -> tuple[bool, str]:
    """symbolic_match under a SIGALRM timer: (correct, status), status "ok", "timeout", "error"
    (malformed input) or "skipped" (not the main thread: no timer). A hang in C outlasts it."""
    if not _can_alarm():
        return False, "skipped"
    try:
        with _alarm(timeout_s):
            return symbolic_match(pred, truth), "ok"
    except GradingTimeout:
        return False, "timeout"
    except Exception:  # malformed LaTeX etc.: a wrong answer, not a crash
        return False, "error"



def _worker_stdio() -> None:
    """Worker loop: read {"id", "pred", "truth", "timeout"} lines, write {"id", "ok", "status"}."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)  # anything a library prints must not corrupt the protocol on fd 1
    try:
        import resource  # bound memory so a runaway big-int fails fast instead of swapping
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
    except (ImportError, ValueError, OSError):
        pass
    symbolic_with_alarm("1", "1", 30.0)  # warm math-verify's lazy imports before "ready"
    out.write(b'{"ready": true}\n')
    for line in sys.stdin.buffer:
        msg = json.loads(line)
        ok, status = symbolic_with_alarm(msg["pred"], msg["truth"], msg["timeout"])
        out.write(json.dumps({"id": msg["id"], "ok": ok, "status": status}).encode() + b"\n")


@dataclasses.dataclass
class _Worker:
    proc: subprocess.Popen
    started: float
    buf: bytes = b""
    ready: bool = False
    task: int | None = None
    sent_at: float = 0.0

    def fileno(self) -> int:  # lets multiprocessing.connection.wait select on the worker
        return self.proc.stdout.fileno()


class GradingPool:
    """A fixed number of grading processes, reused across calls; late workers are killed and
    replaced (a fresh worker takes about a second to import math-verify). Use as a context
    manager or call `close()`.
    """

    def __init__(self, workers: int = 2):
        if workers < 1:
            raise ValueError(f"GradingPool needs workers >= 1, got {workers}")
        self.workers = workers
        self._lock = threading.Lock()  # one map at a time: workers answer one request each
        self._pool: list[_Worker] = [self._start() for _ in range(workers)]

    @staticmethod
    def _start() -> _Worker:
        env = dict(os.environ)
        # The child must import this very package: give it the parent's import path.
        env["PYTHONPATH"] = os.pathsep.join([os.path.abspath(p or ".") for p in sys.path])
        proc = subprocess.Popen(
            [sys.executable, "-c", f"import {__name__} as g; g._worker_stdio()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            bufsize=0, env=env, start_new_session=True)  # own session: terminal ^C skips it
        return _Worker(proc, time.monotonic())

    @staticmethod
    def _stop(w: _Worker) -> None:
        with contextlib.suppress(Exception):
            w.proc.kill()
        with contextlib.suppress(Exception):
            w.proc.wait(timeout=2.0)
        for f in (w.proc.stdin, w.proc.stdout):
            with contextlib.suppress(Exception):
                f.close()

    def _replace(self, w: _Worker) -> None:
        self._stop(w)
        self._pool[self._pool.index(w)] = self._start()

    @staticmethod
    def _read_lines(w: _Worker) -> list[dict] | None:
        """Complete JSON lines available from w; None at EOF (the worker died)."""
        chunk = os.read(w.fileno(), 1 << 16)
        if not chunk:
            return None
        w.buf += chunk
        *lines, w.buf = w.buf.split(b"\n")
        return [json.loads(x) for x in lines if x.strip()]

    def map(self, items: Sequence[tuple[str, str]], timeout_s: float
            ) -> list[tuple[bool, str, float]]:
        """Run symbolic_match on (pred, truth) pairs; returns (correct, status, seconds) each,
        in input order. Never raises for an item: timeouts and crashes become (False, status).

        Items must be short (the callers pass only symbolic_safe answers, <= 512 chars), so a
        request always fits the pipe buffer and writing it never blocks.
        """
        with self._lock:
            return self._map(items, timeout_s)

    def _map(self, items: Sequence[tuple[str, str]], timeout_s: float
             ) -> list[tuple[bool, str, float]]:
        results: list[tuple[bool, str, float] | None] = [None] * len(items)
        pending = collections.deque(range(len(items)))
        start_failures = 0
        while pending or any(w.task is not None for w in self._pool):
            if start_failures > 3 * self.workers:  # workers cannot start: give up, don't spin
                while pending:
                    results[pending.popleft()] = (False, "error", 0.0)
                break
            for w in list(self._pool):
                if w.ready and w.task is None and pending:
                    i = pending.popleft()
                    msg = {"id": i, "pred": items[i][0], "truth": items[i][1], "timeout": timeout_s}
                    try:
                        w.proc.stdin.write(json.dumps(msg).encode() + b"\n")
                    except OSError:  # died while idle: retry the item on a fresh worker
                        pending.appendleft(i)
                        start_failures += 1
                        self._replace(w)
                        continue
                    w.task, w.sent_at = i, time.monotonic()
            waiting = [w for w in self._pool if not w.ready or w.task is not None]
            deadlines = [w.sent_at + timeout_s + _SLACK_S if w.task is not None
                         else w.started + _STARTUP_TIMEOUT_S for w in waiting]
            wait_s = max(0.0, min(deadlines) - time.monotonic()) if deadlines else 0.0
            for w in mp_connection.wait(waiting, timeout=wait_s):
                try:
                    msgs = self._read_lines(w)
                except (OSError, ValueError):  # unreadable or garbled: treat as dead
                    msgs = None
                if msgs is None:
                    if w.task is not None:
                        results[w.task] = (False, "crash", time.monotonic() - w.sent_at)
                    else:
                        start_failures += 1
                    self._replace(w)
                    continue
                for msg in msgs:
                    if msg.get("ready"):
                        w.ready, start_failures = True, 0
                    elif msg.get("id") == w.task:
                        results[w.task] = (bool(msg["ok"]), str(msg["status"]),
                                           time.monotonic() - w.sent_at)
                        w.task = None
            now = time.monotonic()
            for w in list(self._pool):
                if w.task is not None and now > w.sent_at + timeout_s + _SLACK_S:
                    results[w.task] = (False, "timeout", now - w.sent_at)  # stuck in C: kill
                    self._replace(w)
                elif not w.ready and now > w.started + _STARTUP_TIMEOUT_S:
                    start_failures += 1
                    self._replace(w)
        return [r if r is not None else (False, "error", 0.0) for r in results]

    def wait_ready(self, timeout_s: float = _STARTUP_TIMEOUT_S) -> bool:
        """Block until every worker has imported its grader (True) or timeout_s passes (False).

        `map` never needs this (it hands items to whichever worker is ready first); it is for
        callers that want the start-up cost paid up front, or must know which worker will take
        the next item.
        """
        with self._lock:
            deadline = time.monotonic() + timeout_s
            while True:
                waiting = [w for w in self._pool if not w.ready]
                left = deadline - time.monotonic()
                if not waiting or left <= 0:
                    return not waiting
                for w in mp_connection.wait(waiting, timeout=left):
                    try:
                        msgs = self._read_lines(w)
                    except (OSError, ValueError):
                        msgs = None
                    if msgs is None:  # died while starting: start another, within the deadline
                        self._replace(w)
                        continue
                    w.ready = w.ready or any(m.get("ready") for m in msgs)

    def pids(self) -> list[int]:
        """Process ids of the current workers (for monitoring and tests)."""
        return [w.proc.pid for w in self._pool]

    def close(self) -> None:
        for w in self._pool:
            with contextlib.suppress(Exception):
                w.proc.stdin.close()  # EOF: the worker's loop ends
        for w in self._pool:
            with contextlib.suppress(Exception):
                w.proc.wait(timeout=1.0)
            self._stop(w)
        self._pool = []

    def __enter__(self) -> "GradingPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_shared_pool: GradingPool | None = None
_shared_lock = threading.Lock()


def shared_pool(workers: int) -> GradingPool:
    """The module's lazily created pool (grade_batch's default), rebuilt only when the worker
    count changes."""
    global _shared_pool
    with _shared_lock:
        if _shared_pool is None or _shared_pool.workers != workers:
            if _shared_pool is not None:
                _shared_pool.close()
            _shared_pool = GradingPool(workers)
        return _shared_pool


def close_pool() -> None:
    """Stop the shared worker processes (also run at interpreter exit)."""
    global _shared_pool
    with _shared_lock:
        if _shared_pool is not None:
            _shared_pool.close()
            _shared_pool = None


atexit.register(close_pool)
