"""The GPU benchmark: python launch/bench.py --out=bench_out   (--smoke: toy size, CPU)

Sampler tokens/s against the memory-bandwidth ceiling, training-step MFU, transformers' generate
and training step on the same shapes, and one HBPO step (a fraction, projected to the paper's
run), within a time budget; a failed or skipped section is a table entry, never the end of the
run. Writes OUT/bench.md and OUT/bench.json after every section and prints the table at the end.

    --out=DIR        folder for bench.md and bench.json (default bench_out)
    --smoke          tiny shapes: the same code paths on a CPU in minutes
    --budget_s=S     seconds for all sections (default: 375 full, 420 smoke); a hard stop follows
    --only=a,b       section names (default: all; hbpo_jax.bench.settings.SECTIONS)

hbpo_jax.bench.harness holds the logic (the workers: hbpo_jax.bench.runner). Plain absl flags,
not hbpo_jax.cli: the benchmark takes no config file and runs without ml_collections.
"""
import os

from absl import app, flags

from hbpo_jax.bench import harness, settings

flags.DEFINE_string("out", "bench_out", "Folder for bench.md and bench.json.")
flags.DEFINE_bool("smoke", False, "Tiny shapes: the same code paths on a CPU in minutes.")
flags.DEFINE_float("budget_s", None, "Seconds for all sections (default: 375 full, 420 smoke); a hard stop "
                   "follows 15 s (smoke: 30 s) later.")
flags.DEFINE_list("only", [], "Section names (default: all): " + ", ".join(settings.SECTIONS))


def main(argv):
    del argv
    f = flags.FLAGS
    unknown = sorted(set(f.only) - set(settings.SECTIONS))
    if unknown:
        raise app.UsageError(f"--only: unknown sections {unknown}; known: {sorted(settings.SECTIONS)}")
    report = harness.run(smoke=f.smoke, out_dir=f.out, budget_s=f.budget_s, only=f.only or None)
    print()
    print(report.safe_markdown(), flush=True)
    print(f"written: {os.path.join(f.out, 'bench.md')} and bench.json", flush=True)


if __name__ == "__main__":
    app.run(main)
