"""Benchmark answer grading: python launch/bench_grading.py [--n=1024] [--timeout_s=5]

Builds a deterministic set of realistic responses (correct, equivalent-but-different form,
wrong, format errors, long thinking, a few hostile) and prints, for 1 and 2 worker processes:
responses/s, p50/p99 per-item latency, timeouts. Pools are warmed up before timing.
"""
import random
import statistics
import time

from hbpo_jax import cli
from hbpo_jax.grading import answers as grading
from hbpo_jax.grading import pool as grading_pool

cli.flags.DEFINE_integer("n", 1024, "Responses to grade.")
cli.flags.DEFINE_float("timeout_s", 5.0, "Per-response grading time limit (seconds).")

# (ground truth, same-form answer, equivalent other form, a wrong answer)
PROBLEMS = [
    ("42", "42", "42.0", "24"), ("\\frac{1}{2}", "\\frac{1}{2}", "0.5", "\\frac{1}{3}"),
    ("2\\sqrt{2}", "2\\sqrt{2}", "\\sqrt{8}", "2\\sqrt{3}"), ("(1,2)", "(1, 2)", "(1,2)", "(2,1)"),
    ("\\frac{\\pi}{3}", "\\frac{\\pi}{3}", "\\frac{1}{3}\\pi", "\\frac{\\pi}{6}"),
    ("x^2+2x+1", "x^2+2x+1", "(x+1)^2", "x^2+1"), ("25\\%", "25\\%", "0.25", "20\\%"),
    ("[0,1)", "[0, 1)", "[0,1)", "(0,1]"), ("1000", "1,000", "1000", "100"),
    ("\\frac{3}{4}", "\\dfrac{3}{4}", "0.75", "\\frac{4}{3}"), ("90", "90^\\circ", "90", "45"),
    ("\\text{Monday}", "Monday", "\\text{monday}", "Tuesday"),
]
HOSTILE = ["9^9^9^9", "\\frac{1}{", "\\frac{}", "{" * 100_000, "2^{99999999}"]


def build(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    responses, truths = [], []
    for _ in range(n):
        truth, same, other, wrong = rng.choice(PROBLEMS)
        thinking = " ".join(rng.choice(["so", "then", "wait,", "x =", "compute", "check"])
                            for _ in range(rng.randint(50, 400)))
        u = rng.random()
        if u < 0.05:
            thinking *= 60  # long thinking, ~100 KB
        if u < 0.40:
            body = f"<think>{thinking}</think> The answer is $\\boxed{{{same}}}$."
        elif u < 0.55:
            body = f"<think>{thinking}</think> Hence \\boxed{{{other}}}."
        elif u < 0.85:
            body = f"<think>{thinking}</think> \\boxed{{{wrong}}}"
        elif u < 0.98:  # format errors: cut off, or no box
            body = f"<think>{thinking}" if rng.random() < 0.5 else f"<think>{thinking}</think> {same}"
        else:
            body = f"<think>{thinking}</think> \\boxed{{{rng.choice(HOSTILE)}}}"
        responses.append(body)
        truths.append(truth)
    return responses, truths


def pct(xs: list[float], q: float) -> float:
    return statistics.quantiles(xs, n=100, method="inclusive")[q - 1] if len(xs) > 1 else xs[0]


def main(argv) -> None:
    del argv
    args = cli.flags.FLAGS
    responses, truths = build(args.n)
    print(f"{args.n} responses, timeout {args.timeout_s:g} s")
    print(f"{'workers':>7} | {'resp/s':>8} | {'p50 ms':>7} | {'p99 ms':>7} | {'timeouts':>8} | "
          f"{'correct':>7} | {'format_ok':>9}")
    for workers in (1, 2):
        grading.grade_batch(responses[:8], truths[:8], workers=workers)  # start + warm the pool
        t0 = time.perf_counter()
        res = grading.grade_batch(responses, truths, workers=workers, timeout_s=args.timeout_s)
        wall = time.perf_counter() - t0
        lat = [r.latency_s * 1e3 for r in res]
        print(f"{workers:>7} | {len(res) / wall:>8.1f} | {pct(lat, 50):>7.2f} | {pct(lat, 99):>7.2f} | "
              f"{sum(r.status == 'timeout' for r in res):>8} | {sum(r.correct for r in res):>7} | "
              f"{sum(r.format_ok for r in res):>9}")
    grading_pool.close_pool()


if __name__ == "__main__":
    cli.run(main)
