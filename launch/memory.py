"""Prints the per-device memory XLA plans for a config's training step and sampler, built from
abstract arrays (no weights allocated), on a mesh of the local devices.

    python launch/memory.py --config=configs/qwen1_5b.py
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python launch/memory.py --config=configs/qwen1_5b.py
"""
import os
import sys

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hbpo_jax import sharding  # noqa: E402
from hbpo_jax.bench import plan as planning

config_flags.DEFINE_config_file("config", "configs/qwen1_5b.py", "Config file (get_config).")


def main(_):
    config = flags.FLAGS.config
    print(planning.memory_table(config, sharding.mesh_from_config(config.mesh)))


if __name__ == "__main__":
    app.run(main)
