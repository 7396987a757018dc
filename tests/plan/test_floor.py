"""The plan's first-principles floor (hbpo_jax.plan.floor): by hand on a toy workload, and the
paper's step on the four slices against DESIGN.md's figures."""
import pathlib
import sys

import numpy as np
import pytest

from hbpo_jax import spec as spec_lib
from hbpo_jax.plan import floor, lengths

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from configs import qwen1_5b  # noqa: E402


def test_floor_by_hand():
    work = floor.Workload(matmul_params=1e9, attn_width=1000, layers=10, kv_bytes=1000.0, weight_bytes=2e9,
                          passes=4.0)
    # Two rows of one 10-token prompt, 3 and 5 response tokens, on 2 chips.
    f = floor.floor(work, np.array([3, 5]), np.array([10]), np.array([0, 0]), chips=2, peak_flops=1e15,
                    hbm_bandwidth=1e12)
    # Update: 13 + 15 trained tokens; causal pairs 13*14/2 + 15*16/2 = 211; x4 forward flops.
    forward = 2e9 * 28 + 4 * 1000 * 10 * 211
    assert f.trained_tokens == 28 and f.update_flops == pytest.approx(4 * forward)
    assert f.update_s == pytest.approx(4 * forward / 2e15)
    # Rollout: the prompt's prefill; 4 decode steps (the longest row's first token comes from the
    # admit). Rows hold 11, 11 tokens at step 0 (prompt + first token), then 12, 12; then only the
    # long row runs: 13, 14. Each step reads 2 GB of weights + half the filled KV (2 chips).
    filled = np.array([22, 24, 13, 14])
    decode = ((2e9 + 1000 * filled / 2) / 1e12).sum()
    prefill = (2e9 * 10 + 4 * 1000 * 10 * 55) / 2e15
    assert f.decode_steps == 4 and f.rollout_s == pytest.approx(decode + prefill)
    assert f.decode_bytes == pytest.approx((2e9 + 1000 * filled / 2).sum())
    assert f.step_s == pytest.approx(f.update_s + f.rollout_s)


def test_workload_of_the_paper_model():
    cfg = spec_lib.resolve_model(qwen1_5b.get_config()).config()
    work = floor.Workload.of(cfg)
    assert work.matmul_params == 1_543_569_408  # 28 layers of projections + the LM head (DESIGN: 1.544 B)
    assert work.kv_bytes == 28_672 and work.weight_bytes == 2 * 1_543_569_408
    assert work.passes == 4.0  # remat "full": the forward runs again in the backward pass
    assert floor.Workload.of(cfg.replace(remat="none")).passes == 3.0


@pytest.mark.parametrize("chips, peak, bandwidth, design_hours", [
    (8, 459e12, 2765e9, 1.9),     # v5p-16
    (16, 459e12, 2765e9, 1.35),   # v5p-32
    (16, 197e12, 819e9, 4.2),     # v5e-16
    (8, 918e12, 1638e9, 2.3),     # v6e-8
])
def test_paper_floor_near_design(chips, peak, bandwidth, design_hours):
    """The paper's 629 steps at the steady-state mix: within 25% of DESIGN.md's first-principles
    figures (ours counts full remat's recompute and attention's flops: a little above them)."""
    cfg = spec_lib.resolve_model(qwen1_5b.get_config()).config()
    mix = lengths.LengthMix()
    responses, prompts = mix.responses(64, 4), mix.prompt_lengths(64)
    f = floor.floor(floor.Workload.of(cfg), responses, prompts, np.repeat(np.arange(64), 16), chips, peak,
                    bandwidth, mix.prefix)
    hours = 629 * f.step_s / 3600
    assert design_hours * 0.95 < hours < design_hours * 1.25
    assert f.decode_steps == 4095  # the cap row
