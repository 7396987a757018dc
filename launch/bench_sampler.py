"""Sampler throughput: python launch/bench_sampler.py --model=tiny --batch=8 --baseline

Random weights; prints tokens/s, ms per decode step, bytes read per step and the fraction of the
device's memory bandwidth (hbpo_jax.bench.common holds the logic).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # runs without an install

from hbpo_jax import benchmarks  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", choices=sorted(benchmarks.SHAPES))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt_len", type=int, default=64)
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--baseline", action="store_true", help="also time transformers' generate")
    a = p.parse_args(argv)
    print(benchmarks.run_sampler_benchmark(a.model, a.batch, a.prompt_len, a.new_tokens, a.dtype, a.baseline))


if __name__ == "__main__":
    main()
