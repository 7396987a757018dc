r"""Trains a policy with HBPO (or GRPO, Dr. GRPO, DAPO, L1, cosine: config.objective.name).

    python launch/train.py --config=configs/tiny.py                    # CPU, minutes, no downloads
    python launch/train.py --config=configs/qwen1_5b.py --workdir=/runs/hbpo \
        --config.model_path=/models/DeepSeek-R1-Distill-Qwen-1.5B --config.data.path=/data/deepscaler.json

Re-running the same command resumes from the newest checkpoint in --workdir and loads its compiled
programs from <workdir>/jax_cache (JAX's persistent compilation cache; --compilation_cache=off for
none; JAX_COMPILATION_CACHE_DIR wins). A configuration error is printed as one sentence (exit
status 2) before anything loads.
"""
# The program lives in hbpo_jax/scripts/train.py (also `hbpo-train`, `python -m hbpo_jax.scripts.train`).
if __name__ == "__main__":
    from hbpo_jax import host
    host.use_huge_pages()  # before jax loads: glibc reads its tunables at start (hbpo_jax/host.py)
    from hbpo_jax.scripts.train import run
    run()
