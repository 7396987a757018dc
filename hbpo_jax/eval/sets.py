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

Every benchmark is graded by hbpo_jax.grading (last \\boxed{} after </think>), so the answers of
reasoning-gym tasks are compared by our grader, not by reasoning-gym's `score_answer`.
champ-dataset and reasoning-gym are the `eval` extra of setup.py (imported only when used).
"""
from __future__ import annotations

import dataclasses

from hbpo_jax import data
from hbpo_jax import spec as spec_lib
from hbpo_jax.eval.evaluation import level_label

DEFAULT_RG_SIZE = 50
TINY = ("tiny", "")  # the task's own eval set, as an eval.benchmarks (kind, arg) pair


@dataclasses.dataclass
class Benchmark:
    """A named list of records ``{"id": str, "problem": str, "answer": str, "level": str|None}``
    and the SkipReport of source rows left out (malformed rows, too many rows, prompts too long)."""

    name: str
    records: list
    report: data.SkipReport
    source: str = ""


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
    kind, arg = spec_lib.parse_benchmark(benchmark) if isinstance(benchmark, str) else benchmark
    spec = f"{kind}:{arg}" if arg else kind
    if kind in spec_lib.FILE_BENCHMARKS:
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
        records, report = _reasoning_gym(arg, size=size, seed=seed)
        name, source = f"rg_{arg}", f"reasoning-gym:{arg}"
    records = _cap(records, report, max_problems)
    if not records:
        raise data.DataError(f"benchmark {spec!r}: no usable problems ({report.summary()}).")
    return Benchmark(name, records, report, source)


def _import(module: str, package: str):
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise data.DataError(f"the {package!r} package is not installed ({e}); "
                             "pip install -e '.[eval]'.") from None


def _champ() -> tuple[list, data.SkipReport]:
    """CHAMP's problems in the package's (natural) order: id = its identifier, level = category."""
    champ = _import("champ_dataset", "champ-dataset")
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


def _reasoning_gym(task: str, *, size: int, seed: int) -> tuple[list, data.SkipReport]:
    rg = _import("reasoning_gym", "reasoning-gym")
    try:
        dataset = rg.create_dataset(task, size=int(size), seed=int(seed))
    except Exception as e:  # unknown task names raise a plain error inside reasoning-gym
        raise data.DataError(f"reasoning-gym task {task!r} could not be created: {e}") from None
    report, records = data.SkipReport(), []
    for i, item in enumerate(dataset):
        report.rows_read += 1
        answer = item.get("answer")
        if not isinstance(answer, str) or not answer.strip():
            report.add("answer_missing", i)
            continue
        records.append({"id": str(item.get("metadata", {}).get("source_index", i)),
                        "problem": item["question"], "answer": answer.strip(), "level": None})
    return records, report
