"""Qwen2 numerics against transformers' PyTorch Qwen2ForCausalLM on the same weights."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hbpo_jax.models import KVCache, ModelConfig, create_model, load_pretrained
from tests.helpers import hf_logits, hf_model

# (tied embeddings, heads, kv heads): GQA ratios 1, 2 and 6.
CONFIGS = [
    dict(tie_word_embeddings=True, num_attention_heads=4, num_key_value_heads=4, hidden_size=32),
    dict(tie_word_embeddings=False, num_attention_heads=4, num_key_value_heads=2, hidden_size=64,
         rope_theta=1e6),
    dict(tie_word_embeddings=False, num_attention_heads=6, num_key_value_heads=1, hidden_size=48,
         num_hidden_layers=3),
]


def _load(tmp_path, hf, **kw):
    hf.save_pretrained(tmp_path)
    return load_pretrained(str(tmp_path), **kw).model


@pytest.mark.parametrize("cfg", CONFIGS, ids=["tied-gqa1", "untied-gqa2", "untied-gqa6"])
def test_logits_match_transformers(tmp_path, cfg):
    hf = hf_model(**cfg)
    model = _load(tmp_path, hf)
    ids = np.random.default_rng(0).integers(0, 97, size=(3, 13))  # odd length
    ours = np.asarray(model(jnp.asarray(ids, jnp.int32)))
    assert ours.dtype == np.float32 and ours.shape == (3, 13, 97)
    np.testing.assert_allclose(ours, hf_logits(hf, ids), atol=1e-4, rtol=0)


def test_left_padded_batch_matches_transformers(tmp_path):
    hf = hf_model(**CONFIGS[1])
    model = _load(tmp_path, hf)
    rng = np.random.default_rng(1)
    ids = rng.integers(4, 97, size=(3, 11))
    mask = np.ones_like(ids)
    mask[0, :4] = 0
    mask[2, :7] = 0
    ids = np.where(mask == 1, ids, 0)
    ours = np.asarray(model(jnp.asarray(ids, jnp.int32), attention_mask=jnp.asarray(mask)))
    ref = hf_logits(hf, ids, mask)
    real = mask.astype(bool)  # padding positions are garbage on both sides: compare real tokens
    np.testing.assert_allclose(ours[real], ref[real], atol=1e-4, rtol=0)
    # A left-padded row equals the same prompt run alone without padding.
    alone = np.asarray(model(jnp.asarray(ids[2:3, 7:], jnp.int32)))
    np.testing.assert_allclose(ours[2, 7:], alone[0], atol=1e-5)


def test_bfloat16_within_documented_tolerance(tmp_path):
    """bfloat16 weights and compute: max |Δlogit| ≤ 0.05 against float32 transformers on these
    small random models (logits of magnitude ~1; bf16 keeps 8 mantissa bits)."""
    hf = hf_model(**CONFIGS[1])
    model = _load(tmp_path, hf, dtype="bfloat16")
    ids = np.random.default_rng(2).integers(0, 97, size=(2, 9))
    ours = np.asarray(model(jnp.asarray(ids, jnp.int32)))
    assert ours.dtype == np.float32
    assert np.abs(ours - hf_logits(hf, ids)).max() <= 0.05


@pytest.mark.slow  # > 10 s on the 2-core machine
def test_kv_cache_prefill_and_decode_match_full_forward(tmp_path):
    hf = hf_model(**CONFIGS[2])
    model = _load(tmp_path, hf)
    ids = jnp.asarray(np.random.default_rng(3).integers(0, 97, size=(2, 10)), jnp.int32)
    mask = jnp.ones_like(ids).at[1, :3].set(0)
    full = model(ids, attention_mask=mask)
    cache = KVCache.init(model.cfg, batch=2, max_len=16)
    prefill, cache = model.forward(ids[:, :7], attention_mask=mask[:, :7], cache=cache)
    positions = jnp.cumsum(mask, axis=1) - 1
    steps = [prefill]
    for t in range(7, 10):
        step, cache = model.forward(ids[:, t:t + 1], positions=positions[:, t:t + 1], cache=cache)
        steps.append(step)
    cached = jnp.concatenate(steps, axis=1)
    real = np.asarray(mask, bool)
    np.testing.assert_allclose(np.asarray(cached)[real], np.asarray(full)[real], atol=1e-5)
    assert int(cache.index) == 10


@pytest.mark.parametrize("impl", ["dot_product"])
def test_attention_implementations_agree(tmp_path, impl):
    hf = hf_model(**CONFIGS[1])
    model = _load(tmp_path, hf)
    other = _load(tmp_path, hf, attention_impl=impl)
    ids = jnp.asarray(np.random.default_rng(4).integers(0, 97, size=(2, 7)), jnp.int32)
    mask = jnp.ones_like(ids).at[0, :2].set(0)
    a = np.asarray(model(ids, attention_mask=mask))[np.asarray(mask, bool)]
    b = np.asarray(other(ids, attention_mask=mask))[np.asarray(mask, bool)]
    np.testing.assert_allclose(a, b, atol=1e-5)


SCAN_CFG = ModelConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4,
                       num_kv_heads=2)


def _unrolled_logits(model, ids):
    """The reference: the decoder layers one at a time in a Python loop, layer i built from row i
    of the stacked parameters (the layout before the scan), full causal attention."""
    b, t = ids.shape
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))
    graphdef, stacked = nnx.split(model.layers)
    x = jnp.take(model.embed[...], ids, axis=0)
    for i in range(model.cfg.num_layers):
        x, _ = nnx.merge(graphdef, jax.tree.map(lambda a: a[i], stacked))(x, positions, mask)
    return model.logits(model.final_norm(x))


@pytest.mark.slow
@pytest.mark.parametrize("remat,scan", [("none", True), ("full", True), ("dots", True), ("auto", True),
                                        ("none", False), ("full", False)])
def test_scanned_layers_equal_a_layer_loop_in_loss_and_gradients(remat, scan):
    """The layer scan, or the model's own loop (scan_layers=False), with each remat policy
    checkpointing a layer, gives the loss and the gradient of every parameter that a plain loop
    over the same layers gives."""
    ids = jnp.asarray(np.random.default_rng(5).integers(0, 61, size=(2, 9)), jnp.int32)

    def loss(model, forward):
        logp = jax.nn.log_softmax(forward(model, ids[:, :-1]))
        return -jnp.take_along_axis(logp, ids[:, 1:, None], -1).mean()

    model = create_model(SCAN_CFG.replace(remat=remat, scan_layers=scan), seed=3)
    reference = create_model(SCAN_CFG, seed=3)
    l1, g1 = nnx.jit(nnx.value_and_grad(lambda m: loss(m, lambda m, x: m(x))))(model)
    l2, g2 = nnx.jit(nnx.value_and_grad(lambda m: loss(m, _unrolled_logits)))(reference)
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    flat1, flat2 = nnx.to_flat_state(g1), nnx.to_flat_state(g2)
    assert [p for p, _ in flat1] == [p for p, _ in flat2]
    for (path, a), (_, b) in zip(flat1, flat2):
        np.testing.assert_allclose(np.asarray(a.get_value()), np.asarray(b.get_value()), atol=1e-6, err_msg=str(path))
    up = np.asarray(g1["layers"]["mlp"]["up_proj"].get_value())  # [L, E, M]
    assert (np.abs(up).sum(axis=(1, 2)) > 0).all(), "a layer got no gradient"


def test_remat_auto_resolves_per_chip():
    """remat "auto": "full" on v6e (memory bound with "dots" in the plan) and on a CPU, "dots" on
    the other TPUs and on GPUs; the other policies pass through."""
    from hbpo_jax.models.qwen2 import resolve_remat
    assert resolve_remat("auto", "TPU v6 lite") == "full" and resolve_remat("auto", "cpu") == "full"
    for kind in ("TPU v5", "TPU v5 lite", "TPU v4", "NVIDIA H100 80GB HBM3"):
        assert resolve_remat("auto", kind) == "dots", kind
    assert resolve_remat("dots", "TPU v6 lite") == "dots" and resolve_remat("none", None) == "none"
