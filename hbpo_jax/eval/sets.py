"""Evaluation sets: benchmark specs -> problem records with ids and difficulty levels.

A spec is ``KIND`` or ``KIND:ARG`` (``eval.benchmarks`` in the config; the kinds are defined in
hbpo_jax.spec, whose parse_benchmark checks them when the config is resolved):

  gsm8k:PATH  math500:PATH  olympiadbench:PATH  aime25:PATH  deepscaler:PATH
      local jsonl / json / parquet files in their usual columns (data.FIELD_PRESETS); MATH500's
      `level` is kept as the level.
  champ           the 270 competition problems of the `champ-dataset` package (level = its
                  category, e.g. "Number-Theory"); `champ:N` keeps the first N.
  rg:TASK         a procedural task of the `reasoning-gym` package (e.g. rg:basic_arithmetic,
                  rg:gsm_symbolic, rg:simple_equations), `size` problems from `seed`.
  tiny            the tiny run's arithmetic eval problems (hbpo_jax.tasks.arithmetic; level =
                  difficulty), the set the training loop evaluates before and after training.

Every benchmark is graded by hbpo_jax.grading.answers (the last \\boxed{} where the answer-format policy,
grading.format, looks), so the answers of reasoning-gym tasks are compared by our grader; the
task's own `score_answer` (on our extracted answer) is the benchmark's `scorer`, which evaluations
report beside ours as `dataset_score` (eval.dataset_score). reasoning-gym problems are generated
by rg_tasks.ReasoningGym, the code rg: training data uses.
champ-dataset and reasoning-gym are the `eval` extra of setup.py (imported only when used).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from hbpo_jax.data import readers as data
from hbpo_jax.data import reasoning_gym as rg_tasks
from hbpo_jax.data import sources
from hbpo_jax.eval.scoring import level_label

DEFAULT_RG_SIZE = 50
TINY = ("tiny", "")  # the task's own eval set, as an eval.benchmarks (kind, arg) pair


@dataclasses.dataclass
class Benchmark:
    """A named list of records ``{"id": str, "problem": str, "answer": str, "level": str|None}``
    and the SkipReport of source rows left out (malformed rows, too many rows, prompts too long).
    scorer: the benchmark's own scorer, (record, extracted answer or None) -> score in [0, 1], or
    None (reasoning-gym tasks have one)."""

    name: str
    records: list
    report: data.SkipReport
    source: str = ""
    scorer: Callable | None = None


def _cap(records: list, report: data.SkipReport, max_problems: int) -> list:
    if max_problems and len(records) > max_problems:
        for i in range(max_problems, len(records)):
            report.add("over_max_problems", i)
        records = records[:max_problems]
    return records


def load(benchmark: str | tuple[str, str], *, max_problems: int = 0, seed: int = 0,
         size: int = DEFAULT_RG_SIZE, tiny_records: list | None = None) -> Benchmark:
    """Reads one benchmark: a spec string (see the module docstring; spec.parse_benchmark checks
    it, ConfigError when malformed) or the (kind, arg) pair of EvalSpec.benchmarks.

    max_problems: keep the first N usable problems (0: all); the rest are counted in the report
      as "over_max_problems". size / seed: reasoning-gym problems generated (before the cap).
    tiny_records: the arithmetic eval problems (required for "tiny").
    Raises data.DataError: missing / malformed file, no usable rows, a missing package.
    """
    kind, arg = sources.parse_benchmark(benchmark) if isinstance(benchmark, str) else benchmark
    spec = f"{kind}:{arg}" if arg else kind
    scorer = None
    if kind in sources.FILE_BENCHMARKS:
        raw, report = data.load_records(arg, field_map=kind)
        records = [{"id": str(i), "problem": r["problem"], "answer": r["answer"],
                    "level": level_label(r.get("level", r.get("difficulty")))} for i, r in enumerate(raw)]
        name, source = kind, arg
    elif kind == "tiny":
        if tiny_records is None:
            raise data.DataError("benchmark 'tiny' needs the arithmetic task (config.task.name='arithmetic').")
        report = data.SkipReport(rows_read=len(tiny_records))
        records = [{"id": str(i), "problem": r["problem"], "answer": str(r["answer"]),
                    "level": level_label(r.get("difficulty"))} for i, r in enumerate(tiny_records)]
        name, source = "tiny", "hbpo_jax.tasks.arithmetic"
    elif kind == "champ":
        records, report = _champ()
        if arg:
            max_problems = min(int(arg), max_problems or int(arg))
        name, source = "champ", "champ-dataset"
    else:
        gym = rg_tasks.ReasoningGym((arg,), size=size, seed=seed)
        records, report = gym.records()
        name, source, scorer = f"rg_{arg}", f"reasoning-gym:{arg}", gym.score
    records = _cap(records, report, max_problems)
    if not records:
        raise data.DataError(f"benchmark {spec!r}: no usable problems ({report.summary()}).")
    return Benchmark(name, records, report, source, scorer)


def _champ() -> tuple[list, data.SkipReport]:
    """CHAMP's problems in the package's (natural) order: id = its identifier, level = category."""
    champ = data.import_optional("champ_dataset", "champ-dataset")
    dataset = champ.load("v0")
    report, records = data.SkipReport(), []
    for i, (ident, p) in enumerate(dataset.problems.items()):
        report.rows_read += 1
        problem, answer = getattr(p, "text", None), getattr(p, "answer", None)
        if not isinstance(problem, str) or not problem.strip():
            report.add("problem_missing", i)
        elif not isinstance(answer, str) or not answer.strip():
            report.add("answer_missing", i)
        elif len(answer) > data.MAX_ANSWER_CHARS:
            report.add("answer_too_long", i)
        else:
            records.append({"id": str(ident), "problem": problem, "answer": answer.strip(),
                            "level": level_label(getattr(p, "category", None))})
    return records, report
