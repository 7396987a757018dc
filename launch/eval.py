"""Evaluates a checkpoint on benchmarks in each prompting mode (accuracy / tokens tables, a plot,
every response): hbpo_jax.eval.run.

    python launch/eval.py --config=configs/tiny.py --checkpoint=runs/hbpo-tiny/export
    python launch/eval.py --config=configs/qwen1_5b.py --checkpoint=/runs/hbpo/export \
        --config.eval.benchmarks='("gsm8k:/data/gsm8k.jsonl","math500:/data/math500.jsonl")' \
        --config.eval.modes='("natural","efficiency","fixed:512","l1:512")'

--checkpoint: a Hugging Face folder, a params checkpoint (config.json + params/), a training
checkpoint step folder (<workdir>/checkpoints/<step>) or a run's workdir (its newest step).
Writes results.json, results.md, accuracy_vs_tokens.png and responses.jsonl to --out
(default: <workdir or the checkpoint's parent>/eval).
"""
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/ imports

from hbpo_jax import eval_run  # noqa: E402

config_flags.DEFINE_config_file("config", "configs/tiny.py", "Config file (get_config); its eval section.")
flags.DEFINE_string("checkpoint", None, "HF folder, params checkpoint, training step folder or workdir.",
                    required=True)
flags.DEFINE_string("workdir", None, "The run's workdir (tokenizer, warm-start config), when not "
                    "found next to --checkpoint.")
flags.DEFINE_string("out", None, "Output folder (default: <workdir or checkpoint parent>/eval).")


def main(argv):
    del argv
    logging.set_verbosity(logging.INFO)
    f = flags.FLAGS
    result = eval_run.run(f.config, f.checkpoint, f.out, workdir=f.workdir)
    print(result["table"])
    print(f"results: {result['out_dir']}")


if __name__ == "__main__":
    app.run(main)
