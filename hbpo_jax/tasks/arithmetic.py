"""A synthetic reasoning task for the tiny end-to-end run: chained additions and subtractions.

Difficulty d is the number of operations: "Compute 7+2-3+1." (d = 3). The minimal worked solution
has one line per operation with the running result, inside `<think>`, then the boxed answer:

    <think>
    7+2=9
    9-3=6
    6+1=7
    </think>
    \\boxed{7}

Warm-start (SFT) responses add needless steps of random length, as real reasoning models do: a
restatement of the question, re-checks of the step just done ("check 9-3=6", "again 9-3=6"),
restatements of the running result ("so far 6", "yes 6") and of the answer. They only copy facts
already written, so they are always correct and never change the answer; RL can learn to drop
them. After each operation they come in a fixed order, each with a probability (CONTINUE) once
the one before was written: 2.0 per operation on average, so a sampled warm-start response is
~2.5-3x its minimal solution, with short ones common enough for RL to find, while a greedy one
writes them all. Numbers in a question are distinct, so copying an operand is unambiguous.

Budget-mode SFT responses start with the budget sentence that rollouts pre-fill; by default the
reasoning that follows is drawn independently of the stated budget (SFT teaches the format, RL the
meaning), and `sft_examples(budget_prior=..., budget_scales=...)` lets smaller budgets write fewer
needless lines (a length prior, as instruction-tuned models have). The text after the pre-filled
part always starts with a newline, so the prefix tokenises the same way whether or not the rest
follows.

Records use DeepScaleR's column names (`problem`, `answer`, `solution`) plus `difficulty`.
Everything is deterministic given seeds (numpy PCG64 generators).
"""
from __future__ import annotations

import re
from typing import NamedTuple, Sequence

import numpy as np

from hbpo_jax.rollout.prompting import BUDGET_PREFIX
from hbpo_jax.rollout.prompting import EFFICIENCY_PREFIX as MINIMAL_PREFIX

BUDGETS = (32, 64, 128, 160)
DIFFICULTIES = (1, 2, 3, 4)
MAX_TOTAL = 9  # running results stay in [0, MAX_TOTAL]: single digits
MAX_OPERAND = 9
DISTINCT = True  # the numbers of a question are all different
# Needless lines after an operation "a+b=c", in this order; the j-th is written with probability
# CONTINUE[j] once the (j-1)-th was (scaled by `redundancy`). Each kind is a different text, so the
# model knows how far along it is without counting repeated lines; each continuation probability is
# above 1/2, so a greedy warm start writes them all (long, like a verbose reasoning model), and
# they fall off, so length pressure flips the last ones first (graded lengths under RL).
NEEDLESS = ("check {line}", "so far {c}", "again {line}", "yes {c}")
CONTINUE = (0.85, 0.7, 0.6, 0.55)  # mean 2.0 needless lines per operation
OPENING = 0.5  # P(restating the question first) and P(restating the answer last)
REDUNDANCY = 1.0  # scales CONTINUE and OPENING; 0 gives the minimal solution
MAX_EXTRA_PER_STEP = len(NEEDLESS)

_EXPR = re.compile(r"Compute (\d+(?:[+-]\d+)+)\.")
_TERM = re.compile(r"([+-])(\d+)")


def _as_rng(rng) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def make_problem(rng, difficulty: int, *, max_total: int = MAX_TOTAL,
                 max_operand: int = MAX_OPERAND, distinct: bool = DISTINCT) -> dict:
    """One problem with `difficulty` operations on numbers in [1, max_operand].

    rng: a numpy Generator or an int seed. Every running result stays in [0, max_total], so the
    answer is a non-negative integer. distinct: the numbers written in the question are all
    different (no operand to confuse with another when a step copies it from the question).
    Returns {problem, answer (str), difficulty, solution}.
    """
    if difficulty < 1:
        raise ValueError(f"difficulty must be >= 1, got {difficulty}.")
    if max_total < max_operand:
        raise ValueError(f"max_total ({max_total}) must be >= max_operand ({max_operand}).")
    rng = _as_rng(rng)
    if distinct and difficulty + 1 > max_operand:
        raise ValueError(f"{difficulty + 1} distinct numbers do not fit in [1, {max_operand}].")
    while True:  # retry the rare dead ends (no unused number fits in range)
        total = int(rng.integers(1, max_operand + 1))
        used, expr = {total}, str(total)
        for _ in range(difficulty):
            options = {}
            for sign in "+-":
                room = max_total - total if sign == "+" else total
                options[sign] = [b for b in range(1, min(room, max_operand) + 1)
                                 if not (distinct and b in used)]
            sign = "+" if rng.random() < 0.5 else "-"
            if not options[sign]:  # no room that way: turn round
                sign = "-" if sign == "+" else "+"
            if not options[sign]:
                break
            b = int(rng.choice(options[sign]))
            total = total + b if sign == "+" else total - b
            used.add(b)
            expr += f"{sign}{b}"
        else:
            break
    problem = {"problem": f"Compute {expr}.", "answer": str(total), "difficulty": int(difficulty)}
    problem["solution"] = minimal_solution(problem)
    return problem


def steps(problem: dict) -> list[tuple[int, str, int, int]]:
    """The operations of a problem as (left, sign, right, result) tuples, in order."""
    m = _EXPR.fullmatch(problem["problem"])
    if m is None:
        raise ValueError(f"not an arithmetic-task problem: {problem['problem']!r}")
    expr = m.group(1)
    total = int(re.match(r"\d+", expr).group(0))
    out = []
    for sign, num in _TERM.findall(expr):
        b = int(num)
        new = total + b if sign == "+" else total - b
        out.append((total, sign, b, new))
        total = new
    return out


def _check(step) -> str:
    a, sign, b, c = step
    return f"{a}{sign}{b}={c}"


def _lines(problem: dict) -> list[str]:
    """One line per operation: "a+b=c" with the running result c."""
    return [_check(step) for step in steps(problem)]


def minimal_solution(problem: dict) -> str:
    """The shortest correct response: `<think>` + one line per operation + `</think>` + boxed."""
    body = "".join(f"\n{line}" for line in _lines(problem))
    return f"<think>{body}\n</think>\n\\boxed{{{problem['answer']}}}"


def warm_start_response(problem: dict, rng, *, prefix: str | None = None,
                        redundancy: float = REDUNDANCY) -> str:
    """A correct response with needless steps of random length, as an SFT target.

    prefix: None for a natural response (it opens with `<think>`), else the pre-filled text that
    opens the think part (BUDGET_PREFIX / MINIMAL_PREFIX); it is kept verbatim at the start.
    redundancy: scales the probabilities of the needless lines (NEEDLESS after each operation,
    CONTINUE; a restatement of the question and of the answer, OPENING); 0 gives the minimal
    solution. Returns text ending in `\\boxed{ans}`.
    """
    rng = _as_rng(rng)
    ops = steps(problem)
    expr = _EXPR.fullmatch(problem["problem"]).group(1)
    lines = []
    if rng.random() < OPENING * redundancy:
        lines.append(f"we need {expr}")
    for step, line in zip(ops, _lines(problem)):
        lines.append(line)
        for kind, p in zip(NEEDLESS, CONTINUE):
            if not rng.random() < p * redundancy:
                break
            lines.append(kind.format(line=line, c=step[3]))
    if rng.random() < OPENING * redundancy:
        lines.append(f"answer {problem['answer']}")
    head = "<think>" if prefix is None else prefix
    body = "".join(f"\n{line}" for line in lines)
    return f"{head}{body}\n</think>\n\\boxed{{{problem['answer']}}}"


def make_dataset(n: int, seed: int, difficulties: Sequence[int] = DIFFICULTIES, **kwargs) -> list[dict]:
    """n problems, difficulty uniform over `difficulties`: [{problem, answer, difficulty, solution}].

    kwargs go to make_problem (max_total, max_operand).
    """
    rng = np.random.default_rng(seed)
    diffs = rng.choice(np.asarray(difficulties), size=n)
    return [make_problem(rng, int(d), **kwargs) for d in diffs]


class SFTExample(NamedTuple):
    """One SFT example. `response` is the whole assistant text (starting with `prefix`); `prefix`
    is the part a rollout pre-fills ('' for natural mode), which gets no loss."""

    messages: list[dict]
    response: str
    prefix: str


def prompt_messages(problem: dict) -> list[dict]:
    """The chat messages of a problem: one user turn holding the question."""
    return [{"role": "user", "content": problem["problem"]}]


def sft_examples(n: int, seed: int, difficulties: Sequence[int] = DIFFICULTIES, *,
                 budgets: Sequence[int] = BUDGETS, natural_frac: float = 0.4,
                 minimal_frac: float = 0.1, redundancy: float = REDUNDANCY, budget_prior: float = 0.0,
                 budget_scales: Sequence[float] = (), **kwargs) -> list[SFTExample]:
    """n warm-start examples: a `natural_frac` share of natural responses, `minimal_frac` with the
    efficiency prefix, the rest with a budget prefix for a budget uniform over `budgets`.

    budget_prior: how much a prefix shortens the reasoning. 0: the length is independent of the
    prefix; p > 0: the redundancy under the k-th smallest of K budgets is scaled by
    1 - p * (K - 1 - k) / (K - 1), under the efficiency prefix by 1 - p (a length prior, as
    instruction-tuned models have; spaced by rank).
    budget_scales: the redundancy scale under each budget, smallest budget first (one per distinct
    budget); replaces the rank spacing of budget_prior, which still sets the efficiency prefix's.
    kwargs go to make_problem."""
    ranked = sorted(set(int(b) for b in budgets))
    if budget_scales and len(budget_scales) != len(ranked):
        raise ValueError(f"budget_scales needs one scale per budget {ranked}, got {tuple(budget_scales)}")
    rng = np.random.default_rng(seed)
    problems = make_dataset(n, seed + 1_000_003, difficulties, **kwargs)
    out = []
    for problem in problems:
        u = rng.random()
        scale = 1.0
        if u < natural_frac:
            prefix = ""
        elif u < natural_frac + minimal_frac:
            prefix, scale = MINIMAL_PREFIX, 1.0 - budget_prior
        else:
            budget = int(rng.choice(np.asarray(budgets)))
            prefix = BUDGET_PREFIX.format(budget=budget)
            if budget_scales:
                scale = float(budget_scales[ranked.index(budget)])
            else:
                steps_below_max = len(ranked) - 1 - ranked.index(budget)
                scale = 1.0 - budget_prior * (steps_below_max / (len(ranked) - 1) if len(ranked) > 1 else 0.0)
        response = warm_start_response(problem, rng, prefix=prefix or None, redundancy=redundancy * scale)
        out.append(SFTExample(prompt_messages(problem), response, prefix))
    return out


def corpus_texts(n: int = 2000, seed: int = 0, difficulties: Sequence[int] = DIFFICULTIES,
                 budgets: Sequence[int] = BUDGETS) -> list[str]:
    """Task text to train a tokenizer on: questions, warm-start responses with every prefix."""
    texts = [MINIMAL_PREFIX] + [BUDGET_PREFIX.format(budget=b) for b in budgets]
    for ex in sft_examples(n, seed, difficulties, budgets=budgets):
        texts += [ex.messages[0]["content"], ex.response]
    return texts
