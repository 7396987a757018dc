"""The run's figure, `<workdir>/training.png` beside results.md: reward, accuracy and mean response
length per budget over the steps (metrics.jsonl), and, when the before/after evaluation ran,
response tokens by problem difficulty before and after training (results.json)."""
from __future__ import annotations

import json
import os
import re
import tempfile

from hbpo_jax import files

PANELS = (("reward", "reward"), ("accuracy", "accuracy"), ("response_len", "mean response tokens"))


def _series(rows: list[dict], name: str) -> dict[str, tuple[list, list]]:
    """{label: (steps, values)} of `name`/budget_<b> columns (or `name` alone without them)."""
    pattern = re.compile(rf"^{re.escape(name)}/budget_(\d+)$")
    keys = sorted({k for r in rows for k in r if pattern.match(k)}, key=lambda k: int(pattern.match(k)[1]))
    keys = keys or ([name] if any(name in r for r in rows) else [])
    out = {}
    for key in keys:
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and r.get("step", 0) > 0]
        if pts:
            label = f"budget {pattern.match(key)[1]}" if pattern.match(key) else key
            out[label] = ([p[0] for p in pts], [p[1] for p in pts])
    return out


def _levels(before: list[dict], after: list[dict]):
    """[(label, levels, tokens before, tokens after)] per benchmark/mode with difficulty levels."""
    out = []
    for b in before:
        a = next((x for x in after if x.get("benchmark") == b.get("benchmark") and x["mode"] == b["mode"]), None)
        levels = [lv for lv in b.get("by_level", {}) if a and lv in a.get("by_level", {})]
        if levels:
            out.append((f"{b.get('benchmark', '')} {b['mode']}".strip(), levels,
                        [b["by_level"][lv]["mean_tokens"] for lv in levels],
                        [a["by_level"][lv]["mean_tokens"] for lv in levels]))
    return out


def write(workdir: str, path: str | None = None) -> str | None:
    """Draws the figure from the workdir's metrics.jsonl (and results.json); returns its path, or
    None when there are no step metrics yet."""
    # A Figure of its own, no pyplot: the process's backend (a notebook's inline one) stays as it is.
    from matplotlib.figure import Figure

    metrics = files.join(workdir, "metrics.jsonl")
    if not files.exists(metrics):
        return None
    rows = [json.loads(line) for line in files.read_text(metrics).splitlines() if line.strip()]
    panels = [(title, _series(rows, name)) for name, title in PANELS]
    panels = [(t, s) for t, s in panels if s]
    if not panels:
        return None
    results = files.join(workdir, "results.json")
    levels = []
    if files.exists(results):
        r = files.read_json(results)
        if r.get("before") and r.get("after"):
            levels = _levels(r["before"], r["after"])
    n = len(panels) + bool(levels)
    fig = Figure(figsize=(4.2 * n, 3.4))
    axes = fig.subplots(1, n, squeeze=False)
    for ax, (title, series) in zip(axes[0], panels):
        for label, (steps, values) in series.items():
            ax.plot(steps, values, marker="." if len(steps) < 30 else None, label=label)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    if levels:
        ax = axes[0][-1]
        for label, lv, before, after in levels:
            line, = ax.plot(lv, before, linestyle="--", marker="o", label=f"{label} before")
            ax.plot(lv, after, color=line.get_color(), marker="o", label=f"{label} after")
        ax.set_title("response tokens by difficulty")
        ax.set_xlabel("difficulty")
        ax.legend(fontsize=6)
    fig.tight_layout()
    path = path or files.join(workdir, "training.png")
    with tempfile.TemporaryDirectory() as tmp:  # savefig takes local paths; the workdir may be gs://
        local = os.path.join(tmp, "training.png")
        fig.savefig(local, dpi=110)
        files.copy_file(local, path)
    return path


__all__ = ["write"]
