"""The GPU benchmark (issue 8): python launch/bench.py --out=bench_out   (--smoke: toy size, CPU)

Sampler tokens/s against the memory-bandwidth ceiling, training-step MFU, transformers' generate
and training step on the same shapes, and one HBPO step (a fraction, projected to the paper's
run), within a time budget; a failed or skipped section is a table entry, never the end of the
run. Writes OUT/bench.md and OUT/bench.json after every section and prints the table at the end.
hbpo_jax.bench.harness holds the logic (the workers: hbpo_jax.bench.sections).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hbpo_jax import bench_sections  # noqa: E402
from hbpo_jax.bench import harness as bench_harness


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench_out", help="folder for bench.md and bench.json")
    p.add_argument("--smoke", action="store_true", help="tiny shapes: the same code paths on a CPU in minutes")
    p.add_argument("--budget_s", type=float, default=None,
                   help="seconds for all sections (default: 375 full, 420 smoke); a hard stop follows 15 s later")
    p.add_argument("--only", default="", help="comma-separated section names (default: all): "
                   + ", ".join(bench_sections.SECTIONS))
    a = p.parse_args(argv)
    only = [x for x in a.only.split(",") if x] or None
    report = bench_harness.run(smoke=a.smoke, out_dir=a.out, budget_s=a.budget_s, only=only)
    print()
    print(report.safe_markdown(), flush=True)
    print(f"written: {os.path.join(a.out, 'bench.md')} and bench.json", flush=True)


if __name__ == "__main__":
    main()
