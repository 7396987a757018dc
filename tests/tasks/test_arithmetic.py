"""The synthetic arithmetic task: determinism, correctness, lengths, format."""
import re

import numpy as np
import pytest

from hbpo_jax.tasks import arithmetic as A

FORMAT = re.compile(r"<think>(?:.|\n)*?\n</think>\n\\boxed\{(\d+)\}")


def _eval(expr: str) -> int:
    total = int(re.match(r"\d+", expr).group(0))
    for sign, num in re.findall(r"([+-])(\d+)", expr):
        total += int(num) if sign == "+" else -int(num)
    return total


def test_deterministic():
    assert A.make_dataset(50, 3) == A.make_dataset(50, 3)
    assert A.make_dataset(50, 3) != A.make_dataset(50, 4)
    assert A.sft_examples(30, 7) == A.sft_examples(30, 7)
    p = A.make_problem(0, 3)
    assert A.warm_start_response(p, 5) == A.warm_start_response(p, 5)


@pytest.mark.parametrize("difficulty", A.DIFFICULTIES)
def test_problem_answer_and_range(difficulty):
    rng = np.random.default_rng(difficulty)
    for _ in range(200):
        p = A.make_problem(rng, difficulty)
        expr = re.fullmatch(r"Compute (.*)\.", p["problem"]).group(1)
        assert len(re.findall(r"[+-]", expr)) == difficulty == p["difficulty"]
        assert p["answer"] == str(_eval(expr))
        assert all(0 <= s[3] <= A.MAX_TOTAL for s in A.steps(p))
        numbers = re.findall(r"\d+", expr)
        assert len(set(numbers)) == len(numbers)  # distinct: an operand is copied unambiguously
        assert p["solution"] == A.minimal_solution(p)


def test_dataset_columns_and_difficulty_mix():
    data = A.make_dataset(400, 0, difficulties=(1, 3, 5))
    assert all(set(r) == {"problem", "answer", "difficulty", "solution"} for r in data)
    assert {r["difficulty"] for r in data} == {1, 3, 5}
    assert all(isinstance(r["answer"], str) for r in data)


def test_solution_length_grows_with_difficulty():
    means = []
    for d in A.DIFFICULTIES:
        data = A.make_dataset(200, 1, difficulties=(d,))
        means.append(np.mean([len(A.minimal_solution(r)) for r in data]))
    assert all(a < b for a, b in zip(means, means[1:])), means


def test_needless_steps_keep_the_answer_and_lengthen():
    rng = np.random.default_rng(0)
    data = A.make_dataset(300, 2)
    ratios, saw_minimal = [], False
    for p in data:
        r = A.warm_start_response(p, rng)
        m = FORMAT.fullmatch(r)
        assert m and m.group(1) == p["answer"], r
        # every line inside think is a correct statement about this problem
        body = r.split("\n</think>")[0].split("\n")[1:]
        expr = p["problem"][len("Compute "):-1]
        allowed = {f"we need {expr}", f"answer {p['answer']}"}
        for step, line in zip(A.steps(p), A._lines(p)):
            allowed |= {line} | {k.format(line=line, c=step[3]) for k in A.NEEDLESS}
            a, sign, b, c = step
            assert c == (a + b if sign == "+" else a - b)
        assert set(body) <= allowed, (body, p)
        assert [x for x in body if x in A._lines(p)] == A._lines(p)
        ratios.append(len(r) / len(A.minimal_solution(p)))
        saw_minimal |= r == A.minimal_solution(p)
    assert 1.4 < np.mean(ratios) < 3.5, np.mean(ratios)
    assert saw_minimal  # short answers are in the warm-start distribution
    assert A.warm_start_response(data[0], rng, redundancy=0.0) == A.minimal_solution(data[0])


def test_sft_examples_format_and_prefix_mix():
    examples = A.sft_examples(600, 0)
    prefixes = [ex.prefix for ex in examples]
    assert 0.3 < np.mean([p == "" for p in prefixes]) < 0.5
    assert A.MINIMAL_PREFIX in prefixes
    assert {A.BUDGET_PREFIX.format(budget=b) for b in A.BUDGETS} <= set(prefixes)
    for ex in examples:
        assert ex.messages[0]["role"] == "user"
        assert ex.response.startswith(ex.prefix or "<think>")
        assert ex.response[len(ex.prefix):].startswith("\n" if ex.prefix else "<think>\n")
        assert ex.response.count("<think>") == 1 and ex.response.count("</think>") == 1
        answer = str(_eval(ex.messages[0]["content"][len("Compute "):-1]))
        assert ex.response.endswith(f"\n</think>\n\\boxed{{{answer}}}")


def test_reasoning_length_independent_of_budget():
    examples = A.sft_examples(4000, 1)
    by_budget = {}
    for ex in examples:
        if ex.prefix and ex.prefix != A.MINIMAL_PREFIX:
            body = ex.response[len(ex.prefix):]
            by_budget.setdefault(ex.prefix, []).append(body.count("\n"))
    means = [np.mean(v) for v in by_budget.values()]
    assert len(means) == len(A.BUDGETS)
    assert max(means) - min(means) < 0.1 * np.mean(means), means


def _lines_by_prefix(examples):
    out = {}
    for ex in examples:
        out.setdefault(ex.prefix, []).append(ex.response[len(ex.prefix):].count("\n"))
    return {k: float(np.mean(v)) for k, v in out.items()}


def test_budget_prior_orders_reasoning_length_by_budget_rank():
    lines = _lines_by_prefix(A.sft_examples(8000, 1, budget_prior=0.3))
    by_budget = [lines[A.BUDGET_PREFIX.format(budget=b)] for b in A.BUDGETS]
    assert by_budget == sorted(by_budget) and by_budget[0] < 0.85 * by_budget[-1], by_budget
    # The efficiency prefix gets the smallest budget's scale; natural responses are untouched.
    assert abs(lines[A.MINIMAL_PREFIX] - by_budget[0]) < 0.1 * by_budget[0]
    assert abs(lines[""] - _lines_by_prefix(A.sft_examples(8000, 1))[""]) < 0.05 * lines[""]


def test_budget_scales_set_each_budgets_redundancy():
    scales = (0.3, 0.7, 0.85, 1.0)
    lines = _lines_by_prefix(A.sft_examples(8000, 1, budget_prior=0.7, budget_scales=scales))
    full = _lines_by_prefix(A.sft_examples(8000, 1, budget_scales=(1.0,) * 4))
    by_budget = [lines[A.BUDGET_PREFIX.format(budget=b)] for b in A.BUDGETS]
    weak = _lines_by_prefix(A.sft_examples(8000, 1, budget_prior=0.3))
    weak = [weak[A.BUDGET_PREFIX.format(budget=b)] for b in A.BUDGETS]
    # Ordered, and 32 is further below 64 than the rank-spaced prior 0.3 puts it (x0.3 vs x0.7).
    assert by_budget == sorted(by_budget), by_budget
    assert by_budget[1] - by_budget[0] > 2 * (weak[1] - weak[0]), (by_budget, weak)
    # Full redundancy under every budget: as long as a natural response; the efficiency prefix
    # keeps budget_prior's scale (1 - 0.7), close to the smallest budget's 0.3.
    assert abs(by_budget[-1] - full[""]) < 0.05 * full[""]
    assert abs(lines[A.MINIMAL_PREFIX] - by_budget[0]) < 0.1 * by_budget[0]
    with pytest.raises(ValueError, match="one scale per budget"):
        A.sft_examples(10, 1, budget_scales=(0.5, 1.0))
