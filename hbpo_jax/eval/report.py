"""Evaluation outputs, all from `BenchmarkResult.summary()` dicts: the markdown tables (the one
table builder, for launch/eval.py, the training loop's before / after results.md and the
ablation table) and the files of an evaluation: results.json, results.md (the paper's layout,
arXiv 2507.15844: accuracy % / mean tokens per mode), a PNG of accuracy against tokens, and
responses.jsonl (every response, graded). A finished evaluation's report can be rebuilt from its
results.json.
"""
from __future__ import annotations

import math
import os
from typing import Iterable, Sequence

from hbpo_jax import files
from hbpo_jax.data import readers as data
from hbpo_jax.eval.scoring import BenchmarkResult, sort_levels

FILES = {"json": "results.json", "markdown": "results.md", "plot": "accuracy_vs_tokens.png",
         "responses": "responses.jsonl"}
NONE = "–"  # an empty cell


# ----------------------------------------------------------------------------- tables

def table(head: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """The lines of a markdown table (every table of the package is built here)."""
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
            *("| " + " | ".join(map(str, r)) + " |" for r in rows)]


def cell(s: dict | None) -> str:
    """"accuracy % / mean tokens" of a summary (or of one of its by_level entries)."""
    if s is None or s.get("problems", 1) == 0:
        return NONE
    return f"{s['accuracy']:.1f} / {s['mean_tokens']:.0f}"


def _ordered(values: Iterable[str]) -> list[str]:
    seen: list[str] = []
    for v in values:
        if v not in seen:
            seen.append(v)
    return seen


def by_key(summaries: Sequence[dict]) -> dict:
    """{(benchmark, mode): summary}."""
    return {(s.get("benchmark", ""), s["mode"]): s for s in summaries}


def _mean(got: Sequence[dict]) -> dict | None:
    if not got:
        return None
    return {"accuracy": sum(s["accuracy"] for s in got) / len(got),
            "mean_tokens": sum(s["mean_tokens"] for s in got) / len(got)}


def _level(s: dict | None, level: str | None) -> dict | None:
    return s if s is None or level is None else s["by_level"].get(level)


def markdown(summaries: Sequence[dict], *, before: Sequence[dict] | None = None) -> str:
    """Tables of an evaluation: modes x benchmarks ("accuracy % / mean tokens", plus a mean column
    over benchmarks when there are several), one modes x levels table per benchmark with levels,
    then every number with its 95% interval and median tokens.

    before: the same evaluation of the starting policy (the training loop's results.md); every
    cell then reads "before → after", and the last table lists both policies.
    """
    after = by_key(summaries)
    prior = None if before is None else by_key(before)
    modes, benches = _ordered(m for _, m in after), _ordered(b for b, _ in after)
    several = len(benches) > 1

    def show(pick):  # pick(summaries by key) -> the summary a cell shows, or None
        return cell(pick(after)) if prior is None else f"{cell(pick(prior))} → {cell(pick(after))}"

    rows = []
    for m in modes:
        row = [m] + [show(lambda d, k=(b, m): d.get(k)) for b in benches]
        if several:
            row.append(show(lambda d: _mean([d[(b, m)] for b in benches if (b, m) in d])))
        rows.append(row)
    when = "" if prior is None else ", before → after training"
    lines = [f"Accuracy % / mean response tokens (pass@1){when}.", ""]
    lines += table(["mode", *benches] + (["mean"] if several else []), rows)
    for b in benches:
        levels = sort_levels({lv for (bb, _), s in after.items() if bb == b for lv in s["by_level"]})
        if levels:
            lines += ["", f"{b} by level (accuracy % / mean tokens{when}):", ""]
            lines += table(["mode", *(f"level {lv}" for lv in levels)],
                           [[m] + [show(lambda d, k=(b, m), lv=lv: _level(d.get(k), lv)) for lv in levels]
                            for m in modes if (b, m) in after])
    policies = [("", summaries)] if prior is None else [("before", before), ("after", summaries)]
    head = ["benchmark", "mode", "problems × samples", "accuracy %", "95% interval", "mean tokens",
            "median tokens", "format errors"]
    lines += [""] + table(head if prior is None else ["policy", *head],
                          ([w] * (prior is not None) + _detail(s) for w, group in policies for s in group))
    return "\n".join(lines) + "\n"


def before_after_markdown(before: Sequence[dict], after: Sequence[dict]) -> str:
    """The training loop's results.md: `markdown(after, before=before)`."""
    return markdown(after, before=before)


def _detail(s: dict) -> list[str]:
    ci = NONE if s.get("ci95") is None else f"{s['ci95'][0]:.1f}–{s['ci95'][1]:.1f}"
    return [s.get("benchmark", ""), s["mode"], f"{s['problems']} × {s['samples']}", f"{s['accuracy']:.1f}",
            ci, f"{s['mean_tokens']:.1f}", f"{s['median_tokens']:.1f}",
            f"{100 * s.get('format_error_rate', 0.0):.1f}%"]


# ----------------------------------------------------------------------------- files

def plot(summaries: Sequence[dict], path: str) -> str:
    """Accuracy (with its 95% interval) against mean tokens: one series per benchmark, one point
    per mode, labelled. Writes a PNG (a matplotlib Figure of its own: the process's backend stays)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.4), dpi=120)
    ax = fig.subplots()
    for b in _ordered(s["benchmark"] for s in summaries):
        pts = [s for s in summaries if s["benchmark"] == b and s["problems"]]
        xs = [s["mean_tokens"] for s in pts]
        ys = [s["accuracy"] for s in pts]
        err = [[y - (s["ci95"] or [y, y])[0] for y, s in zip(ys, pts)],
               [(s["ci95"] or [y, y])[1] - y for y, s in zip(ys, pts)]]
        ax.errorbar(xs, ys, yerr=err, fmt="o", capsize=3, label=b)
        for x, y, s in zip(xs, ys, pts):
            ax.annotate(s["mode"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_ylim(-3, 103)
    ax.set_xlabel("mean response tokens")
    ax.set_ylabel("pass@1 accuracy (%)")
    ax.set_title("accuracy against tokens, per prompting mode")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path


def jsonable(x):
    """`x` with NaN / inf as None (strict JSON), through dicts, lists and tuples."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    return x


def write(results: Sequence[BenchmarkResult], out_dir: str, *, meta: dict | None = None,
          skipped: dict | None = None) -> dict[str, str]:
    """Writes the four files of FILES under out_dir; returns {kind: path}.

    meta: run settings stored in results.json; skipped: {benchmark: SkipReport summary line}."""
    summaries = [r.summary() for r in results]
    # out_dir may be gs://: the files are written in a local folder, then uploaded (files.staged_dir).
    with files.staged_dir(out_dir) as local:
        paths = {k: os.path.join(local, v) for k, v in FILES.items()}
        files.write_json(paths["json"], jsonable({"meta": meta or {}, "skipped": skipped or {},
                                                  "results": summaries}))
        files.write_text(paths["markdown"], markdown(summaries))
        plot(summaries, paths["plot"])
        data.write_jsonl(paths["responses"], (row for r in results for row in r.rows()))
    return {k: files.join(out_dir, v) for k, v in FILES.items()}
