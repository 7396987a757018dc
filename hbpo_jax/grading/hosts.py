"""Grading over the hosts of a pod: each host grades a disjoint share, the verdicts are gathered.
The training step grades its share as the rollout finishes rows (grading.stream), then gathers.

Grading has wall-clock timeouts, so two hosts grading the same item can disagree (one times out,
one does not) and feed different rewards to what must be one global array. Each host grades its
own share and every host ends with the same grades; grading work divides by the host count. With
one process it is the plain local grading.
"""
from __future__ import annotations

from typing import Sequence

import jax
import numpy as np

from hbpo_jax.grading import answers as grading

# GradeResult.status values, as codes in the gathered array (index = code).
STATUSES = ("ok", "refused", "skipped", "timeout", "crash", "error")


def share(n: int, process: int, count: int) -> range:
    """The items process `process` of `count` grades: a contiguous slice of ceil(n / count)."""
    size = -(-n // count)
    return range(min(process * size, n), min((process + 1) * size, n))


def grade_batch(responses: Sequence[str], truths: Sequence[str], *, workers: int | None = None,
                timeout_s: float = 5.0, answer_format: str = "paper") -> list[grading.GradeResult]:
    """grading.grade_batch over all processes: each grades its share (`share`), then the
    verdicts are gathered (`gather`), so the result is identical everywhere. Every process must
    call it with the same [N] responses and truths (collective)."""
    kwargs = dict(workers=workers, timeout_s=timeout_s, answer_format=answer_format)
    if jax.process_count() == 1:
        return grading.grade_batch(responses, truths, **kwargs)
    mine = share(len(responses), jax.process_index(), jax.process_count())
    local = grading.grade_batch([responses[i] for i in mine], [truths[i] for i in mine], **kwargs)
    return gather(local, responses, answer_format)


def gather(local: Sequence[grading.GradeResult], responses: Sequence[str],
           answer_format: str = "paper") -> list[grading.GradeResult]:
    """The GradeResults of all N responses from each process's own: `local` are this process's
    share (`share(N, process_index, process_count)`, in order), however it graded them (in one
    batch, or streamed as the rollout finished rows). The verdicts (format_ok, correct, status,
    seconds) are gathered, so the result is identical on every process (collective; with one
    process, `local` itself). The extracted answers are not gathered (they may be long):
    extraction is deterministic and linear-time, so each process re-extracts the items it did
    not grade."""
    count, n = jax.process_count(), len(responses)
    mine = share(n, jax.process_index(), count)
    if len(local) != len(mine):
        raise ValueError(f"{len(local)} local grades for a share of {len(mine)} of {n} responses.")
    if count == 1:
        return list(local)
    from jax.experimental import multihost_utils
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


__all__ = ["STATUSES", "count_status", "gather", "grade_batch", "share"]
