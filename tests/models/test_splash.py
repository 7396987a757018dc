"""Splash attention (hbpo_jax/models/splash.py) against the XLA path.

Numerics run the Pallas TPU kernel in interpret mode on the CPU: a tiny Qwen2 with GQA (4 query
heads over 2 kv heads), left padding, a fully padded row and a length (11) that is not a multiple
of the kernel's block. Measured here (4 seeds, q/k projections scaled so attention is far from
uniform, logits of magnitude ~0.5): float32 logits within 2.4e-7 of the XLA path's; bfloat16
within 0.0045 of the bfloat16 XLA path's, while either bfloat16 path is up to 0.0078 from
float32, so the bound tested is 0.01. The compile test builds the kernel for a TPU topology
(v5e:2x2) where libtpu is installed.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from hbpo_jax import sharding as shd
from hbpo_jax.errors import ConfigError
from hbpo_jax.models import KVCache, splash
from hbpo_jax.models.config import ModelConfig
from hbpo_jax.models.qwen2 import Qwen2, attention

CFG = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=16, attention_impl="xla")
BF16_BOUND = 0.01  # max |Δlogit| splash vs XLA in bfloat16 (measured 0.0045; see the docstring)


def _inputs():
    ids = np.random.default_rng(0).integers(1, CFG.vocab_size, size=(4, 11))
    mask = np.ones_like(ids)
    mask[0, :4] = 0  # left padding
    mask[2, :9] = 0
    mask[3, :] = 0  # a row of padding only (an empty engine slot): must stay finite
    return jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)


def _state(cfg, seed=0):
    """Random parameters with q and k projections x10, so scores are O(1) and the softmax peaked
    (the 0.02 init gives near-uniform attention, which hides masking errors)."""
    _, state = nnx.split(Qwen2(cfg, rngs=nnx.Rngs(seed)))

    def sharpen(path, x):
        name = "/".join(str(getattr(p, "key", p)) for p in path)
        return x * 10 if "q_proj" in name or "k_proj" in name else x
    return jax.tree_util.tree_map_with_path(sharpen, state)


def _graphdef(cfg):
    return nnx.split(nnx.eval_shape(lambda: Qwen2(cfg, rngs=nnx.Rngs(0))))[0]


_logits = jax.jit(lambda graphdef, state, ids, mask: nnx.merge(graphdef, state)(ids, attention_mask=mask),
                  static_argnums=0)


def _loss(state, graphdef, ids, mask):
    """Mean next-token log-loss over pairs of real tokens (a padding row predicting the first
    token is not a pair: its output is the one splash leaves unspecified)."""
    logp = jax.nn.log_softmax(nnx.merge(graphdef, state)(ids, attention_mask=mask)[:, :-1])
    tok = jnp.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0]
    w = (mask[:, 1:] * mask[:, :-1]).astype(jnp.float32)
    return -(tok * w).sum() / w.sum()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_logits_match_the_xla_path(dtype):
    cfg = CFG.replace(dtype=dtype)
    state = _state(cfg)
    ids, mask = _inputs()
    xla = np.asarray(_logits(_graphdef(cfg), state, ids, mask))
    spl = np.asarray(_logits(_graphdef(cfg.replace(attention_impl="splash")), state, ids, mask))
    real = np.asarray(mask, bool)
    assert np.isfinite(spl).all()  # padding rows included
    err = np.abs(spl[real] - xla[real]).max()
    assert err <= (1e-5 if dtype == "float32" else BF16_BOUND), err
    if dtype == "bfloat16":  # and as close to float32 as XLA's bfloat16 path is, give or take
        ref = np.asarray(_logits(_graphdef(CFG), state, ids, mask))[real]
        assert np.abs(spl[real] - ref).max() <= 2 * np.abs(xla[real] - ref).max() + 1e-3


@pytest.mark.slow  # ~20 s on the loaded 2-core machine: the backward kernel, interpreted
def test_gradients_match_the_xla_path():
    state = _state(CFG)
    ids, mask = _inputs()
    grad = jax.jit(jax.grad(_loss), static_argnums=1)
    g_xla = grad(state, _graphdef(CFG), ids, mask)
    g_spl = grad(state, _graphdef(CFG.replace(attention_impl="splash", remat="full")), ids, mask)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_xla), jax.tree.leaves(g_spl)):
        a, b = np.asarray(a), np.asarray(b)
        assert np.isfinite(b).all()
        np.testing.assert_allclose(b, a, atol=1e-5 * max(np.abs(a).max(), 1e-3), err_msg=jax.tree_util.keystr(path))


def test_prefill_into_an_empty_cache_then_decode():
    """The sampler's path: splash for the prompt, XLA for decode over the cache it filled."""
    ids, mask = _inputs()
    prompt, prompt_mask = ids[:3, :8], mask[:3, :8]
    state = _state(CFG)

    def run(graphdef, state):
        model = nnx.merge(graphdef, state)
        cache = KVCache.init(model.cfg, 3, 11)
        first, cache = model.forward(prompt, None, prompt_mask, cache, empty_cache=True)
        positions = jnp.cumsum(mask[:3], axis=1) - 1
        steps = [first]
        for t in range(8, 11):
            step, cache = model.forward(ids[:3, t:t + 1], positions[:, t:t + 1], None, cache)
            steps.append(step)
        return jnp.concatenate(steps, axis=1), cache

    run = jax.jit(run, static_argnums=0)
    (a, ca), (b, cb) = run(_graphdef(CFG), state), run(_graphdef(CFG.replace(attention_impl="splash")), state)
    real = np.asarray(mask[:3], bool)
    np.testing.assert_allclose(np.asarray(b)[real], np.asarray(a)[real], atol=1e-5)
    valid = np.asarray(ca.valid)
    assert (valid == np.asarray(cb.valid)).all() and int(cb.index) == 11
    np.testing.assert_allclose(np.asarray(cb.keys[1])[valid], np.asarray(ca.keys[1])[valid], atol=1e-5)


# (mesh shape data/fsdp/tensor, heads, kv heads): kv heads sharded with the query heads; kv heads
# whole on each shard (2 over tensor=4); query groups straddling shards (3 kv heads of 2 queries
# over tensor=2: a shard's 3 query heads read 2 kv heads).
MESHES = [((2, 2, 2), 4, 2), ((1, 2, 4), 4, 2), ((2, 2, 2), 6, 3)]


@pytest.mark.parametrize("mesh_shape,heads,kv_heads", MESHES, ids=["aligned", "kv-whole", "straddle"])
def test_attention_under_a_sharded_mesh(mesh_shape, heads, kv_heads):
    mesh = shd.make_mesh(mesh_shape)
    b, t, d = 4, 20, 16
    r = np.random.default_rng(1)
    q, k, v = (jnp.asarray(r.normal(size=(b, t, n, d)), jnp.float32) for n in (heads, kv_heads, kv_heads))
    valid = jnp.asarray(np.arange(t)[None, :] >= np.array([0, 5, 19, 3])[:, None])
    put = lambda x, logical: jax.device_put(  # noqa: E731
        x, NamedSharding(mesh, shd.logical_to_spec(logical, shd.DEFAULT_RULES, mesh, x.shape)))
    q = put(q, ("batch", None, "heads", None))
    k, v = (put(x, ("batch", None, "kv_heads", None)) for x in (k, v))
    valid = put(valid, ("batch", None))
    out = jax.jit(splash.splash_attention)(q, k, v, valid)
    assert out.sharding.spec[0] is not None  # still split over the batch
    ref = attention(q, k, v, splash.dense_mask(valid), "xla")
    keep = np.asarray(valid)[:, :, None, None]
    np.testing.assert_allclose(np.asarray(out) * keep, np.asarray(ref) * keep, atol=1e-5)


def test_model_on_a_sharded_mesh_matches_the_xla_path():
    mesh = shd.make_mesh((2, 2, 2))
    cfg = CFG.replace(attention_impl="splash")
    state = jax.device_put(_state(CFG), shd.state_shardings(_state(CFG), mesh, shd.DEFAULT_RULES))
    ids, mask = (jax.device_put(x, shd.batch_sharding(mesh, shd.DEFAULT_RULES, 2)) for x in _inputs())
    a = np.asarray(_logits(_graphdef(CFG), state, ids, mask))
    b = np.asarray(_logits(_graphdef(cfg), state, ids, mask))
    real = np.asarray(mask, bool)
    np.testing.assert_allclose(b[real], a[real], atol=1e-5)


def test_auto_and_names():
    x = jnp.zeros((2, 3), jnp.bfloat16)
    assert splash.resolve_impl("auto", x) == "xla"  # the CPU
    assert splash.resolve_impl("cudnn", x) == "cudnn"
    assert ModelConfig(**{**_fields(), "attention_impl": "splash"}).attention_impl == "splash"
    with pytest.raises(ConfigError, match="model.attention_impl"):
        ModelConfig(**{**_fields(), "attention_impl": "flash"})
    assert [splash.block_size(t) for t in (1, 11, 128, 200, 384, 5120)] == [128, 128, 128, 256, 128, 512]


def _fields():
    return dict(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2, num_kv_heads=1)


@pytest.mark.slow  # ~35 s: two TPU compiles
def test_compiles_for_a_tpu_topology(monkeypatch):
    pytest.importorskip("libtpu")
    monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compiling only: share libtpu's lock
    from jax.experimental import topologies

    from hbpo_jax.plan import programs as plan
    devices = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2").devices
    mesh = shd.make_mesh((1, 2, 2), devices=devices)
    cfg = CFG.replace(hidden_size=256, intermediate_size=256, head_dim=128, dtype="bfloat16",
                      attention_impl="auto", remat="full")  # head_dim 128: the TPU's lane width
    graphdef, params = plan.abstract_params(cfg, mesh, shd.DEFAULT_RULES)
    rows = NamedSharding(mesh, P(("data", "fsdp")))
    ids = jax.ShapeDtypeStruct((4, 200), jnp.int32, sharding=rows)

    def loss(params, ids):  # training: forward and backward through the kernel
        return _loss(params, graphdef, ids, (ids > 0).astype(jnp.int32))

    def prefill(params, ids):  # the sampler's prefill into a new cache
        model = nnx.merge(graphdef, params)
        cache = KVCache.init(model.cfg, ids.shape[0], 264)
        hidden, cache = model.forward(ids, None, (ids > 0).astype(jnp.int32), cache, return_hidden=True,
                                      empty_cache=True)
        return hidden[:, -1], cache.keys[-1]

    # conftest's "highest" matmul precision would ask Mosaic for float32 contractions of bfloat16
    # tiles, which it rejects ("Bad lhs type"); the project runs at the default precision.
    with jax.default_matmul_precision("default"):
        train = jax.jit(jax.grad(loss)).lower(params, ids).compile()
        prefill = jax.jit(prefill).lower(params, ids).compile()
    text = train.as_text()
    assert "splash_mha_fwd" in text and "splash_mha_dkv" in text  # the kernels, forward and backward
    assert train.memory_analysis().argument_size_in_bytes > 0  # XLA planned it for the chip
    assert "splash_mha_fwd" in prefill.as_text()
