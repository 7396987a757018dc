"""The policy update: chunked log-probs, gradient accumulation, non-finite skips, sharding."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from hbpo_jax import loss as loss_lib
from hbpo_jax import sharding
from hbpo_jax.models import ModelConfig, create_model
from hbpo_jax.train import update as trainer
from tests.helpers import LOSS_KW, UPDATE_N, UPDATE_P, micro_split, optim_config, update_batch

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2)
P, N = UPDATE_P, UPDATE_N


def test_chunked_logprobs_equal_full_log_softmax():
    rng = np.random.default_rng(1)
    h = jnp.asarray(rng.normal(size=(2, 11, 8)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(8, 13)), jnp.float32)
    t = jnp.asarray(rng.integers(0, 13, size=(2, 11)), jnp.int32)
    logp, ent = trainer.chunked_logprobs(h, w, t, temperature=0.7, chunk=4)
    full = jax.nn.log_softmax((h @ w) / 0.7)
    np.testing.assert_allclose(logp, jnp.take_along_axis(full, t[..., None], -1)[..., 0], atol=1e-5)
    np.testing.assert_allclose(ent, -(jnp.exp(full) * full).sum(-1), atol=1e-5)
    # The hand-written backward equals autodiff of the whole log-softmax, for the hidden states and
    # the head, under a cotangent that differs per token (as the loss's weights do).
    c = jnp.asarray(rng.normal(size=(2, 11)), jnp.float32)
    got = jax.grad(lambda h, w: (trainer.chunked_logprobs(h, w, t, 0.7, 4)[0] * c).sum(), (0, 1))(h, w)
    full_logp = lambda h, w: jnp.take_along_axis(jax.nn.log_softmax((h @ w) / 0.7), t[..., None], -1)[..., 0]  # noqa: E731
    want = jax.grad(lambda h, w: (full_logp(h, w) * c).sum(), (0, 1))(h, w)
    for g1, g2 in zip(got, want):
        np.testing.assert_allclose(g1, g2, atol=1e-5)
    # The entropy carries no gradient.
    np.testing.assert_array_equal(jax.grad(lambda h: trainer.chunked_logprobs(h, w, t, 0.7, 4)[1].sum())(h), 0.0)


def test_response_logprobs_match_the_model():
    model = create_model(CFG, seed=0)
    b = update_batch()
    logp, _ = trainer.response_logprobs(model, jnp.asarray(b["tokens"]), jnp.asarray(b["attention_mask"]), P)
    full = jax.nn.log_softmax(model(jnp.asarray(b["tokens"]), attention_mask=jnp.asarray(b["attention_mask"])))
    want = jnp.take_along_axis(full[:, P - 1:-1], jnp.asarray(b["tokens"])[:, P:, None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(logp)[b["response_mask"]], np.asarray(want)[b["response_mask"]], atol=1e-5)


def _run(micro, mesh=None):
    model = create_model(CFG, seed=0, mesh=mesh)
    graphdef, params = nnx.split(model)
    opt = optax.sgd(0.1)  # linear in the gradient, so parameters compare as gradients do
    state = trainer.init_state(params, opt)
    state, metrics = trainer.update(graphdef, state, micro_split(update_batch(), micro), optimizer=opt,
                                    prompt_len=P, temperature=1.0, loss_kwargs=LOSS_KW)
    return state, metrics


@pytest.mark.slow  # > 10 s on the 2-core machine
def test_gradient_accumulation_equals_one_big_batch():
    one, m1 = _run(1)
    four, m4 = _run(4)
    np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-5)
    np.testing.assert_allclose(m1["grad_norm"], m4["grad_norm"], rtol=1e-4)
    for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(four.params)):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert int(one.step) == 1


def test_loss_equals_policy_loss_on_the_whole_batch():
    model = create_model(CFG, seed=0)
    b = update_batch()
    logp, _ = trainer.response_logprobs(model, jnp.asarray(b["tokens"]), jnp.asarray(b["attention_mask"]), P)
    want, _ = loss_lib.policy_loss(logp, b["old_logp"], b["advantages"], b["response_mask"], **dict(LOSS_KW))
    _, metrics = _run(2)
    np.testing.assert_allclose(metrics["loss"], want, rtol=1e-5)


def test_non_finite_step_is_skipped_and_counted():
    model = create_model(CFG, seed=0)
    graphdef, params = nnx.split(model)
    before = jax.tree.map(np.asarray, params)
    opt = trainer.make_optimizer(optim_config(), 10)
    state = trainer.init_state(params, opt)
    bad = update_batch()
    bad["advantages"][3] = np.nan
    state, metrics = trainer.update(graphdef, state, micro_split(bad, 2), optimizer=opt, prompt_len=P,
                                    temperature=1.0, loss_kwargs=LOSS_KW)
    assert float(metrics["skipped"]) == 1.0
    assert (int(state.step), int(state.skipped), int(state.skipped_total)) == (0, 1, 1)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(before)):
        np.testing.assert_array_equal(np.asarray(a), b)
    state, metrics = trainer.update(graphdef, state, micro_split(update_batch(), 2), optimizer=opt, prompt_len=P,
                                    temperature=1.0, loss_kwargs=LOSS_KW)
    assert (int(state.step), int(state.skipped), int(state.skipped_total)) == (1, 0, 1)


@pytest.mark.slow  # > 10 s on the 2-core machine
def test_sharded_update_equals_unsharded():
    mesh = sharding.make_mesh((1, 2, 4))
    plain, m1 = _run(2)
    sharded, m2 = _run(2, mesh=mesh)
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(plain.params), jax.tree.leaves(sharded.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    # Parameters keep their shardings through the update (no silent gather to one device).
    q = sharded.params["layers"]["attn"]["q_proj"].get_value()  # [L, E, H, D]
    assert q.sharding.spec[1] == "fsdp"


@pytest.mark.slow
@pytest.mark.parametrize("aggregation", ["token-mean", "sequence-mean-token-mean"])
def test_length_grouped_pieces_give_the_whole_minibatchs_update(aggregation):
    """Rows grouped by length into micro-batches cut to their own width (batching.minibatches,
    width_step > 0) update the weights as the uniform layout does; fewer padded slots."""
    from hbpo_jax.train import minibatches as batching
    rows, n = 16, 12
    rng = np.random.default_rng(4)
    lengths = np.array([1, 12, 2, 3, 11, 2, 4, 1, 9, 2, 3, 1, 12, 2, 5, 3])
    resp = np.arange(n)[None] < lengths[:, None]
    attn = np.concatenate([np.ones((rows, P), np.int32), resp.astype(np.int32)], 1)
    attn[0, :2] = 0
    arrays = dict(tokens=rng.integers(1, 64, (rows, P + n)).astype(np.int32), attention_mask=attn,
                  response_mask=resp, old_logp=rng.normal(-4.0, 0.3, (rows, n)).astype(np.float32),
                  advantages=rng.normal(size=rows).astype(np.float32), prompt_len=P)
    kw = dict(optimizer=optax.sgd(0.1), prompt_len=P, temperature=1.0,
              loss_kwargs=tuple(dict(LOSS_KW, aggregation=aggregation).items()))
    graphdef, params = nnx.split(create_model(CFG, seed=0))
    results = {}
    for step in (0, 4):
        (mb,) = batching.minibatches(arrays, rows, 4, aggregation, width_step=step)
        assert len(mb) == (1 if step == 0 else 4)
        pieces = [jax.tree.map(jnp.asarray, p) for p in mb]
        state = trainer.init_state(jax.tree.map(jnp.copy, params), kw["optimizer"])
        results[step] = trainer.update_pieces(graphdef, state, pieces, **kw)
    widths = [p["response_mask"].shape[-1] for p in mb]
    assert widths == [4, 4, 8, 12] and sum(p["weight"].sum() for p in mb) == pytest.approx(1.0)
    (s0, m0), (s4, m4) = results[0], results[4]
    np.testing.assert_allclose(m0["loss"], m4["loss"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(s0.params), jax.tree.leaves(s4.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    assert int(s4.step) == 1
    full = batching.padded_fraction(lengths, rows, 4, n, 0)
    grouped = batching.padded_fraction(lengths, rows, 4, n, 4)
    assert full == pytest.approx(1 - 73 / (16 * 12)) and grouped == pytest.approx(1 - 73 / (4 * (4 + 4 + 8 + 12)))
