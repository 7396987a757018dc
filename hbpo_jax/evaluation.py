"""Accuracy and response length of a policy under each prompting mode, per difficulty level.

This is the paper's evaluation shape (accuracy % / mean tokens) at whatever scale: natural mode
(nothing pre-filled), efficiency prompting, and each budget prompt.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import numpy as np

from hbpo_jax import grading, rollout


@dataclasses.dataclass
class ModeResult:
    """One prompting mode over a set of problems. Arrays are per response, [problems * samples]."""

    mode: str  # "natural", "efficiency", or "budget=<b>"
    correct: np.ndarray
    format_ok: np.ndarray
    lengths: np.ndarray
    levels: np.ndarray

    @property
    def accuracy(self) -> float:
        return float(self.correct.mean() * 100) if self.correct.size else float("nan")

    @property
    def mean_tokens(self) -> float:
        return float(self.lengths.mean()) if self.lengths.size else float("nan")

    def by_level(self) -> dict[int, tuple[float, float]]:
        """{level: (accuracy %, mean tokens)}."""
        out = {}
        for level in sorted(set(self.levels.tolist())):
            sel = self.levels == level
            out[int(level)] = (float(self.correct[sel].mean() * 100), float(self.lengths[sel].mean()))
        return out

    def summary(self) -> dict:
        return {"mode": self.mode, "accuracy": self.accuracy, "mean_tokens": self.mean_tokens,
                "format_error_rate": float(1 - self.format_ok.mean()) if self.format_ok.size else 0.0,
                "by_level": {str(k): {"accuracy": a, "mean_tokens": t} for k, (a, t) in self.by_level().items()}}


def evaluate_mode(policy, tokenizer, records: Sequence[dict], *, mode: str, budget: int = 0,
                  max_new_tokens: int, key: jax.Array, temperature: float = 0.0, top_p: float = 1.0,
                  samples: int = 1, batch_size: int = 256, prefix_in_response: bool = True,
                  mesh=None, rules=None, workers: int = 1, timeout_s: float = 5.0) -> ModeResult:
    """Generates `samples` responses per record in `mode` ("natural", "efficiency", "fixed" with
    `budget`) and grades them. records: dicts with problem, answer and optionally difficulty/level.
    Lengths are counted as in training (the pre-filled prefix included when prefix_in_response)."""
    correct, fmt, lengths, levels = [], [], [], []
    for start in range(0, len(records), batch_size):
        chunk = list(records[start:start + batch_size])
        key, sub = jax.random.split(key)
        batch = rollout.budget_rollouts(
            policy, tokenizer, [r["problem"] for r in chunk], mode=mode,
            budgets=(budget,) if mode == "fixed" else (), samples_per_budget=samples,
            max_new_tokens=max_new_tokens, prefix_in_response=prefix_in_response,
            temperature=temperature, top_p=top_p, key=sub, mesh=mesh, rules=rules)
        truths = [chunk[i]["answer"] for i in np.asarray(batch.prompt_index)]
        grades = grading.grade_batch(list(batch.texts), truths, workers=workers, timeout_s=timeout_s)
        correct.append(np.array([g.correct for g in grades], bool))
        fmt.append(np.array([g.format_ok for g in grades], bool))
        lengths.append(np.asarray(batch.lengths))
        levels.append(np.array([int(chunk[i].get("difficulty", chunk[i].get("level", 0)) or 0)
                                for i in np.asarray(batch.prompt_index)]))
    name = f"budget_{budget}" if mode == "fixed" else mode
    cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0)
    return ModeResult(name, cat(correct), cat(fmt), cat(lengths), cat(levels))


def evaluate(policy, tokenizer, records, *, budgets: Sequence[int], key: jax.Array,
             modes: Sequence[str] = ("natural", "efficiency", "fixed"), **kwargs) -> list[ModeResult]:
    """evaluate_mode for natural, efficiency and each budget in `budgets` (mode "fixed")."""
    results = []
    for mode in modes:
        for budget in (budgets if mode == "fixed" else (0,)):
            key, sub = jax.random.split(key)
            results.append(evaluate_mode(policy, tokenizer, records, mode=mode, budget=budget, key=sub, **kwargs))
    return results


def before_after_table(before: list[dict], after: list[dict]) -> str:
    """Markdown from two lists of ModeResult.summary() dicts: natural mode per level, then every
    prompting mode overall, before and after training."""
    lines = ["| natural mode | accuracy before | accuracy after | mean tokens before | mean tokens after |",
             "|---|---|---|---|---|"]
    nat_b = next(r for r in before if r["mode"] == "natural")
    nat_a = next(r for r in after if r["mode"] == "natural")
    for level in sorted(nat_b["by_level"], key=int):
        b, a = nat_b["by_level"][level], nat_a["by_level"].get(level, {"accuracy": float("nan"), "mean_tokens": float("nan")})
        lines.append(f"| level {level} | {b['accuracy']:.1f}% | {a['accuracy']:.1f}% | "
                     f"{b['mean_tokens']:.1f} | {a['mean_tokens']:.1f} |")
    lines.append(f"| **all** | {nat_b['accuracy']:.1f}% | {nat_a['accuracy']:.1f}% | "
                 f"{nat_b['mean_tokens']:.1f} | {nat_a['mean_tokens']:.1f} |")
    lines += ["", "| prompt | accuracy before | accuracy after | mean tokens before | mean tokens after |",
              "|---|---|---|---|---|"]
    for b in before:
        a = next(r for r in after if r["mode"] == b["mode"])
        lines.append(f"| {b['mode']} | {b['accuracy']:.1f}% | {a['accuracy']:.1f}% | "
                     f"{b['mean_tokens']:.1f} | {a['mean_tokens']:.1f} |")
    return "\n".join(lines)
