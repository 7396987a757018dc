"""reasoning-gym's procedural tasks as problem records: training data (data.path "rg:<task>,...")
and benchmarks (eval.benchmarks "rg:<task>") share this one source, offline and seeded.
"""
from __future__ import annotations

import logging
from typing import Mapping

from hbpo_jax.data.readers import SkipReport, import_optional
from hbpo_jax.errors import DataError

log = logging.getLogger(__name__)


def _split_evenly(size: int, parts: int) -> list[int]:
    """`size` as `parts` counts differing by at most one, the larger ones first."""
    return [size // parts + (i < size % parts) for i in range(parts)]


class ReasoningGym:
    """reasoning-gym tasks as problem records, and each task's own scorer.

    `size` problems in all, split evenly over `tasks` and interleaved round-robin (so an
    unshuffled stream mixes the tasks too); task t's problems are its dataset built from `seed`,
    so the same (tasks, size, seed) give the same records on every machine, offline. Records:
    ``{"id", "problem", "answer", "level": None, "rg_task", "rg_index"}``; rg_index addresses the
    problem in its task's dataset, which `score` uses.
    """

    def __init__(self, tasks, *, size: int, seed: int):
        rg = import_optional("reasoning_gym", "reasoning-gym")
        tasks = tuple(tasks)
        if not tasks or size < len(tasks):
            raise DataError(f"reasoning-gym: {size} problems cannot cover the tasks {tasks}.")
        self.tasks, self.size, self.seed = tasks, int(size), int(seed)
        self._datasets = {}
        for task, n in zip(tasks, _split_evenly(self.size, len(tasks))):
            try:
                self._datasets[task] = rg.create_dataset(task, size=n, seed=self.seed)
            except Exception as e:  # unknown task names raise a plain error inside reasoning-gym
                raise DataError(f"reasoning-gym task {task!r} could not be created: {e}") from None

    def records(self) -> tuple[list[dict], SkipReport]:
        """Every problem with a text answer, round-robin over the tasks, and the SkipReport."""
        report, records = SkipReport(), []
        longest = max(len(d) for d in self._datasets.values())
        for i in range(longest):
            for task, dataset in self._datasets.items():
                if i >= len(dataset):
                    continue
                item = dataset[i]
                report.rows_read += 1
                answer = item.get("answer")
                if not isinstance(answer, str) or not answer.strip():
                    report.add("answer_missing", report.rows_read - 1)
                    continue
                ident = item.get("metadata", {}).get("source_index", i)
                records.append({"id": ident if len(self.tasks) == 1 else f"{task}/{ident}",
                                "problem": item["question"], "answer": answer.strip(), "level": None,
                                "rg_task": task, "rg_index": i})
        for r in records:
            r["id"] = str(r["id"])
        return records, report

    def score(self, record: Mapping, answer: str | None) -> float:
        """The task's own score_answer (in [0, 1]) of `answer` (our extracted answer; None when the
        response broke the format) for one of `records()`."""
        dataset = self._datasets[record["rg_task"]]
        try:
            return float(dataset.score_answer(answer, entry=dataset[int(record["rg_index"])]))
        except Exception:  # a scorer bug on hostile text must not stop an evaluation
            log.exception("reasoning-gym %s: score_answer failed", record["rg_task"])
            return 0.0
