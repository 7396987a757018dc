"""The update's one-line verdict in the TPU plan (launch/memory.py --topology ... --programs=train):
seconds per mini-batch at the roofline, bytes moved per chip, compute or memory bound, memory.

    update: 2.13 s per mini-batch, 1.85 TB moved per chip, compute bound (0.978 PFLOP 2.13 s vs 1.85 TB
    0.67 s per chip at v5p's peak; 2.41 s instruction by instruction); peak memory 13.3 GiB of 95 GiB; ...
"""
from __future__ import annotations

from hbpo_jax import spec
from hbpo_jax.plan import hlo, hlo_cost
from hbpo_jax.plan.tpu import Chip, GiB, ProgramPlan


def update_line(train: ProgramPlan, chip: Chip, run: spec.RunSpec, model) -> str:
    """One line for the compiled train step (one mini-batch update, every micro-batch full; the
    packed update skips those packing leaves empty, so this is its most). model: the ModelConfig."""
    if train.error:
        return f"update: did not compile ({train.error})"
    t = run.train
    flops_s, bytes_s = train.flops / chip.peak_flops, train.bytes / chip.hbm_bandwidth
    if t.pack_rows:
        from hbpo_jax.train import packing
        lanes, lane_len, u = packing.layout_for(run)
        layout = f"packed: {u} micro-batches of {lanes} lanes x {lane_len:,} tokens"
    else:
        layout = f"rows: {t.rows_per_minibatch // t.micro_batch_size} micro-batches of {t.micro_batch_size} rows"
    serial = hlo_cost.serial_seconds(hlo.Module(train.text), chip.peak_flops, chip.hbm_bandwidth)
    return (f"update: {train.roofline_s(chip):.2f} s per mini-batch, {train.bytes / 1e12:.2f} TB moved per chip, "
            f"{train.bound(chip)} bound ({train.flops / 1e15:.3f} PFLOP {flops_s:.2f} s vs {train.bytes / 1e12:.2f} TB "
            f"{bytes_s:.2f} s per chip at {chip.name}'s peak; {serial:.2f} s instruction by instruction); "
            f"peak memory {train.peak / GiB:.1f} GiB of "
            f"{chip.hbm_bytes / GiB:.0f} GiB; {layout}; remat {model.remat}")
