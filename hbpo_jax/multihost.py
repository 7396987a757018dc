"""What the processes of a multi-host run (a TPU pod slice) must decide together.

- `StopSignal`: a SIGTERM (a TPU VM's maintenance notice) reaches some hosts, maybe only one. A
  host that stopped alone would enter the checkpoint's collectives while the others start the
  next rollout's, and the run would abort or hang. The stop is decided collectively at the end
  of every step, so every host checkpoints the same step and exits.
- `grade_batch`: grading has wall-clock timeouts, so two hosts grading the same item can
  disagree (one times out, one does not) and feed different rewards to what must be one global
  array. Each host grades a disjoint share and the results are gathered: every host holds the
  same grades, and grading work divides by the host count.

With one process both are the plain local operations.
"""
from __future__ import annotations

import logging
import signal
from typing import Sequence

import jax
import numpy as np

from hbpo_jax import grading

log = logging.getLogger(__name__)

# GradeResult.status values, as codes in the gathered array (index = code).
STATUSES = ("ok", "refused", "skipped", "timeout", "crash", "error")


def _preemption_service():
    """JAX's preemption sync manager when jax.distributed runs with it (the default on every
    platform since it is a coordination-service feature), else None."""
    from jax._src import distributed  # its state has no public accessor
    if distributed.global_state.client is None:
        return None
    return distributed.global_state.preemption_sync_manager


def any_process(flag: bool) -> bool:
    """True on every process when `flag` is True on any (an allgather of one bool per host)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils
    return bool(np.asarray(multihost_utils.process_allgather(np.array([flag], np.int32))).any())


class StopSignal:
    """Context manager; `should_stop(step)` after each step says, identically on every process,
    whether to checkpoint that step and exit.

    Under jax.distributed with JAX's preemption service (the default), JAX's own SIGTERM handler
    stays in place and `multihost_utils.reached_preemption_sync_point(step)` decides: every host
    agrees on the first step after the notice. Otherwise (one process, or the service off) a
    SIGTERM handler sets a local flag, combined across processes by `any_process` each step.
    """

    def __init__(self):
        self.local = False  # this process saw SIGTERM (own-handler mode)
        self._previous = None
        self._installed = False
        self._service = None

    def __enter__(self):
        self._service = _preemption_service()
        if self._service is not None:
            return self  # JAX's handler notifies the coordination service; do not replace it
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
            self._installed = True
        except ValueError:  # not the main thread: leave signals alone
            pass
        return self

    def _handle(self, signum, frame):
        log.warning("SIGTERM received: checkpointing and stopping after this step.")
        self.local = True

    def should_stop(self, step: int) -> bool:
        """Collective when there are several processes: every process must call it every step,
        with the same step numbers."""
        if self._service is not None:
            from jax.experimental import multihost_utils
            stop = multihost_utils.reached_preemption_sync_point(step)
            if stop:
                log.warning("preemption notice: every host checkpoints step %d and stops.", step)
            return stop
        return any_process(self.local)

    def __exit__(self, *exc):
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)


def _share(n: int, process: int, count: int) -> range:
    """The items process `process` of `count` grades: a contiguous slice of ceil(n / count)."""
    size = -(-n // count)
    return range(min(process * size, n), min((process + 1) * size, n))


def grade_batch(responses: Sequence[str], truths: Sequence[str], *, workers: int | None = None,
                timeout_s: float = 5.0, answer_format: str = "paper") -> list[grading.GradeResult]:
    """grading.grade_batch over all processes: each grades its share (`_share`), then the
    verdicts (format_ok, correct, status, seconds) are gathered, so the result is identical
    everywhere. Every process must call it with the same [N] responses and truths (collective).

    The extracted answers are not gathered (they may be long): extraction is deterministic and
    linear-time, so each process re-extracts the items it did not grade."""
    kwargs = dict(workers=workers, timeout_s=timeout_s, answer_format=answer_format)
    count = jax.process_count()
    if count == 1:
        return grading.grade_batch(responses, truths, **kwargs)
    from jax.experimental import multihost_utils
    n = len(responses)
    mine = _share(n, jax.process_index(), count)
    local = grading.grade_batch([responses[i] for i in mine], [truths[i] for i in mine], **kwargs)
    size = -(-n // count)
    # [size, 4]: format_ok, correct, status code, seconds; a short last share leaves rows unused.
    verdicts = np.zeros((size, 4), np.float32)
    for row, g in enumerate(local):
        verdicts[row] = (g.format_ok, g.correct, _code(g.status), g.latency_s)
    gathered = np.asarray(multihost_utils.process_allgather(verdicts))  # [count, size, 4]
    out = []
    for i in range(n):
        format_ok, correct, status, seconds = gathered[i // size, i % size]
        extracted = local[i - mine.start].extracted if i in mine else grading.extract_answer(
            responses[i], answer_format)
        out.append(grading.GradeResult(bool(format_ok), bool(correct), extracted,
                                       STATUSES[int(status)], float(seconds)))
    return out


def _code(status: str) -> int:
    """status as its STATUSES code (an unknown status travels as "error")."""
    return STATUSES.index(status) if status in STATUSES else STATUSES.index("error")


def count_status(grades: Sequence[grading.GradeResult], status: str) -> int:
    """How many items ended with `status` (e.g. "timeout")."""
    return sum(g.status == status for g in grades)


__all__ = ["STATUSES", "StopSignal", "any_process", "count_status", "grade_batch"]
