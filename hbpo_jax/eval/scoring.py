"""Accuracy and response length of a policy under each prompting mode, per difficulty level.

This is the evaluation shape of the HBPO paper (arXiv 2507.15844, its tables: accuracy % /
mean tokens) at whatever scale: natural mode (nothing pre-filled), efficiency prompting, and each
budget prompt.

The steps of every evaluation (eval.run.evaluate runs them for before / after training, periodic
evaluations, launch/eval.py and ablations): `generate` responses -> `score` them (grading;
model-free, so fixed responses can be scored) -> `BenchmarkResult.summary()`; eval.report turns
summaries into tables and files.

Statistics of a BenchmarkResult (P problems x S samples):
  accuracy   pass@1 in %: the mean over samples of each problem's correctness, then the mean of
             those P per-problem means.
  ci95       normal approximation over the per-problem means: accuracy +- 1.96 * sd / sqrt(P),
             sd with ddof = 1, clipped to [0, 100]; None when P < 2. (With S = 1 it is the
             Wald interval; it is 0 wide when every problem scores the same.)
  tokens     mean and median over all P * S responses (counted as in training: the pre-filled
             prefix is included when rollout.prefix_in_response).
  by_level   the same statistics over the problems of each level (when the data has levels).
  dataset_score  (benchmarks with their own scorer, e.g. reasoning-gym's score_answer) the mean of
             that scorer over our extracted answers, in %, beside our accuracy.
Every summary names the answer-format policy that graded it (answer_format, grading.FORMATS).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Sequence

import jax
import numpy as np

from hbpo_jax.grading import hosts
from hbpo_jax.rollout import batch as rollout
from hbpo_jax.rollout.prompting import ModeSpec
from hbpo_jax.rollout.settings import RolloutSettings

log = logging.getLogger(__name__)


@dataclasses.dataclass
class BenchmarkResult:
    """One benchmark under one mode. P problems x S samples; arrays are numpy.

    ids, levels: P strings (levels None when the data has none).
    correct, format_ok: bool [P, S]; tokens: int [P, S]; texts, extracted: P lists of S.
    answer_format: the grading.FORMATS policy that graded; dataset_scores: float [P, S] of the
    benchmark's own scorer, or None.
    """

    benchmark: str
    mode: str
    budget: int
    ids: list
    levels: list
    correct: np.ndarray
    format_ok: np.ndarray
    tokens: np.ndarray
    texts: list
    extracted: list
    answer_format: str = "paper"
    dataset_scores: np.ndarray | None = None

    def summary(self) -> dict:
        """{benchmark, mode, budget, answer_format, **stats(all problems)[, dataset_score],
        by_level: {level: stats}}."""
        out = {"benchmark": self.benchmark, "mode": self.mode, "budget": self.budget,
               "answer_format": self.answer_format,
               **stats(self.correct, self.tokens, self.format_ok), "by_level": {}}
        if self.dataset_scores is not None and self.dataset_scores.size:
            out["dataset_score"] = float(self.dataset_scores.mean() * 100)
        levels = [lv for lv in self.levels if lv is not None]
        for level in sort_levels(set(levels)):
            sel = np.array([lv == level for lv in self.levels])
            out["by_level"][level] = stats(self.correct[sel], self.tokens[sel], self.format_ok[sel])
        return out

    def rows(self):
        """One dict per response (the responses.jsonl rows)."""
        for i, pid in enumerate(self.ids):
            for j in range(self.correct.shape[1]):
                yield {"benchmark": self.benchmark, "mode": self.mode, "id": pid, "level": self.levels[i],
                       "sample": j, "response": self.texts[i][j], "tokens": int(self.tokens[i, j]),
                       "extracted": self.extracted[i][j], "correct": bool(self.correct[i, j])}


def level_label(value) -> str | None:
    """A record's level as a table label: 3, 3.0, "3" and MATH's "Level 3" -> "3"; None (or a
    bool, or blank) -> None."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    if text.lower().startswith("level "):
        text = text[6:].strip()
    return text or None


def sort_levels(levels) -> list:
    """Numeric levels in numeric order, then the others alphabetically."""
    return sorted(levels, key=lambda s: (0, float(s), "") if _is_number(s) else (1, 0.0, s))


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except (TypeError, ValueError):
        return False


def stats(correct: np.ndarray, tokens: np.ndarray, format_ok: np.ndarray | None = None) -> dict:
    """Pass@1 accuracy (%), its 95% interval and token statistics of bool correct [P, S] and
    tokens [P, S] (see the module docstring)."""
    correct, tokens = np.asarray(correct, float), np.asarray(tokens, float)
    p = correct.shape[0]
    per_problem = correct.mean(axis=1) * 100 if p else np.zeros(0)
    acc = float(per_problem.mean()) if p else float("nan")
    ci = None
    if p >= 2:
        half = 1.96 * float(per_problem.std(ddof=1)) / math.sqrt(p)
        ci = [max(acc - half, 0.0), min(acc + half, 100.0)]
    out = {"accuracy": acc, "ci95": ci, "mean_tokens": float(tokens.mean()) if p else float("nan"),
           "median_tokens": float(np.median(tokens)) if p else float("nan"),
           "problems": int(p), "samples": int(correct.shape[1]) if correct.ndim == 2 else 0}
    if format_ok is not None and p:
        out["format_error_rate"] = float(1 - np.asarray(format_ok, float).mean())
    return out


def score(benchmark: str, mode: ModeSpec | str, records: Sequence[dict], texts: Sequence[str],
          tokens, *, samples: int = 1, workers: int | None = 1, timeout_s: float = 5.0,
          answer_format: str = "paper", scorer=None) -> BenchmarkResult:
    """Grades fixed responses (no model): texts and tokens are [P * S], prompt-major (problem 0's
    S samples first), as `generate` returns them. records: dicts with answer (and id, level or
    difficulty). answer_format: the grading.FORMATS policy; scorer: the benchmark's own,
    (record, extracted answer or None) -> [0, 1], also run on every response when given."""
    mode = mode if isinstance(mode, ModeSpec) else ModeSpec(str(mode), str(mode))
    p, s = len(records), int(samples)
    if len(texts) != p * s or np.size(tokens) != p * s:
        raise ValueError(f"{len(texts)} texts and {np.size(tokens)} token counts for {p} problems x {s} samples.")
    truths = [str(r["answer"]) for r in records for _ in range(s)]
    # Each process grades a share; all get the same grades (collective with several processes).
    grades = hosts.grade_batch(list(texts), truths, workers=workers, timeout_s=timeout_s,
                                   answer_format=answer_format)
    shape = (p, s)
    theirs = None
    if scorer is not None:
        theirs = np.array([scorer(records[i // s], g.extracted) for i, g in enumerate(grades)],
                          np.float64).reshape(shape)
    grid = lambda xs: [list(xs[i * s:(i + 1) * s]) for i in range(p)]  # noqa: E731
    return BenchmarkResult(
        benchmark=benchmark, mode=mode.name, budget=mode.budget,
        ids=[str(r.get("id", i)) for i, r in enumerate(records)],
        levels=[level_label(r.get("level", r.get("difficulty"))) for r in records],
        correct=np.array([g.correct for g in grades], bool).reshape(shape),
        format_ok=np.array([g.format_ok for g in grades], bool).reshape(shape),
        tokens=np.asarray(tokens, np.int64).reshape(shape), texts=grid(list(texts)),
        extracted=grid([g.extracted for g in grades]), answer_format=answer_format,
        dataset_scores=theirs)


def generate(policy, tokenizer, problems: Sequence[str], mode: ModeSpec, settings: RolloutSettings, *,
             key: jax.Array, batch_size: int = 256, mesh=None, rules=None) -> tuple[list, np.ndarray]:
    """settings.samples_per_budget responses per problem in `mode` (its mode and budget set on
    `settings`), `batch_size` problems per rollout call.

    policy: an nnx model or (graphdef, state). Returns (texts [P * S], lengths int32 [P * S]),
    prompt-major. Every process must call it (the sampler is collective)."""
    settings = settings.replace(mode=mode.mode, budgets=(mode.budget,) if mode.budget else ())
    texts, lengths = [], []
    batches, t0 = -(-len(problems) // batch_size), time.time()
    for start in range(0, len(problems), batch_size):
        done = start // batch_size
        if batches > 1:  # a real model's batch takes minutes: show where it is, with an ETA
            eta = f", ETA {(time.time() - t0) / done * (batches - done) / 60:.1f} min" if done else ""
            log.info("eval %s: batch %d/%d (%.0f s so far%s)", mode.name, done + 1, batches, time.time() - t0, eta)
        key, sub = jax.random.split(key)
        batch = rollout.budget_rollouts(policy, tokenizer, list(problems[start:start + batch_size]), settings,
                                        key=sub, mesh=mesh, rules=rules)
        texts += list(batch.texts)
        lengths.append(np.asarray(batch.lengths))
    return texts, np.concatenate(lengths) if lengths else np.zeros(0, np.int32)


def max_new_tokens(requested: int, max_positions: int, prompt_tokens: int) -> int:
    """`requested` response tokens, capped so prompt + response fit the model's positions
    (logged when it cuts)."""
    room = int(max_positions) - int(prompt_tokens)
    if room < 1:
        raise ValueError(f"a prompt of {prompt_tokens} tokens leaves no room in the model's "
                         f"{max_positions} positions.")
    if requested > room:
        log.warning("eval: %d response tokens do not fit the model's %d positions after a %d-token "
                    "prompt; generating %d.", requested, max_positions, prompt_tokens, room)
    return min(int(requested), room)
