"""Sampler throughput: python launch/bench_sampler.py --model=tiny --batch=8 --baseline

Random weights; prints tokens/s, ms per decode step, bytes read per step and the fraction of the
device's memory bandwidth (hbpo_jax.bench.quick holds the logic).

    --model=tiny|qwen1_5b  --batch=8  --prompt_len=64  --new_tokens=64  --dtype=float32|bfloat16
    --baseline             also time transformers' generate on the same shape
"""
from absl import app, flags

from hbpo_jax.bench import common, quick

flags.DEFINE_enum("model", "tiny", sorted(common.SHAPES), "Benchmarked model shape.")
flags.DEFINE_integer("batch", 8, "Rows per sampler call.")
flags.DEFINE_integer("prompt_len", 64, "Prompt tokens per row.")
flags.DEFINE_integer("new_tokens", 64, "Tokens sampled per row (no EOS: every row runs to the cap).")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Weights and compute dtype.")
flags.DEFINE_bool("baseline", False, "Also time transformers' generate.")


def main(argv):
    del argv
    f = flags.FLAGS
    print(quick.run_sampler_benchmark(f.model, f.batch, f.prompt_len, f.new_tokens, f.dtype, f.baseline))


if __name__ == "__main__":
    app.run(main)
