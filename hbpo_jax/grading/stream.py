"""Grading while the rollout decodes: rows are handed over as they finish, a background thread
grades them, and `results` waits for the last one.

Every item is graded on its own (extraction, the cheap stage, then the symbolic step in the worker
processes of hbpo_jax.grading.pool), so grading rows in pieces as they arrive gives the same
verdicts as one answers.grade_batch over all of them (the worker timeouts aside, which are
wall-clock in both). The thread spends its time waiting on the worker processes or in short
regular-expression work, so the host thread that drives the decode loop keeps running.

On a pod every host sees every finished row (the engine's outputs are replicated), grades its own
share of them here as they arrive (hbpo_jax.grading.hosts.share) and gathers the verdicts after the
rollout (hosts.gather): each row is graded once, by one host, while the rest decode.

    grader = StreamGrader(workers=4, timeout_s=5.0)
    grader.submit([3, 7], ["... \\boxed{2}", "..."], ["2", "5"])   # rows 3 and 7 finished
    grades = grader.results(rows=16)                     # GradeResult per row, in row order
"""
from __future__ import annotations

import queue
import threading
from typing import Sequence

from hbpo_jax.grading import answers


class StreamGrader:
    """Grades rows as they are submitted (see the module docstring).

    workers, timeout_s, answer_format: as answers.grade_batch. Submitting a row twice is an error.
    """

    def __init__(self, *, workers: int | None = None, timeout_s: float = 5.0,
                 answer_format: str = "paper"):
        self._kwargs = dict(workers=workers, timeout_s=timeout_s, answer_format=answer_format)
        self._results: dict[int, answers.GradeResult] = {}
        self._submitted: set[int] = set()
        self._queue: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._done = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name="stream-grader", daemon=True)
        self._thread.start()

    def submit(self, rows: Sequence[int], texts: Sequence[str], truths: Sequence[str]) -> None:
        """Rows that finished (their indices), their response texts and ground truths."""
        rows = [int(r) for r in rows]
        if not len(rows) == len(texts) == len(truths):
            raise ValueError(f"{len(rows)} rows, {len(texts)} texts and {len(truths)} truths.")
        if again := self._submitted.intersection(rows):
            raise ValueError(f"rows submitted twice: {sorted(again)[:8]}")
        self._submitted.update(rows)
        if rows:
            self._queue.put((rows, list(texts), [str(t) for t in truths]))

    @property
    def submitted(self) -> set[int]:
        return set(self._submitted)

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            # Whatever else arrived meanwhile goes in the same call (one map over the pool).
            pieces = [item]
            while not self._queue.empty():
                more = self._queue.get()
                if more is None:
                    self._queue.put(None)
                    break
                pieces.append(more)
            rows, texts, truths = ([x for piece in pieces for x in piece[i]] for i in range(3))
            try:
                graded = answers.grade_batch(texts, truths, **self._kwargs)
            except BaseException as e:  # surfaced by results(): the step must not hang on it
                graded, self._error = None, e
            with self._done:
                if graded is not None:
                    self._results.update(zip(rows, graded))
                self._done.notify_all()

    def results(self, rows: int | Sequence[int], timeout_s: float | None = None) -> list[answers.GradeResult]:
        """Waits until `rows` (a count: rows 0..rows-1, or the row indices) are graded (every one
        must have been submitted); their GradeResults in that order. Stops the thread."""
        wanted = list(range(rows)) if isinstance(rows, int) else [int(r) for r in rows]
        missing = set(wanted) - self._submitted
        if missing:
            raise ValueError(f"{len(missing)} rows were never submitted, e.g. {sorted(missing)[:8]}.")
        with self._done:
            ok = self._done.wait_for(lambda: self._error is not None or all(r in self._results for r in wanted),
                                     timeout_s)
        self.close()
        if self._error is not None:
            raise self._error
        if not ok:
            late = sum(r not in self._results for r in wanted)
            raise TimeoutError(f"{late} rows not graded after {timeout_s} s.")
        return [self._results[r] for r in wanted]

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout=5.0)


__all__ = ["StreamGrader"]
