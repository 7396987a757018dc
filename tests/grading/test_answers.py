"""Tests of hbpo_jax.grading.answers: extraction, a careful grader's verdicts, hostile input, the pool."""

import os
import signal
import time

import pytest

from hbpo_jax.grading import answers as G
from hbpo_jax.grading import pool as P


def resp(answer: str, thinking: str = "Let me think step by step.") -> str:
    return f"<think>{thinking}</think>\nSo the answer is $\\boxed{{{answer}}}$."


# (boxed answer, ground truth, a careful human's verdict)
CASES = [
    # integers and signs
    ("42", "42", True), ("41", "42", False), ("-3", "-3", True), ("3", "-3", False),
    ("+7", "7", True), ("042", "42", True),
    # decimals and fractions
    ("0.5", "\\frac{1}{2}", True), (".5", "0.50", True), ("0.50", ".5", True),
    ("\\dfrac{3}{4}", "\\frac{3}{4}", True), ("\\tfrac{3}{4}", "0.75", True),
    ("\\frac34", "\\frac{3}{4}", True), ("3/4", "\\frac{3}{4}", True),
    ("-\\frac{1}{2}", "\\frac{-1}{2}", True), ("\\frac{2}{4}", "\\frac{1}{2}", True),
    ("0.333", "\\frac{1}{3}", False), ("\\frac{1}{3}", "\\frac{1}{2}", False),
    ("2.5", "\\frac{5}{2}", True), ("1.25", "1.2500", True),
    # percentages (see the module docstring for the rule)
    ("50\\%", "50\\%", True), ("50", "50\\%", True), ("0.5", "50\\%", True),
    ("50\\%", "50", True), ("0.5", "50", False), ("50\\%", "0.5", True), ("40\\%", "50\\%", False),
    ("50 percent", "50\\%", True),
    # thousands separators, dollars
    ("1,000", "1000", True), ("1{,}000", "1000", True), ("1\\,000", "1000", True),
    ("\\$1,250", "1250", True), ("12,500.5", "12500.5", True), ("1,001", "1000", False),
    # radicals, pi, expressions
    ("2\\sqrt{2}", "\\sqrt{8}", True), ("\\sqrt2", "\\sqrt{2}", True),
    ("\\frac{\\sqrt{3}}{2}", "\\frac{\\sqrt3}{2}", True), ("\\sqrt{3}", "\\sqrt{2}", False),
    ("\\frac{\\pi}{2}", "\\frac{1}{2}\\pi", True), ("2\\pi", "2 \\pi", True), ("π", "\\pi", True),
    ("3.14", "\\pi", False), ("x^2+2x+1", "(x+1)^2", True), ("b+a", "a+b", True),
    ("2x", "x", False), ("\\frac{1}{\\sqrt{2}}", "\\frac{\\sqrt{2}}{2}", True),
    # leading variable, trailing period, spacing/left-right
    ("x = 5", "5", True), ("x=5.", "5", True), ("\\left( 1, 2 \\right)", "(1,2)", True),
    ("5\\!", "5", True),
    # tuples, intervals, sets
    ("(1, 2)", "(1,2)", True), ("(2, 1)", "(1,2)", False), ("(\\frac12, 3)", "(0.5, 3)", True),
    ("[1, 2)", "[1,2)", True), ("(1, 2]", "[1,2]", False), ("(-\\infty, 3]", "(-\\infty,3]", True),
    ("\\{1, 2\\}", "\\{2, 1\\}", True), ("(1,2,3)", "(1,2)", False),
    # units, degrees, text
    ("5 \\text{ cm}", "5", True), ("10\\text{ meters}", "10", True), ("12 \\mbox{ inches}", "12", True),
    ("90^\\circ", "90", True), ("90^{\\circ}", "90", True), ("45°", "45", True),
    ("30^\\circ", "45", False), ("\\text{Monday}", "Monday", True), ("monday", "\\text{Monday}", True),
    ("\\text{Tuesday}", "Monday", False), ("\\textbf{(B)}", "B", True), ("(C)", "B", False),
    ("5\\text{ dollars}", "5", True),
]


def test_at_least_sixty_cases():
    assert len(CASES) >= 60


@pytest.mark.parametrize("answer,truth,want", CASES)
def test_careful_grader(answer, truth, want):
    r = G.grade(resp(answer), truth)
    assert r.format_ok
    assert r.correct is want, (answer, truth, r)


def test_grade_batch_agrees_with_grade():
    got = G.grade_batch([resp(a) for a, _, _ in CASES], [t for _, t, _ in CASES], workers=2)
    assert [r.correct for r in got] == [w for _, _, w in CASES]


# ---------------------------------------------------------------------------- extraction

@pytest.mark.parametrize("text,want", [
    ("<think>x</think> \\boxed{7}", "7"),
    ("<think>x</think> \\boxed {7}", "7"),
    ("<think>x</think> \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("<think>x</think> \\boxed{1} then \\boxed{2}", "2"),                 # last box
    ("<think>x</think> \\fbox{3}", "3"),
    ("<think>x</think> \\boxed{1} \\fbox{4}", "4"),
    ("<think>\\boxed{9}</think> \\boxed{5}", "5"),                        # box in thinking ignored
    ("<think>\\boxed{9}</think> no box here", None),                      # only inside thinking
    ("<think>x</think> the answer is 5", None),                           # no box
    ("no think tag \\boxed{5}", None),                                    # no </think>
    ("<think>a</think> \\boxed{1} </think> \\boxed{2}", "2"),             # after the FIRST tag
    ("<think>x</think> \\boxed{\\{1,2\\}}", "\\{1,2\\}"),                  # escaped braces
    ("<think>x</think> \\boxed{\\frac{1}{", None),                         # unbalanced
    ("<think>x</think> \\boxed{a{b{c}}d}", "a{b{c}}d"),                   # nested
    ("<think>x</think> \\boxed{}", ""),
])
def test_extract_answer(text, want):
    assert G.extract_answer(text) == want


def test_format_errors():
    assert G.grade("<think>long thinking, cut off at L_max", "5") == G.GradeResult(False, False, None)
    assert not G.grade("<think>\\boxed{5}</think> The answer is 5.", "5").format_ok
    r = G.grade("<think>x</think>\\boxed{}", "5")
    assert r.format_ok and not r.correct


def test_extraction_is_linear_on_huge_inputs():
    huge = [
        "<think>" + "a" * 1_000_000 + "</think>\\boxed{3}",
        "<think>x</think>\\boxed{" + "{" * 1_000_000,
        "<think>x</think>\\boxed{" + "{" * 500_000 + "}" * 500_000 + "}",
        "<think>x</think>" + "\\boxed{1" * 100_000,
        "<think>x</think>" + "\\boxed" + " " * 1_000_000,
    ]
    t0 = time.perf_counter()
    got = [G.extract_answer(h) for h in huge]
    assert time.perf_counter() - t0 < 10.0  # generous: a quadratic scan would take hours
    assert got[0] == "3" and got[1] is None and got[4] is None
    assert len(got[2]) == 1_000_000 and got[3] is None


# ---------------------------------------------------------------------------- hostile input

HOSTILE = [
    (resp("9^9^9^9"), "1"),
    (resp("9^{9^{9^{9}}}"), "1"),
    (resp("2^{99999999}"), "2"),
    ("<think>x</think>\\boxed{" + "{" * 1_000_000 + "1" + "}" * 1_000_000 + "}", "1"),
    ("<think>x</think>\\boxed{" + "{" * 1_000_000, "1"),
    ("<think>" + "wait, " * 200_000 + "</think>\\boxed{7}", "7"),  # > 1 MB response
    (resp("\\frac{1}{"), "1"),
    (resp("\\frac{}"), "1"),
    (resp("\\sqrt{\\sqrt{\\sqrt{}}}^{{}}"), "1"),
    (resp("x" * 600), "x"),
    (resp("\\boxed{\\boxed{\\boxed{3}}}"), "3"),
    (resp("(10^{10})!"), "1"),
    (resp("\\frac{1}{0}"), "1"),
]


@pytest.mark.parametrize("workers", [0, 2])
def test_hostile_batch_is_bounded_and_never_raises(workers):
    timeout_s = 2.0
    t0 = time.perf_counter()
    got = G.grade_batch([h for h, _ in HOSTILE], [t for _, t in HOSTILE], workers=workers,
                        timeout_s=timeout_s)
    elapsed = time.perf_counter() - t0
    # Generous functional bound: items run one after another in the worst case.
    assert elapsed < len(HOSTILE) * (timeout_s + 1.0)
    assert len(got) == len(HOSTILE)
    by_answer = {i: r for i, r in enumerate(got)}
    assert not any(r.correct for i, r in by_answer.items() if i not in (5, 10))
    assert by_answer[5].correct and by_answer[10].correct  # long but legitimate responses
    assert by_answer[0].status == "refused" and by_answer[2].status == "refused"
    assert not by_answer[4].format_ok and not by_answer[6].format_ok


def test_symbolic_safe():
    assert not G.symbolic_safe("9^9^9^9")
    assert not G.symbolic_safe("9^{9^{9}}")
    assert not G.symbolic_safe("2**3**4")
    assert not G.symbolic_safe("10^{123456}")
    assert not G.symbolic_safe("123456!")
    assert not G.symbolic_safe("1" * 600)
    assert G.symbolic_safe("2^{10} + x^2")
    assert G.symbolic_safe("\\frac{\\sqrt{2}}{2}")


def test_inline_timeout_stops_slow_symbolic_work():
    # Bypass the hostile-input guard to exercise the alarm itself: 9^(9^9) is slow in sympy.
    t0 = time.perf_counter()
    ok, status = G.symbolic_with_alarm("9^{9^{9}}", "1", 0.5)
    assert time.perf_counter() - t0 < 0.5 + 5.0
    assert (ok, status) == (False, "timeout")


# ---------------------------------------------------------------------------- the pool

def test_pool_kills_hung_worker_and_keeps_other_items():
    with P.GradingPool(2) as pool:
        # Both workers must be ready: a worker still importing would never be handed an item.
        assert pool.wait_ready(60.0)
        warm = pool.map([("b+a", "a+b")] * 2, 5.0)
        assert [r[:2] for r in warm] == [(True, "ok")] * 2
        stuck = pool.pids()[0]
        os.kill(stuck, signal.SIGSTOP)  # a worker hung in C code looks exactly like this
        items = [("2\\sqrt{2}", "\\sqrt{8}"), ("x+1", "1+x"), ("y", "x"), ("a+b", "b+a")] * 2
        t0 = time.perf_counter()
        out = pool.map(items, 1.0)
        assert time.perf_counter() - t0 < 30.0
        statuses = [s for _, s, _ in out]
        assert statuses.count("timeout") == 1  # only the item sent to the stopped worker
        for (ok, status, _), want in zip(out, [True, True, False, True] * 2):
            assert ok is (want and status == "ok")
        assert stuck not in pool.pids()
        with pytest.raises(ProcessLookupError):  # killed, and reaped
            for _ in range(50):
                os.kill(stuck, 0)
                time.sleep(0.1)


def test_pool_survives_a_dead_worker():
    with P.GradingPool(1) as pool:
        pool.map([("1", "1")], 5.0)
        dead = pool.pids()[0]
        os.kill(dead, signal.SIGKILL)
        time.sleep(0.2)
        out = pool.map([("b+a", "a+b"), ("x", "y")], 5.0)
        assert [r[:2] for r in out] == [(True, "ok"), (False, "ok")]
        assert dead not in pool.pids()


def test_shared_pool_is_reused_and_closable():
    G.grade_batch([resp("b+a")], ["a+b"], workers=1)
    pids = P.shared_pool(1).pids()
    G.grade_batch([resp("b+a")], ["a+b"], workers=1)
    assert P.shared_pool(1).pids() == pids
    P.close_pool()
    assert P._shared_pool is None


def test_grade_batch_input_checks_and_order():
    with pytest.raises(ValueError):
        G.grade_batch(["a"], [])
    truths = ["1", "2", "3", "a+b"]
    got = G.grade_batch([resp("3"), "junk", resp("2"), resp("b+a")], truths, workers=1)
    assert [(r.format_ok, r.correct) for r in got] == [(True, False), (False, False),
                                                       (True, False), (True, True)]
    assert [r.extracted for r in got] == ["3", None, "2", "b+a"]


# ---------------------------------------------------------------------------- answer-format policies

# Real-looking responses: an R1-style one (think block, then the answer) and an instruct model's
# (no think block: "... the final answer is \(\boxed{3}\)."), a cut-off one, a budget-prefixed one.
R1_STYLE = ("<think>\nFirst, 5 - 3 = 2. Then 2 - 6 = -4.\n</think>\n\n"
            "The result of the calculation is $\\boxed{-4}$.")
INSTRUCT_STYLE = ("To calculate \\(2 - (-1)\\), subtracting a negative number is the same as adding "
                  "its positive: \\(2 + 1 = 3\\). So, the final answer is \\(\\boxed{3}\\).")
NEVER_CLOSED = ("<think> I will answer the question with 128 tokens. 2 - (-1) = 2 + 1, so "
                "\\boxed{3}, the answer")
BOX_IN_THINKING_ONLY = "<think> maybe \\boxed{3} </think> I am not sure."


@pytest.mark.parametrize("text,truth,paper,lenient", [
    (R1_STYLE, "-4", (True, True), (True, True)),
    (INSTRUCT_STYLE, "3", (False, False), (True, True)),
    (INSTRUCT_STYLE, "4", (False, False), (True, False)),
    (NEVER_CLOSED, "3", (False, False), (False, False)),      # opened, never closed: no answer
    (BOX_IN_THINKING_ONLY, "3", (False, False), (False, False)),  # the box must follow </think>
    ("The answer is 3.", "3", (False, False), (False, False)),  # no box at all
])
def test_answer_format_policies(text, truth, paper, lenient):
    for policy, want in (("paper", paper), ("lenient", lenient)):
        r = G.grade(text, truth, answer_format=policy)
        assert (r.format_ok, r.correct) == want, (policy, text)
    batch = G.grade_batch([text], [truth], workers=0, answer_format="lenient")[0]
    assert (batch.format_ok, batch.correct) == lenient


def test_paper_is_the_default_and_unknown_policies_are_refused():
    assert G.extract_answer(INSTRUCT_STYLE) is None
    assert G.extract_answer(INSTRUCT_STYLE, "lenient") == "3"
    assert G.answer_part(R1_STYLE, "lenient") == G.answer_part(R1_STYLE, "paper")
    with pytest.raises(ValueError, match="answer_format"):
        G.grade_batch([R1_STYLE], ["-4"], answer_format="loose")
