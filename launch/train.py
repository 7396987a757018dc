"""Trains a policy with HBPO (or GRPO, Dr. GRPO, DAPO, L1, cosine: config.objective.name).

    python launch/train.py --config=configs/tiny.py                    # CPU, minutes, no downloads
    python launch/train.py --config=configs/qwen1_5b.py --workdir=/runs/hbpo \
        --config.model_path=/models/DeepSeek-R1-Distill-Qwen-1.5B --config.data.path=/data/deepscaler.json

Re-running the same command resumes from the newest checkpoint in --workdir.
"""
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/ imports

from hbpo_jax import loop  # noqa: E402

config_flags.DEFINE_config_file("config", "configs/tiny.py", "Training config file (get_config).")
flags.DEFINE_string("workdir", None, "Checkpoints, event files and results (default: runs/<config name>).")


def main(argv):
    del argv
    logging.set_verbosity(logging.INFO)
    config = flags.FLAGS.config
    workdir = flags.FLAGS.workdir or os.path.join("runs", config.name)
    summary = loop.run(config, workdir)
    print(summary.get("table", ""))
    print(f"workdir: {workdir}; results: {os.path.join(workdir, 'results.md')}")


if __name__ == "__main__":
    app.run(main)
