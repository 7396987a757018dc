"""Times the paper config's programs on one TPU VM (v5e-8, v5p-8; ~10 minutes) and writes a
markdown report set against the TPU plan's predictions (hbpo_jax.bench.probe): the update at
the loop's widths under each mesh, the decode step over slots x filled length, the paged-attention
kernel (page sizes, megacore modes), a profiler trace of one scaled HBPO step.

    python launch/tpu_probe.py --config=configs/qwen1_5b.py --out=/tmp/probe
    python launch/tpu_probe.py --smoke --out=/tmp/probe   # the CPU smoke mode of the test suite
"""
from hbpo_jax import cli

flags = cli.flags

cli.define_config("configs/qwen1_5b.py", "Config file (get_config).")
flags.DEFINE_string("out", "/tmp/tpu_probe", "Folder for probe.md and the trace.")
flags.DEFINE_bool("smoke", False, "A tiny model and shapes (CPU, kernels in interpret mode): checks the plumbing.")


def main(argv):
    del argv
    from hbpo_jax.bench import probe
    config = flags.FLAGS.config
    if flags.FLAGS.smoke:
        config = probe.smoke_config()
    print(probe.run(config, flags.FLAGS.out, probe.SMOKE if flags.FLAGS.smoke else probe.ProbeSpec()))


if __name__ == "__main__":
    cli.run(main)
