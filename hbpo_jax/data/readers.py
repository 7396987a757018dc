"""Prompt data: read math problem sets into normalised records (batching: hbpo_jax.data.loader).

Reading (`load_records`): local jsonl / json / parquet files (or a directory of them) through
`datasets`, or a hub id when online. Every row becomes
``{"problem": str, "answer": str}`` plus ``"difficulty"`` / ``"level"`` when the source has them.
Column presets (`FIELD_PRESETS`) cover the HBPO training and evaluation sets:

  deepscaler (default)  problem, answer (DeepScaleR also has `solution`, unused)
  gsm8k                 question, answer: the text after the last ``####``, thousands commas
                        dropped (``#### 1,234`` -> ``1234``)
  math500               problem, answer, level (passed through)
  olympiadbench         question, final_answer: a list, joined with ", " (a one-element list
                        gives its element), so multi-answer problems grade as a tuple
  aime25                problem, answer

Training data may also be reasoning-gym's procedural problems (`ReasoningGym`, data.path
"rg:<task>[,<task>...]"), generated offline from a seed; the rg: benchmarks share it.

Rows that cannot be used are skipped and counted by reason in a `SkipReport` (one logged
warning); nothing is dropped silently. Answers that are numbers are stringified (``3.0`` ->
``"3"``); lists of strings / numbers are joined with ", "; booleans, dicts, NaN and nested
lists are skipped as ``answer_not_text``.

Quirk (datasets >= 5): a json column that mixes strings and numbers is stored with the `Json`
feature, and strings that look like numbers come back as numbers (``"01"`` -> ``1``,
``"1.50"`` -> ``1.5``). The value is the same number, so grading is unaffected.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import pathlib
import re
from typing import Any, Iterable, Mapping

import numpy as np

from hbpo_jax.errors import DataError

__all__ = [
    "DataError", "SkipReport", "FieldMap", "FIELD_PRESETS", "load_records", "write_jsonl",
    "MAX_ANSWER_CHARS", "MAX_PROBLEM_CHARS", "import_optional",
]

log = logging.getLogger(__name__)

MAX_ANSWER_CHARS = 1_000      # longer "answers" are solutions or junk, not gradeable answers
MAX_PROBLEM_CHARS = 100_000   # bounded prompt work; real problems are a few thousand chars
PASSTHROUGH = ("difficulty", "level")
_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_EXAMPLES_PER_REASON = 3


@dataclasses.dataclass
class SkipReport:
    """Rows skipped while reading, by reason, with a few example row indices per reason."""

    counts: dict[str, int] = dataclasses.field(default_factory=dict)
    examples: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    rows_read: int = 0

    def add(self, reason: str, row_index: int) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < _EXAMPLES_PER_REASON:
            ex.append(row_index)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        """One line, e.g. ``skipped 3 of 10 rows: answer_missing=2 (rows 4, 9), ...``."""
        if not self.total:
            return f"skipped 0 of {self.rows_read} rows"
        parts = []
        for reason, n in sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0])):
            rows = ", ".join(map(str, self.examples.get(reason, [])))
            more = ", ..." if n > len(self.examples.get(reason, [])) else ""
            parts.append(f"{reason}={n} (rows {rows}{more})")
        return f"skipped {self.total} of {self.rows_read} rows: " + "; ".join(parts)


def _gsm8k_answer(text: str) -> str | None:
    if "####" not in text:
        return None
    ans = text.rsplit("####", 1)[1].strip()
    if re.fullmatch(r"[-+]?\d{1,3}(,\d{3})+(\.\d+)?", ans):
        ans = ans.replace(",", "")
    return ans


@dataclasses.dataclass(frozen=True)
class FieldMap:
    """Which source columns hold the problem and the answer; `parse` post-processes answers
    (returns None when the answer text has no usable answer)."""

    problem: str = "problem"
    answer: str = "answer"
    parse: Any = None  # Callable[[str], str | None] | None


FIELD_PRESETS: dict[str, FieldMap] = {
    "deepscaler": FieldMap("problem", "answer"),
    "gsm8k": FieldMap("question", "answer", _gsm8k_answer),
    "math500": FieldMap("problem", "answer"),
    "olympiadbench": FieldMap("question", "final_answer"),
    "aime25": FieldMap("problem", "answer"),
}


def _resolve_field_map(field_map) -> tuple[FieldMap, str]:
    if field_map is None:
        return FIELD_PRESETS["deepscaler"], "deepscaler"
    if isinstance(field_map, FieldMap):
        return field_map, "custom"
    if isinstance(field_map, str):
        key = field_map.lower().replace("-", "").replace("_", "")
        if key not in FIELD_PRESETS:
            raise DataError(f"Unknown field_map preset {field_map!r}; known presets: "
                            f"{sorted(FIELD_PRESETS)}.")
        return FIELD_PRESETS[key], key
    if isinstance(field_map, Mapping):
        extra = set(field_map) - {"problem", "answer"}
        missing = {"problem", "answer"} - set(field_map)
        if extra or missing or not all(isinstance(v, str) for v in field_map.values()):
            raise DataError("field_map must map exactly 'problem' and 'answer' to column names, "
                            f"got {dict(field_map)!r}.")
        return FieldMap(field_map["problem"], field_map["answer"]), "custom"
    raise DataError(f"field_map must be None, a preset name, a dict or a FieldMap, "
                    f"got {type(field_map).__name__}.")


def _scalar_text(v) -> str | None:
    if isinstance(v, str):
        return v
    if isinstance(v, (bool, np.bool_)):
        return None
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        v = float(v)
        if not math.isfinite(v):
            return None
        return str(int(v)) if v.is_integer() and abs(v) < 1e16 else repr(v)
    return None


def _answer_text(v) -> tuple[str | None, str]:
    """(answer, "") or (None, skip reason)."""
    if v is None or (isinstance(v, (float, np.floating)) and math.isnan(v)):
        return None, "answer_missing"  # pandas / parquet store a missing float as NaN
    if isinstance(v, (list, tuple, np.ndarray)):
        items = [_scalar_text(x) for x in v]
        if not items:
            return None, "answer_missing"
        if any(x is None for x in items):
            return None, "answer_not_text"
        items = [x.strip() for x in items]
        if not all(items):
            return None, "answer_empty"
        return ", ".join(items), ""
    text = _scalar_text(v)
    return (None, "answer_not_text") if text is None else (text, "")


def _iter_rows(ds, batch_size: int = 1024) -> Iterable[dict]:
    # Batched reads: ~8x faster than `for row in ds` (per-row Arrow formatting).
    for batch in ds.iter(batch_size=batch_size):
        yield from (dict(zip(batch, values)) for values in zip(*batch.values()))


def _normalise(rows: Iterable[Mapping], fmap: FieldMap, report: SkipReport) -> list[dict]:
    out = []
    for i, row in enumerate(rows):
        report.rows_read += 1
        problem = row.get(fmap.problem)
        if problem is None or (isinstance(problem, str) and not problem.strip()):
            report.add("problem_missing", i)
            continue
        if not isinstance(problem, str):
            report.add("problem_not_text", i)
            continue
        if len(problem) > MAX_PROBLEM_CHARS:
            report.add("problem_too_long", i)
            continue
        answer, reason = _answer_text(row.get(fmap.answer))
        if answer is not None and len(answer) > MAX_ANSWER_CHARS:
            # Checked before parsing: bounded work on hostile input.
            answer, reason = None, "answer_too_long"
        if answer is not None and fmap.parse is not None:
            answer = fmap.parse(answer)
            reason = "answer_unparsed" if answer is None else ""
        if answer is not None:
            answer = answer.strip()
            if not answer:
                answer, reason = None, "answer_empty"
        if answer is None:
            report.add(reason, i)
            continue
        rec = {"problem": problem, "answer": answer}
        for key in PASSTHROUGH:
            if key in row:
                rec[key] = row[key]
        out.append(rec)
    return out


def _offline() -> bool:
    flags = [os.environ.get(k, "") for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")]
    if any(f.strip().upper() in ("1", "ON", "YES", "TRUE") for f in flags):
        return True
    try:
        import datasets
        return bool(getattr(datasets.config, "HF_HUB_OFFLINE", False))
    except Exception:  # pragma: no cover
        return False


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def _looks_like_path(source: str) -> bool:
    return (source.startswith((".", "/", "~")) or "\\" in source or source.count("/") > 1
            or any(source.lower().endswith(ext) for ext in _FORMATS)
            or not _HUB_ID.fullmatch(source))


def _local_files(path: pathlib.Path, split: str, fmt: str | None) -> tuple[list[str], str]:
    """Data files and their `datasets` builder name ("json" / "parquet")."""
    if path.is_dir():
        exts = [e for e, f in _FORMATS.items() if fmt is None or f == fmt]
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in exts
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise DataError(f"Data directory '{path}' has no {'/'.join(exts)} files.")
        builders = {_FORMATS[p.suffix.lower()] for p in files}
        if len(builders) > 1:
            raise DataError(f"Data directory '{path}' mixes json and parquet files; pass "
                            "format='json' or format='parquet'.")
        in_split = [p for p in files if split in p.name]
        files = in_split or files
        return [str(p) for p in files], builders.pop()
    if fmt is None:
        ext = path.suffix.lower()
        if ext not in _FORMATS:
            raise DataError(f"Cannot tell the format of '{path}' from its extension; pass "
                            "format='json' (json / jsonl) or format='parquet'.")
        fmt = _FORMATS[ext]
    return [str(path)], fmt


def _first_bad_json_line(path: str, limit: int = 1_000_000) -> int | None:
    with open(path, "r", encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if lineno > limit:
                return None
            if line.strip():
                try:
                    json.loads(line)
                except ValueError:
                    return lineno
    return None


def _is_blank(path: pathlib.Path) -> bool:
    size = path.stat().st_size
    if size == 0:
        return True
    if size > 65536 or path.suffix.lower() == ".parquet":
        return False
    return re.fullmatch(rb"\s*(\[\s*\]|\{\s*\})?\s*", path.read_bytes()) is not None


def _load_local(path: pathlib.Path, split: str, fmt: str | None, cache_dir):
    import datasets

    files, builder = _local_files(path, split, fmt)
    for f in files:
        if _is_blank(pathlib.Path(f)):
            raise DataError(f"Data file '{f}' is empty.")
    try:
        return datasets.load_dataset(builder, data_files={split: files}, split=split,
                                     cache_dir=cache_dir)
    except StopIteration:  # datasets' json reader on a file with no rows
        raise DataError(f"Data file '{path}' is empty.") from None
    except Exception as e:
        cause = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if builder == "json":
            bad = next(((f, n) for f in files if f.lower().endswith(".jsonl")
                        and (n := _first_bad_json_line(f)) is not None), None)
            if bad is not None:
                raise DataError(f"Data file '{bad[0]}' has a malformed JSON line {bad[1]} "
                                f"({cause}).") from e
            raise DataError(f"Data file '{path}' is not valid JSON / JSON lines ({cause}).") from e
        raise DataError(f"Data file '{path}' could not be read as {builder} ({cause}).") from e


def load_records(source: str | os.PathLike, *, split: str = "train", field_map=None,
                 format: str | None = None, max_rows: int | None = None,
                 cache_dir: str | None = None) -> tuple[list[dict], SkipReport]:
    """Reads a problem set into normalised records.

    Args:
      source: a local .jsonl / .json / .parquet file, a directory of such files (those whose
        name contains `split` when any does), or a hub dataset id (read only when `source` does
        not exist locally, does not look like a path, and HF offline mode is off).
      split: the split name (hub datasets; directory file filter).
      field_map: None (DeepScaleR columns), a preset name from `FIELD_PRESETS`, or
        ``{"problem": "<column>", "answer": "<column>"}``.
      format: "json" (json and jsonl) or "parquet" to override the file extension.
      max_rows: read at most this many source rows (before skipping).
      cache_dir: `datasets` cache directory (its default when None).

    Returns:
      (records, report): a list of ``{"problem", "answer"[, "difficulty"][, "level"]}`` dicts
      in source order, and the `SkipReport` of rows left out.

    Raises:
      DataError: missing / empty / malformed file, mapped columns absent, no usable rows left,
        or a hub id in offline mode. The message names the file or hub id.
    """
    import datasets

    fmap, preset = _resolve_field_map(field_map)
    if format is not None and format not in ("json", "jsonl", "parquet"):
        raise DataError(f"format must be 'json', 'jsonl' or 'parquet', got {format!r}.")
    fmt = {"jsonl": "json"}.get(format, format)
    if max_rows is not None and (not isinstance(max_rows, int) or max_rows < 1):
        raise DataError(f"max_rows must be a positive int or None, got {max_rows!r}.")
    name = os.fspath(source)
    path = pathlib.Path(name).expanduser()
    if path.exists():
        ds = _load_local(path, split, fmt, cache_dir)
    elif _looks_like_path(name):
        raise DataError(f"Data file '{name}' does not exist.")
    elif _offline():
        raise DataError(f"'{name}' is not a local file, and HF offline mode is on "
                        "(HF_HUB_OFFLINE / HF_DATASETS_OFFLINE), so the hub dataset cannot be "
                        "downloaded.")
    else:
        try:
            ds = datasets.load_dataset(name, split=split, cache_dir=cache_dir)
        except Exception as e:
            raise DataError(f"Hub dataset '{name}' (split {split!r}) could not be loaded: "
                            f"{str(e).strip().splitlines()[0] if str(e).strip() else e!r}") from e
    if len(ds) == 0:
        raise DataError(f"Data file '{name}' is empty (no rows).")
    missing = [c for c in (fmap.problem, fmap.answer) if c not in ds.column_names]
    if missing:
        raise DataError(f"'{name}' has no column {missing} for field_map {preset!r} "
                        f"(problem={fmap.problem!r}, answer={fmap.answer!r}); columns found: "
                        f"{ds.column_names}.")
    if max_rows is not None and len(ds) > max_rows:
        ds = ds.select(range(max_rows))
    keep = [c for c in ds.column_names if c in (fmap.problem, fmap.answer, *PASSTHROUGH)]
    ds = ds.select_columns(keep)
    report = SkipReport()
    records = _normalise(_iter_rows(ds), fmap, report)
    if not records:
        raise DataError(f"No usable rows left in '{name}' ({report.summary()}).")
    if report.total:
        log.warning("%s: %s", name, report.summary())
    return records, report


def write_jsonl(path: str | os.PathLike, rows: Iterable[Mapping]) -> pathlib.Path:
    """Writes `rows` as JSON lines (UTF-8, one object per line), atomically; returns the path."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(dict(row), ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------------------
# reasoning-gym: procedural problems, generated offline (training data rg:..., benchmarks rg:...).


def import_optional(module: str, package: str):
    """`module`, or DataError naming the pip package (the `eval` extra) when it is missing."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise DataError(f"the {package!r} package is not installed ({e}); "
                        "pip install -e '.[eval]'.") from None
