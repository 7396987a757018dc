"""Prints the per-device memory XLA plans for a config's training step and sampler, built from
abstract arrays (no weights allocated), on a mesh of the local devices (hbpo_jax.plan.programs), or
with --topology the TPU plan: the programs compiled here for a TPU topology (libtpu, no TPU
needed), per chip: memory against HBM, flops, bytes, roofline times, the decode loop's
collectives and a roofline projection of the run (hbpo_jax.plan.tpu).

    python launch/memory.py --config=configs/qwen1_5b.py
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python launch/memory.py --config=configs/qwen1_5b.py
    python launch/memory.py --config=configs/qwen1_5b.py --topology=v5p:2x2x4   # pip install -e ".[tpu]"

A configuration error is printed as one sentence (exit status 2) before anything compiles.
"""
# The program lives in hbpo_jax/scripts/memory.py (also `hbpo-memory`, `python -m hbpo_jax.scripts.memory`).
from hbpo_jax.scripts.memory import run

if __name__ == "__main__":
    run()
