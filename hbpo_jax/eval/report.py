"""Evaluation outputs: results.json, results.md (the paper's table layout), a PNG of accuracy
against tokens, and responses.jsonl (every response, graded).

All writers take `BenchmarkResult.summary()` dicts (or the results themselves for the jsonl), so
the report of a finished evaluation can be rebuilt from its results.json.
"""
from __future__ import annotations

import json
import math
import os
from typing import Iterable, Sequence

from hbpo_jax import data
from hbpo_jax.eval.evaluation import BenchmarkResult, sort_levels

FILES = {"json": "results.json", "markdown": "results.md", "plot": "accuracy_vs_tokens.png",
         "responses": "responses.jsonl"}


def _cell(s: dict | None) -> str:
    if s is None or s.get("problems", 0) == 0:
        return "–"
    return f"{s['accuracy']:.1f} / {s['mean_tokens']:.0f}"


def _ordered(values: Iterable[str]) -> list[str]:
    seen: list[str] = []
    for v in values:
        if v not in seen:
            seen.append(v)
    return seen


def markdown(summaries: Sequence[dict]) -> str:
    """Tables from summary dicts: modes x benchmarks ("accuracy % / mean tokens", plus a mean
    column over benchmarks when there are several), then one modes x levels table per benchmark
    with levels, then every number with its 95% interval and median tokens."""
    modes = _ordered(s["mode"] for s in summaries)
    benches = _ordered(s["benchmark"] for s in summaries)
    get = {(s["benchmark"], s["mode"]): s for s in summaries}
    several = len(benches) > 1
    head = ["mode", *benches] + (["mean"] if several else [])
    lines = ["Accuracy % / mean response tokens (pass@1).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in modes:
        cells = [_cell(get.get((b, m))) for b in benches]
        if several:
            got = [get[(b, m)] for b in benches if (b, m) in get]
            mean = {"problems": 1, "accuracy": sum(s["accuracy"] for s in got) / len(got),
                    "mean_tokens": sum(s["mean_tokens"] for s in got) / len(got)} if got else None
            cells.append(_cell(mean))
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    for b in benches:
        levels = sort_levels({lv for s in summaries if s["benchmark"] == b for lv in s["by_level"]})
        if not levels:
            continue
        lines += ["", f"{b} by level (accuracy % / mean tokens):", "",
                  "| mode | " + " | ".join(f"level {lv}" for lv in levels) + " |",
                  "|" + "---|" * (len(levels) + 1)]
        for m in modes:
            s = get.get((b, m))
            if s is not None:
                lines.append(f"| {m} | " + " | ".join(_cell(s["by_level"].get(lv)) for lv in levels) + " |")
    lines += ["", "| benchmark | mode | problems × samples | accuracy % | 95% interval | mean tokens "
              "| median tokens | format errors |", "|---|---|---|---|---|---|---|---|"]
    for s in summaries:
        ci = "–" if s["ci95"] is None else f"{s['ci95'][0]:.1f}–{s['ci95'][1]:.1f}"
        lines.append(f"| {s['benchmark']} | {s['mode']} | {s['problems']} × {s['samples']} | "
                     f"{s['accuracy']:.1f} | {ci} | {s['mean_tokens']:.1f} | {s['median_tokens']:.1f} | "
                     f"{100 * s.get('format_error_rate', 0.0):.1f}% |")
    return "\n".join(lines) + "\n"


def plot(summaries: Sequence[dict], path: str) -> str:
    """Accuracy (with its 95% interval) against mean tokens: one series per benchmark, one point
    per mode, labelled. Writes a PNG (matplotlib, Agg backend)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
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
    plt.close(fig)
    return path


def _jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def write(results: Sequence[BenchmarkResult], out_dir: str, *, meta: dict | None = None,
          skipped: dict | None = None) -> dict[str, str]:
    """Writes the four files of FILES under out_dir; returns {kind: path}.

    meta: run settings stored in results.json; skipped: {benchmark: SkipReport summary line}."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {k: os.path.join(out_dir, v) for k, v in FILES.items()}
    summaries = [r.summary() for r in results]
    tmp = paths["json"] + ".tmp"
    with open(tmp, "w") as f:
        json.dump(_jsonable({"meta": meta or {}, "skipped": skipped or {}, "results": summaries}), f, indent=2)
    os.replace(tmp, paths["json"])
    with open(paths["markdown"], "w") as f:
        f.write(markdown(summaries))
    plot(summaries, paths["plot"])
    data.write_jsonl(paths["responses"], (row for r in results for row in r.rows()))
    return paths
