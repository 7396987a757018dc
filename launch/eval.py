r"""Evaluates a checkpoint on benchmarks in each prompting mode (accuracy / tokens tables, a plot,
every response): hbpo_jax.eval.run.

    python launch/eval.py --config=configs/tiny.py --checkpoint=runs/hbpo-tiny/export
    python launch/eval.py --config=configs/qwen1_5b.py --checkpoint=/runs/hbpo/export \
        --config.eval.benchmarks='("gsm8k:/data/gsm8k.jsonl","math500:/data/math500.jsonl")' \
        --config.eval.modes='("natural","efficiency","fixed:512","l1:512")'

--checkpoint: a Hugging Face folder, a params checkpoint (config.json + params/), a training
checkpoint step folder (<workdir>/checkpoints/<step>) or a run's workdir (its newest step).
Writes results.json, results.md, accuracy_vs_tokens.png and responses.jsonl to --out
(default: <workdir or the checkpoint's parent>/eval). Compiled programs are cached in
<workdir>/jax_cache with --workdir, else ~/.cache/hbpo-jax/jax_cache (--compilation_cache; 'off'
for none; JAX_COMPILATION_CACHE_DIR wins). A configuration error or a missing file is printed as
one sentence (exit status 2).
"""
# The program lives in hbpo_jax/scripts/eval.py (also `hbpo-eval`, `python -m hbpo_jax.scripts.eval`).
if __name__ == "__main__":
    from hbpo_jax import host
    host.use_huge_pages()  # before jax loads: glibc reads its tunables at start (hbpo_jax/host.py)
    from hbpo_jax.scripts.eval import run
    run()
