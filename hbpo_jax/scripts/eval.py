r"""Evaluates a checkpoint on benchmarks in each prompting mode (accuracy / tokens tables, a plot,
every response): hbpo_jax.eval.run.

    python launch/eval.py --config=configs/tiny.py --checkpoint=runs/hbpo-tiny/export
    python launch/eval.py --config=configs/qwen1_5b.py --checkpoint=/runs/hbpo/export \
        --config.eval.benchmarks='("gsm8k:/data/gsm8k.jsonl","math500:/data/math500.jsonl")' \
        --config.eval.modes='("natural","efficiency","fixed:512","l1:512")'

--checkpoint: a Hugging Face folder, a params checkpoint (config.json + params/), a training
checkpoint step folder (<workdir>/checkpoints/<step>) or a run's workdir (its newest step).
Writes results.json, results.md, accuracy_vs_tokens.png and responses.jsonl to --out
(default: <workdir or the checkpoint's parent>/eval). Compiled programs are kept in JAX's
persistent compilation cache, <workdir>/jax_cache with --workdir (shared with the training run),
else ~/.cache/hbpo-jax/jax_cache (--compilation_cache; JAX_COMPILATION_CACHE_DIR wins). A
configuration error or a missing file is printed as one sentence (exit status 2).
"""
import os

from hbpo_jax import cli, host
from hbpo_jax.eval import run as eval_run

cli.define_config("configs/tiny.py", "Config file (get_config); its eval section.")
cli.flags.DEFINE_string("checkpoint", None, "HF folder, params checkpoint, training step folder or workdir.",
                        required=True)
cli.flags.DEFINE_string("workdir", None, "The run's workdir (tokenizer, warm-start config), when not "
                        "found next to --checkpoint.")
cli.flags.DEFINE_string("out", None, "Output folder (default: <workdir or checkpoint parent>/eval).")
cli.define_compilation_cache(f"<workdir>/{cli.CACHE_FOLDER} with --workdir, else ~/.cache/hbpo-jax/{cli.CACHE_FOLDER}")


def default_cache(workdir: str | None) -> str:
    """The compilation cache eval uses by default: the run's (<workdir>/jax_cache), else the
    user's cache folder ($XDG_CACHE_HOME or ~/.cache, /hbpo-jax/jax_cache)."""
    if workdir:
        return os.path.join(workdir, cli.CACHE_FOLDER)
    user = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(user, "hbpo-jax", cli.CACHE_FOLDER)


def main(argv):
    del argv
    f = cli.flags.FLAGS
    cli.use_compilation_cache(f.compilation_cache or default_cache(f.workdir))
    result = eval_run.run(f.config, f.checkpoint, f.out, workdir=f.workdir)
    print(result["table"])
    print(f"results: {result['out_dir']}")


def run() -> None:
    """The program (`hbpo-eval`, `python -m hbpo_jax.scripts.eval`, `python launch/eval.py`)."""
    host.use_huge_pages()  # the console script and `python -m` (launch/ calls it before imports)
    cli.run(main)


if __name__ == "__main__":
    run()
