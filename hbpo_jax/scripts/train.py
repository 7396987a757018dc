"""Trains a policy with HBPO (or GRPO, Dr. GRPO, DAPO, L1, cosine: config.objective.name).

    python launch/train.py --config=configs/tiny.py                    # CPU, minutes, no downloads
    python launch/train.py --config=configs/qwen1_5b.py --workdir=/runs/hbpo \
        --config.model_path=/models/DeepSeek-R1-Distill-Qwen-1.5B --config.data.path=/data/deepscaler.json

Re-running the same command resumes from the newest checkpoint in --workdir, and loads the
compiled programs from JAX's persistent compilation cache in <workdir>/jax_cache (--compilation_cache;
JAX_COMPILATION_CACHE_DIR wins) instead of compiling them again. A configuration error is printed
as one sentence (exit status 2) before anything loads.
"""
import os

from hbpo_jax import cli, host
from hbpo_jax.train import loop

cli.define_config("configs/tiny.py", "Training config file (get_config).")
cli.flags.DEFINE_string("workdir", None, "Checkpoints, event files and results (default: runs/<config name>).")
cli.define_compilation_cache(f"<workdir>/{cli.CACHE_FOLDER}")


def main(argv):
    del argv
    config = cli.flags.FLAGS.config
    workdir = cli.flags.FLAGS.workdir or os.path.join("runs", config.name)
    cli.use_compilation_cache(cli.flags.FLAGS.compilation_cache or os.path.join(workdir, cli.CACHE_FOLDER))
    summary = loop.run(config, workdir)
    if summary.get("table"):
        print(summary["table"])
    print(f"workdir: {workdir}" + (f"; results: {summary['results']}" if summary.get("results") else ""))


def run() -> None:
    """The program (`hbpo-train`, `python -m hbpo_jax.scripts.train`, `python launch/train.py`)."""
    host.use_huge_pages()  # the console script and `python -m` (launch/ calls it before imports)
    cli.run(main)


if __name__ == "__main__":
    run()
