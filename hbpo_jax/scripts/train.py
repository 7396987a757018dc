r"""Trains a policy with HBPO (or GRPO, Dr. GRPO, DAPO, L1, cosine: config.objective.name).

    python launch/train.py --config=configs/tiny.py                    # CPU, minutes, no downloads
    python launch/train.py --config=configs/qwen1_5b.py --workdir=/runs/hbpo \
        --config.model_path=/models/DeepSeek-R1-Distill-Qwen-1.5B --config.data.path=/data/deepscaler.json

Re-running the same command resumes from the newest checkpoint in --workdir, and loads the
compiled programs from JAX's persistent compilation cache in <workdir>/jax_cache (--compilation_cache;
JAX_COMPILATION_CACHE_DIR wins) instead of compiling them again. A configuration error is printed
as one sentence (exit status 2) before anything loads.

The workdir is the run's contract (docs/workdir.md): one run at a time (a second one exits 2
naming the first's pid and host); a resume that changes what the checkpoints mean (model,
objective, loss, rollout shapes, data, task) is refused in one sentence naming each key (exit 2)
unless --allow_spec_change names them; other changes (steps, learning rate, eval, logging) are
logged and recorded in <workdir>/spec.json. Ctrl-C (like SIGTERM) checkpoints after the step in
flight and exits 0; a second Ctrl-C aborts at once (exit 130).
"""
import os

from hbpo_jax import cli, host
from hbpo_jax.train import loop

cli.define_config("configs/tiny.py", "Training config file (get_config).")
cli.flags.DEFINE_string("workdir", None, "Checkpoints, event files and results (default: runs/<config name>).")
cli.define_compilation_cache(f"<workdir>/{cli.CACHE_FOLDER}")
cli.flags.DEFINE_list("allow_spec_change", [], "Spec keys (or sections: 'model', 'objective', ...; '*' = all) "
                      "a resume may change although the workdir's checkpoints were trained with other values.")


def main(argv):
    del argv
    config = cli.flags.FLAGS.config
    workdir = cli.flags.FLAGS.workdir or os.path.join("runs", config.name)
    cli.use_compilation_cache(cli.flags.FLAGS.compilation_cache or os.path.join(workdir, cli.CACHE_FOLDER))
    summary = loop.run(config, workdir, allow_spec_change=tuple(cli.flags.FLAGS.allow_spec_change))
    if summary.get("table"):
        print(summary["table"])
    print(summary_line(summary, workdir))


def summary_line(summary: dict, workdir: str) -> str:
    """The run's last line: final step, reward, accuracy, and where its outputs are."""
    parts = [f"workdir: {workdir}"]
    step = summary.get("stopped_at", summary.get("steps"))
    if step is not None:
        parts.append(f"{'stopped at' if summary.get('preempted') else 'final'} step {step}")
    for key in ("reward", "accuracy"):
        if summary.get(key) is not None:
            parts.append(f"{key} {summary[key]:.4g}")
    for key in ("checkpoint", "export", "results", "figure"):
        if summary.get(key):
            parts.append(f"{key}: {summary[key]}")
    return "; ".join(parts)


def run() -> None:
    """The program (`hbpo-train`, `python -m hbpo_jax.scripts.train`, `python launch/train.py`)."""
    host.use_huge_pages()  # the console script and `python -m` (launch/ calls it before imports)
    cli.run(main)


if __name__ == "__main__":
    run()
