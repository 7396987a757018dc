"""The paged KV cache (hbpo_jax/models/paged.py): the blocked XLA attention and the Pallas kernel
against a dense softmax, and the engine's pages on demand (preemption, memory held)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hbpo_jax.models import paged
from hbpo_jax.rollout import refill as engine
from hbpo_jax.rollout import static as sampler
from tests.helpers import CFG, PROMPTS, N


def _pages(rng, k, p, ps, d, dtype=jnp.float32):
    """Random [K, P, ps, D] pages whose values are exact in bfloat16 (the kernel loads bfloat16)."""
    x = rng.normal(size=(k, p, ps, d)).astype(np.float32)
    return jnp.asarray(jnp.asarray(x, jnp.bfloat16), dtype)


def _case(seed, s=5, t=1, h=4, k=2, d=16, ps=4, pool=40, width=8):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(s, t, h, d)), jnp.float32)
    kp, vp = _pages(rng, k, pool, ps, d), _pages(rng, k, pool, ps, d)
    table = jnp.asarray(rng.permutation(pool)[:s * width].reshape(s, width) if s * width <= pool
                        else rng.integers(0, pool, (s, width)), jnp.int32)
    kv_lens = jnp.asarray(rng.integers(t, width * ps + 1, s), jnp.int32)
    kv_lens = kv_lens.at[0].set(t)  # a slot with just its new tokens
    q_pos = kv_lens[:, None] - t + jnp.arange(t)
    return q, kp, vp, table, kv_lens, q_pos


@pytest.mark.parametrize("t,block", [(1, 1), (1, 2), (3, 4), (2, 8)])
def test_blocked_attention_equals_dense(t, block):
    q, kp, vp, table, kv_lens, q_pos = _case(t * 10 + block, t=t)
    got = paged.blocked_attention(q, kp, vp, table, kv_lens, q_pos, block)
    want = paged.dense_attention_reference(q, kp, vp, table, kv_lens, q_pos)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6, rtol=1e-5)
    # The stacked layout with a layer index reads the same pages.
    # (three layers, so that L differs from K = 2)
    stack = lambda x: jnp.stack([jnp.zeros_like(x), x, jnp.zeros_like(x)], axis=1)  # noqa: E731  ([K, L, P, ps, D])
    got1 = paged.blocked_attention(q, stack(kp), stack(vp), table, kv_lens, q_pos, block, layer=jnp.int32(1))
    np.testing.assert_array_equal(np.asarray(got1), np.asarray(got))


def test_blocked_attention_reads_only_filled_blocks():
    """Pages past every slot's length may hold anything (NaN here): they are never read."""
    q, kp, vp, table, kv_lens, q_pos = _case(3, width=8)
    kv_lens = jnp.minimum(kv_lens, 8)  # two pages of 4 filled at most
    q_pos = kv_lens[:, None] - 1
    poison = jnp.zeros_like(kp).at[:, table[:, 2:]].set(jnp.nan)
    got = paged.blocked_attention(q, kp + poison, vp + poison, table, kv_lens, q_pos, 2)
    want = paged.dense_attention_reference(q, kp, vp, table, kv_lens, q_pos)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("ps,block", [(8, 2), (16, 2), (64, 2), (128, 1)])
def test_kernel_in_interpret_mode_equals_the_fallback(ps, block):
    """jax's Pallas TPU paged-attention kernel, run by the TPU interpreter on the CPU, against the
    blocked fallback (float32; the K/V values are exact in bfloat16, which the kernel loads), at
    the page sizes the plan compares (docs/rollout.md, "Page size")."""
    from jax.experimental.pallas import tpu as pltpu
    q, kp, vp, table, kv_lens, q_pos = _case(5, s=3, h=4, k=2, d=128, ps=ps, pool=16, width=4)
    with pltpu.force_tpu_interpret_mode():
        got = paged.kernel_attention(q, kp, vp, table, kv_lens, block)
    want = paged.blocked_attention(q, kp, vp, table, kv_lens, q_pos, block)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_preempted_rows_draw_the_same_tokens_again(model, rows):
    """A pool of 12 pages of 8 tokens for 5 slots (rows need up to 7): rows get pages on demand,
    the latest-admitted row is preempted when the pool runs dry and recomputed later, and every
    token is the one the default pool (whole limits, nothing preempted) draws."""
    key = jax.random.key(4)
    st = sampler.SamplerSettings(max_new_tokens=N, eos_ids=(2,), temperature=1.0)
    full, full_stats = engine.RefillEngine(model[0], CFG, st, slots=8, admit=2).run(model[1], PROMPTS, *rows, key=key)
    eng = engine.RefillEngine(model[0], CFG, st, slots=5, kv_tokens=96, page_size=8)
    out, stats = eng.run(model[1], PROMPTS, *rows, key=key, order=np.arange(24)[::-1])
    np.testing.assert_array_equal(out.tokens, full.tokens)
    np.testing.assert_array_equal(out.lengths, full.lengths)
    np.testing.assert_array_equal(out.stop_reason, full.stop_reason)
    np.testing.assert_allclose(out.logprobs, full.logprobs, atol=1e-5)
    np.testing.assert_allclose(out.prefix_logprobs, full.prefix_logprobs, atol=1e-5)
    assert full_stats.preemptions == full_stats.recomputed == full_stats.page_grants == 0
    assert stats.preemptions > 0 and stats.recomputed > 0 and stats.page_grants > 0 and stats.grow_calls > 0
    assert stats.pool_pages == stats.peak_pages == 12 and stats.kv_bytes < stats.dense_kv_bytes
    # Recomputed tokens are paid for, not kept: the slot-steps cover both.
    assert stats.tokens == full_stats.tokens == full.lengths.sum()
    assert stats.slot_steps >= stats.tokens + stats.recomputed


def test_pages_on_demand_hold_fewer_pages_than_whole_limits(model, rows):
    """The same rows, slots and pool: with pages on demand (grow = 8 tokens ahead) the most pages
    held at once is below what reserving each row's whole limit holds, and the tokens are the same.
    Every program compiles once: a second run traces nothing."""
    key = jax.random.key(5)
    st = sampler.SamplerSettings(max_new_tokens=N, eos_ids=(2,), temperature=1.0)
    whole, whole_stats = engine.RefillEngine(model[0], CFG, st, slots=8, admit=2).run(model[1], PROMPTS, *rows,
                                                                                      key=key)
    eng = engine.RefillEngine(model[0], CFG, st, slots=8, admit=2, grow=8)
    lazy, stats = eng.run(model[1], PROMPTS, *rows, key=key)
    np.testing.assert_array_equal(lazy.tokens, whole.tokens)
    np.testing.assert_array_equal(lazy.lengths, whole.lengths)
    assert whole_stats.page_grants == 0 and stats.page_grants > 0 and stats.preemptions == 0
    assert stats.pool_pages == whole_stats.pool_pages
    assert stats.peak_pages < whole_stats.peak_pages, (stats.peak_pages, whole_stats.peak_pages)
    before = dict(engine.TRACE_COUNTS)
    assert before["grow"] > 0
    again, again_stats = eng.run(model[1], PROMPTS, *rows, key=key)
    assert dict(engine.TRACE_COUNTS) == before
    np.testing.assert_array_equal(again.tokens, lazy.tokens)
    assert again_stats == stats


def test_a_row_larger_than_the_pool_is_one_clear_error(model, rows):
    eng = engine.RefillEngine(model[0], CFG, sampler.SamplerSettings(max_new_tokens=N), slots=4, kv_tokens=16,
                              page_size=8)
    with pytest.raises(ValueError, match="kv_tokens"):
        eng.run(model[1], PROMPTS, *rows, key=jax.random.key(0))
    with pytest.raises(ValueError, match="page_size ≥ 1"):
        engine.RefillEngine(model[0], CFG, sampler.SamplerSettings(max_new_tokens=N), slots=4, page_size=0)
    with pytest.raises(ValueError, match="attention must be one of"):
        engine.RefillEngine(model[0], CFG, sampler.SamplerSettings(max_new_tokens=N), slots=4, attention="flash")


@pytest.mark.slow
def test_kernel_compiles_for_a_tpu_topology(monkeypatch):
    pytest.importorskip("libtpu")
    monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compiling only: share libtpu's lock
    import functools

    import jax
    from jax.experimental import topologies
    device = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2").devices[0]
    one = jax.sharding.SingleDeviceSharding(device)
    s, h, k, d, pool, ps, width = 8, 4, 2, 128, 64, 16, 8
    spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=one)  # noqa: E731
    args = (spec((s, 1, h, d), jnp.bfloat16), spec((k, pool, ps, d), jnp.bfloat16),
            spec((k, pool, ps, d), jnp.bfloat16), spec((s, width), jnp.int32), spec((s,), jnp.int32))
    # At the default matmul precision, as a run has it (tests/conftest.py asks for "highest", in
    # whose fp32 contract Mosaic rejects a bfloat16 operand).
    with jax.default_matmul_precision("default"):
        compiled = jax.jit(functools.partial(paged.kernel_attention, block_pages=4)).lower(*args).compile()
    assert "tpu_custom_call" in compiled.as_text()


@pytest.mark.parametrize("mode", ["batch", "kv_head"])
def test_kernel_megacore_modes_in_interpret_mode_equal_the_fallback(mode):
    """The kernel's two-TensorCore splits (v4, v5p), run by the TPU interpreter as two cores (with
    one, a megacore kernel waits forever on its first DMA): the same attention."""
    from jax.experimental.pallas import tpu as pltpu
    q, kp, vp, table, kv_lens, q_pos = _case(6, s=4, h=4, k=2, d=128, ps=8, pool=16, width=4)
    with pltpu.force_tpu_interpret_mode(pltpu.InterpretParams(num_cores_or_threads=2)):
        got = paged.kernel_attention(q, kp, vp, table, kv_lens, 2, megacore=mode)
    want = paged.blocked_attention(q, kp, vp, table, kv_lens, q_pos, 2)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)


def test_megacore_mode_per_chip():
    assert paged.megacore_mode(256, 2, "TPU v5") == "batch"  # v5p: two TensorCores
    assert paged.megacore_mode(255, 2, "TPU v4") == "kv_head"
    assert paged.megacore_mode(255, 1, "TPU v5") is None
    assert paged.megacore_mode(256, 2, "TPU v5 lite") is None and paged.megacore_mode(256, 2, "TPU v6 lite") is None
    assert paged.megacore_mode(256, 2, "cpu") is None
