"""The paged KV cache (hbpo_jax/models/paged.py): the blocked XLA attention and the
Pallas kernel against a dense softmax, and the engine on a pool smaller than S x C."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hbpo_jax import engine, sampler
from hbpo_jax.models import paged
from tests.test_engine import CFG, N, PROMPTS, model, rows  # noqa: F401  (fixtures)


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


def test_kernel_in_interpret_mode_equals_the_fallback():
    """jax's Pallas TPU paged-attention kernel, run by the TPU interpreter on the CPU, against the
    blocked fallback (float32; the K/V values are exact in bfloat16, which the kernel loads)."""
    from jax.experimental.pallas import tpu as pltpu
    q, kp, vp, table, kv_lens, q_pos = _case(5, s=3, h=4, k=2, d=128, ps=8, pool=16, width=4)
    with pltpu.force_tpu_interpret_mode():
        got = paged.kernel_attention(q, kp, vp, table, kv_lens, 2)
    want = paged.blocked_attention(q, kp, vp, table, kv_lens, q_pos, 2)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_a_pool_smaller_than_the_slots_gives_the_same_tokens(model, rows):  # noqa: F811
    """8 slots of C = 64 tokens would take 512 tokens of KV; with 96 the rows wait for pages
    (fewer run at once) and every token is the same."""
    kv_tokens = 96
    key = jax.random.key(4)
    st = sampler.SamplerSettings(max_new_tokens=N, eos_ids=(2,), temperature=1.0)
    full, full_stats = engine.RefillEngine(model[0], CFG, st, slots=8, admit=2).run(model[1], PROMPTS, *rows, key=key)
    eng = engine.RefillEngine(model[0], CFG, st, slots=8, admit=2, kv_tokens=kv_tokens, page_size=8)
    out, stats = eng.run(model[1], PROMPTS, *rows, key=key)
    np.testing.assert_array_equal(out.tokens, full.tokens)
    np.testing.assert_array_equal(out.lengths, full.lengths)
    np.testing.assert_allclose(out.logprobs, full.logprobs, atol=1e-5)
    assert stats.pool_pages * 8 == kv_tokens and stats.peak_pages <= stats.pool_pages
    assert stats.kv_bytes < stats.dense_kv_bytes == full_stats.kv_bytes
    assert stats.decode_steps > full_stats.decode_steps  # fewer rows at once: they waited


def test_a_row_larger_than_the_pool_is_one_clear_error(model, rows):  # noqa: F811
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
