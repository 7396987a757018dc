"""Prints the per-device memory XLA plans for a config's training step and sampler, built from
abstract arrays (no weights allocated) (hbpo_jax.plan.programs), on a mesh of the local devices, or
with --topology the TPU plan (hbpo_jax.plan.tpu): the train step, the old-log-prob pass and
the sampler compiled on this machine for a TPU topology (libtpu installed, no TPU needed), per
chip: memory against the chip's HBM, flops and bytes, a roofline time, every program's ICI
traffic, and a projection of a step at a length mix (--mean_response) beside its floor, ending in
one line: `plan <topology>: paper run <H> h ...`.

    python launch/memory.py --config=configs/qwen1_5b.py
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python launch/memory.py --config=configs/qwen1_5b.py
    pip install -e ".[tpu]"   # libtpu, for --topology
    python launch/memory.py --config=configs/qwen1_5b.py --topology=v5p:2x2x4   # also v5e:4x4, v6e:2x4, v4:2x2x4
    python launch/memory.py --config=configs/qwen1_5b.py --topology=v5p:2x2x2 --mean_response=1900
    python launch/memory.py --config=configs/qwen1_5b.py:pod --topology=v5e:4x4 --slices=2 --programs=train
    python launch/memory.py --config=configs/qwen1_5b.py:pod --topology=v5p:2x2x4 --programs=train --top_movers=30

The config's mesh.shape (-1 = the rest) is laid on the topology's chips. A configuration error is
printed as one sentence (exit status 2) before anything compiles.
"""
from hbpo_jax import cli, sharding
from hbpo_jax.errors import ConfigError
from hbpo_jax.plan import programs as plan

cli.define_config("configs/qwen1_5b.py", "Config file (get_config).")
cli.flags.DEFINE_string("topology", "", "A TPU topology to compile for on this machine (e.g. v5p:2x2x4, v5e:4x4, "
                        "v6e:2x4, v4:2x2x4; needs libtpu); empty: XLA's plan on the local devices.")
cli.flags.DEFINE_integer("slices", 1, "With --topology: that many slices of it (multislice, joined by DCN).")
cli.flags.DEFINE_float("mean_response", 0.0, "With --topology: project a step at this mean response length "
                       "(tokens; the paper's steady-state mix, ~1,400, scaled; 1,900 is the paper run's average); "
                       "0: the steady state.")
cli.flags.DEFINE_integer("top_movers", 0, "With --topology: also list each compiled program's N instructions that "
                         "move the most HBM bytes (loop bodies times their trip counts).")
cli.flags.DEFINE_list("programs", ["train", "logprobs", "sampler"],
                      "With --topology: the programs to compile (train, logprobs, sampler); the "
                      "projection of the run needs all three.")


def main(argv):
    del argv
    flags = cli.flags.FLAGS
    config, topology = flags.config, flags.topology
    if topology:
        from hbpo_jax.plan import tpu as tpu_plan
        try:
            tpu_plan.chip_for(topology)
        except ValueError as e:
            raise ConfigError(f"--topology={topology}: {e}") from None
        if set(flags.programs) - set(tpu_plan.PROGRAMS) or not flags.programs:
            raise ConfigError(f"--programs={','.join(flags.programs)}: choose from {','.join(tpu_plan.PROGRAMS)}.")
        if flags.slices < 1:
            raise ConfigError(f"--slices must be at least 1, got {flags.slices}.")
        import importlib.util
        if importlib.util.find_spec("libtpu") is None:
            raise ConfigError(f"--topology={topology} compiles with libtpu: pip install -e \".[tpu]\".")
        if flags.mean_response < 0:
            raise ConfigError(f"--mean_response must be ≥ 0 tokens, got {flags.mean_response}.")
        from hbpo_jax import spec
        from hbpo_jax.plan.update_line import update_line
        mesh = plan.topology_mesh(config.mesh, topology, flags.slices)
        programs = tpu_plan.compile_programs(config, mesh, tuple(flags.programs))
        print(tpu_plan.format_report(config, topology, mesh, programs, flags.mean_response or None))
        for p in programs.values():
            if lines := tpu_plan.mover_lines(p, flags.top_movers):
                print("\n".join(lines))
        if "train" in programs:  # the update's verdict: seconds, TB per chip, bound
            run = spec.resolve(config, num_devices=mesh.devices.size, slices=sharding.num_slices(mesh.devices.flat))
            print(update_line(programs["train"], tpu_plan.chip_for(topology), run, plan.model_config(run, mesh)))
    else:
        print(plan.memory_table(config, sharding.mesh_from_config(config.mesh)))


def run() -> None:
    """The program (`hbpo-memory`, `python -m hbpo_jax.scripts.memory`, `python launch/memory.py`)."""
    cli.run(main, tpu_probe=True)  # --topology compiles with libtpu on a machine without a TPU


if __name__ == "__main__":
    run()
