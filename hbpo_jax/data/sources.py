"""Where a run's problems come from, resolved from the config: the training data (data.path: a
file, folder or hub id, or reasoning-gym tasks "rg:<task>[,<task>...]") and the benchmark specs of
eval.benchmarks ("KIND" or "KIND:ARG"). Part of the run spec (hbpo_jax.spec re-exports these
names); hbpo_jax.data.readers, hbpo_jax.data.reasoning_gym and hbpo_jax.eval.sets read what they name.
"""
from __future__ import annotations

import dataclasses

from hbpo_jax.data import readers
from hbpo_jax.errors import require

# Benchmark kinds of eval.benchmarks ("KIND" or "KIND:ARG"); hbpo_jax.eval.sets loads them.
FILE_BENCHMARKS = ("gsm8k", "math500", "olympiadbench", "aime25", "deepscaler")
BENCHMARKS = FILE_BENCHMARKS + ("champ", "rg", "tiny")
_BENCHMARK_ALIASES = {"reasoning_gym": "rg", "reasoning-gym": "rg", "arithmetic": "tiny"}
RG_PREFIX = "rg:"  # data.path "rg:<task>[,<task>...]": reasoning-gym training problems
RG_DEFAULT_SIZE = 10_000  # rg: training problems when data.max_rows is 0



@dataclasses.dataclass(frozen=True)
class DataSpec:
    """The training problems: a file / folder / hub id (path, with field_map, split, max_rows
    0 = all), or reasoning-gym tasks (rg_tasks non-empty: `size` problems generated from `seed`,
    offline); shuffle: reshuffle every epoch. Empty path and no tasks: a synthetic task's own."""

    path: str
    field_map: str
    split: str
    shuffle: bool
    max_rows: int
    rg_tasks: tuple[str, ...] = ()
    size: int = 0
    seed: int = 0


def parse_benchmark(spec: str) -> tuple[str, str]:
    """(kind, arg) of an eval.benchmarks entry ("KIND" or "KIND:ARG"); ConfigError when malformed."""
    require(isinstance(spec, str) and bool(spec.strip()),
             f"eval.benchmarks: a benchmark must be a non-empty string, got {spec!r}.")
    kind, _, arg = spec.strip().partition(":")
    kind = _BENCHMARK_ALIASES.get(kind.lower(), kind.lower())
    require(kind in BENCHMARKS, f"eval.benchmarks: {spec!r} has unknown kind {kind!r}; one of {BENCHMARKS}.")
    if kind in FILE_BENCHMARKS + ("rg",):
        what = "a file path" if kind in FILE_BENCHMARKS else "a task name"
        require(bool(arg), f"eval.benchmarks: {spec!r}: {kind} needs {what} ({kind}:...).")
    require(not (kind == "tiny" and arg), f"eval.benchmarks: {spec!r}: tiny takes no argument.")
    require(not (kind == "champ" and arg and not arg.isdigit()),
             f"eval.benchmarks: {spec!r}: champ takes a problem count (champ:N).")
    return kind, arg


def parse_data_path(path: str) -> tuple[str, ...]:
    """The reasoning-gym tasks of a data.path "rg:<task>[,<task>...]" (() for any other path);
    ConfigError when the list is empty or repeats a task."""
    if not isinstance(path, str) or not path.startswith(RG_PREFIX):
        return ()
    tasks = tuple(t.strip() for t in path[len(RG_PREFIX):].split(","))
    require(all(tasks), f"data.path {path!r}: name reasoning-gym tasks, e.g. rg:basic_arithmetic,chain_sum.")
    require(len(set(tasks)) == len(tasks), f"data.path {path!r} names a task twice.")
    return tasks


def resolve_data(config) -> DataSpec:
    """The data section (training problems); checks an rg: list and its size and seed."""
    d = config.data
    tasks = parse_data_path(d.path)
    require(d.max_rows >= 0, f"data.max_rows must be ≥ 0 (0 = all), got {d.max_rows}.")
    seed = int(d.get("seed", 1))
    require(seed >= 0, f"data.seed must be ≥ 0, got {seed}.")
    size = int(d.max_rows or RG_DEFAULT_SIZE) if tasks else 0
    require(not tasks or size >= len(tasks),
             f"data.max_rows ({size}) must give each of the {len(tasks)} rg: tasks a problem.")
    return DataSpec(path=str(d.path), field_map=str(d.field_map or ""), split=str(d.split),
                    shuffle=bool(d.shuffle), max_rows=int(d.max_rows), rg_tasks=tasks, size=size, seed=seed)


def training_records(data_spec, *, cache_dir: str | None = None) -> tuple[list[dict], readers.SkipReport]:
    """The training problems of a spec.DataSpec: reasoning-gym's (rg_tasks) or `load_records`'."""
    if data_spec.rg_tasks:
        from hbpo_jax.data.reasoning_gym import ReasoningGym  # imports reasoning-gym only when used
        return ReasoningGym(data_spec.rg_tasks, size=data_spec.size, seed=data_spec.seed).records()
    return readers.load_records(data_spec.path, split=data_spec.split, field_map=data_spec.field_map or None,
                        max_rows=data_spec.max_rows or None, cache_dir=cache_dir)
