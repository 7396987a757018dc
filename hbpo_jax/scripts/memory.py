"""Prints the per-device memory XLA plans for a config's training step and sampler, built from
abstract arrays (no weights allocated), on a mesh of the local devices (hbpo_jax.bench.plan).

    python launch/memory.py --config=configs/qwen1_5b.py
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python launch/memory.py --config=configs/qwen1_5b.py

A configuration error is printed as one sentence (exit status 2) before anything compiles.
"""
from hbpo_jax import cli, sharding
from hbpo_jax.bench import plan

cli.define_config("configs/qwen1_5b.py", "Config file (get_config).")


def main(argv):
    del argv
    config = cli.flags.FLAGS.config
    print(plan.memory_table(config, sharding.mesh_from_config(config.mesh)))


def run() -> None:
    """The program (`hbpo-memory`, `python -m hbpo_jax.scripts.memory`, `python launch/memory.py`)."""
    cli.run(main)


if __name__ == "__main__":
    run()
