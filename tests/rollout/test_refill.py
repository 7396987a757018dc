"""The refilling engine against the static sampler, the full forward pass and transformers."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from hbpo_jax.models import ModelConfig, create_model, load_pretrained
from hbpo_jax.plan import ici
from hbpo_jax.rollout import refill as engine
from hbpo_jax.rollout import static as sampler
from hbpo_jax.sharding import make_mesh
from tests.helpers import CFG, PROMPTS, N, char_tokenizer, hf_model, rollouts


def _static(model, rows, key, **settings):
    row_prompt, prefixes, limits = rows
    ids, mask = sampler.pad_prompts([PROMPTS[p] + x for p, x in zip(row_prompt, prefixes)])
    out = sampler.generate(model, ids, mask, key=key, limits=limits, max_new_tokens=N, eos_ids=(2,), **settings)
    return jax.device_get(out), ids, mask


def _engine(model, rows, key, *, slots=8, admit=2, mesh=None, **settings):
    st = sampler.SamplerSettings(max_new_tokens=N, eos_ids=(2,), **settings)
    eng = engine.RefillEngine(model[0], CFG, st, slots=slots, admit=admit, mesh=mesh)
    return eng.run(model[1], PROMPTS, *rows, key=key)


# What the engine paid for these rows before pages on demand (commit 44f0c1d: whole limits
# reserved at admission): slot-steps, decode steps, segments, admit calls. The default pool
# (S x C) must still pay exactly this, and preempt nothing.
BEFORE_PAGES_ON_DEMAND = {"greedy": (504, 60, 8, 9), "t1": (506, 60, 8, 10), "top_p": (490, 58, 8, 10)}


@pytest.mark.parametrize("settings", [dict(temperature=0.0), dict(temperature=1.0), dict(temperature=0.7, top_p=0.9)],
                         ids=["greedy", "t1", "top_p"])
@pytest.mark.slow
def test_engine_draws_the_static_samplers_tokens(model, rows, settings, request):
    """Same keys -> the same tokens, lengths and stop reasons as the static sampler, although rows
    enter slots at other times, in another order and next to other rows."""
    key = jax.random.key(7)
    ref, _, _ = _static(model, rows, key, **settings)
    out, stats = _engine(model, rows, key, **settings)
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    np.testing.assert_array_equal(out.lengths, ref.lengths)
    np.testing.assert_array_equal(out.stop_reason, ref.stop_reason)
    np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=1e-5)
    assert stats.tokens == ref.lengths.sum() and stats.prompt_prefills == len(PROMPTS)
    assert stats.slot_steps >= stats.tokens and 0 < stats.utilization <= 1
    paid = (stats.slot_steps, stats.decode_steps, stats.segments, stats.admit_calls)
    assert paid == BEFORE_PAGES_ON_DEMAND[request.node.callspec.id]
    assert stats.preemptions == stats.recomputed == stats.page_grants == stats.grow_calls == 0


@pytest.mark.slow
def test_layers_in_a_python_loop_draw_the_scans_tokens(model, rows):
    """scan_layers=False (a loop over the same stacked weights) through the static sampler's KV
    cache and the engine's pages: the scanned model's tokens and log-probs."""
    key, cfg = jax.random.key(7), CFG.replace(scan_layers=False)
    looped = (nnx.split(create_model(cfg, seed=3))[0], model[1])
    ref, _, _ = _static(model, rows, key)
    got, _, _ = _static(looped, rows, key)
    st = sampler.SamplerSettings(max_new_tokens=N, eos_ids=(2,))
    out, _ = engine.RefillEngine(looped[0], cfg, st, slots=8, admit=2).run(looped[1], PROMPTS, *rows, key=key)
    for drawn in (got, out):
        np.testing.assert_array_equal(drawn.tokens, ref.tokens)
        np.testing.assert_array_equal(drawn.lengths, ref.lengths)
        np.testing.assert_allclose(drawn.logprobs, ref.logprobs, atol=1e-5)


def test_slots_change_no_token(model, rows):
    """(Another admission order, and preemption: tests/models/test_paged.py.)"""
    key = jax.random.key(11)
    a, _ = _engine(model, rows, key, slots=8, admit=2)
    b, stats = _engine(model, rows, key, slots=3, admit=1)
    np.testing.assert_array_equal(b.tokens, a.tokens)
    np.testing.assert_array_equal(b.lengths, a.lengths)
    # 3 slots, one row per refill: one call fills all three, then one call per further row.
    assert stats.segments > 1 and stats.admit_calls == 1 + (rows[2] > 0).sum() - 3


@pytest.mark.slow
def test_prefix_logprobs_equal_the_full_forward(model, rows):
    """The prefix tokens' log-probs come from the admit forward: they equal log_softmax(logits / T)
    of the whole sequence, so the trainer need not recompute them."""
    out, _ = _engine(model, rows, jax.random.key(1), temperature=0.8)
    _, ids, mask = _static(model, rows, jax.random.key(1), temperature=0.8)
    logp = np.asarray(jax.nn.log_softmax(nnx.merge(*model)(jnp.asarray(ids), attention_mask=jnp.asarray(mask)) / 0.8))
    width = ids.shape[1]
    for r, prefix in enumerate(rows[1]):
        f = len(prefix)
        want = [logp[r, width - f - 1 + i, t] for i, t in enumerate(prefix)]
        np.testing.assert_allclose(out.prefix_logprobs[r, :f], want, atol=1e-5)
        assert (out.prefix_logprobs[r, f:] == 0).all()


@pytest.mark.slow
def test_engine_on_a_mesh_equals_one_device(model, rows):
    """8 slots over 4 devices (kv heads over 2 more), each device a pool of 8 pages of 8 tokens for
    its 2 slots (a row needs up to 7): pages on demand, preempted on their own device, and the
    one-device default pool's greedy tokens."""
    mesh = make_mesh((1, 4, 2))
    key = jax.random.key(2)
    one, _ = _engine(model, rows, key, temperature=0.0)
    st = sampler.SamplerSettings(max_new_tokens=N, eos_ids=(2,), temperature=0.0)
    eng = engine.RefillEngine(model[0], CFG, st, slots=8, admit=2, mesh=mesh, kv_tokens=4 * 8 * 8, page_size=8)
    sharded, stats = eng.run(model[1], PROMPTS, *rows, key=key)
    np.testing.assert_array_equal(sharded.tokens, one.tokens)
    np.testing.assert_array_equal(sharded.lengths, one.lengths)
    assert stats.pool_pages == 32 and stats.preemptions > 0 and stats.page_grants > 0
    # 8 devices for the 4 prompts: each prompt in 2 parts, each part prefilled on its own device.
    eight = engine.RefillEngine(model[0], CFG, st, slots=16, mesh=make_mesh((1, 8, 1)), page_size=8)
    got, _ = eight.run(model[1], PROMPTS, *rows, key=key)
    np.testing.assert_array_equal(got.tokens, one.tokens)


def test_bad_input_is_one_clear_error(model, rows):
    eng = engine.RefillEngine(model[0], CFG, sampler.SamplerSettings(max_new_tokens=N), slots=4)
    row_prompt, prefixes, limits = rows
    with pytest.raises(ValueError, match="one prefix and one limit per row"):
        eng.run(model[1], PROMPTS, row_prompt, prefixes[:-1], limits, key=jax.random.key(0))
    with pytest.raises(ValueError, match="row_prompt must index"):
        eng.run(model[1], PROMPTS, row_prompt + 4, prefixes, limits, key=jax.random.key(0))
    with pytest.raises(ValueError, match="slots ≥ 1"):
        engine.RefillEngine(model[0], CFG, sampler.SamplerSettings(max_new_tokens=N), slots=0)


def test_greedy_equals_transformers_generate(tmp_path):
    """Real Qwen2 numerics (random weights, biases and norms): the engine's greedy tokens are
    transformers' generate(do_sample=False), token for token."""
    hf = hf_model(seed=5, eos_token_id=None)
    hf.save_pretrained(tmp_path)
    graphdef, state = nnx.split(load_pretrained(str(tmp_path)).model)
    prompts = [[11, 12, 13, 14, 15], [21, 22, 23], [31, 32, 33, 34, 35, 36, 37]]
    new = 12
    eng = engine.RefillEngine(graphdef, nnx.merge(graphdef, state).cfg,
                              sampler.SamplerSettings(max_new_tokens=new, temperature=0.0), slots=2, admit=1)
    out, _ = eng.run(state, prompts, np.arange(3), [[]] * 3, np.full(3, new), key=jax.random.key(0))
    for i, p in enumerate(prompts):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              max_new_tokens=new, do_sample=False, pad_token_id=0)
        assert out.tokens[i].tolist() == ref[0, len(p):].tolist()


@pytest.fixture(scope="module")
def tiny_policy():
    cfg = ModelConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, eos_token_ids=(2,))
    model = create_model(cfg, seed=0)
    model.lm_head[...] = model.lm_head[...].at[:, 2].add(0.6)  # some rows end early
    return model, char_tokenizer()


@pytest.mark.slow
@pytest.mark.parametrize("prefix_in_response", [True, False])
def test_budget_rollouts_refill_equals_static(tiny_policy, prefix_in_response):
    """rollout.engine="refill" gives the static path's rollout batch; with the prefix in the
    response, its log-probs are scored (scored_mask) so no recompute pass is needed."""
    model, tok = tiny_policy
    kw = dict(budgets=[56, 64], samples_per_budget=2, max_response_len=72, key=jax.random.key(3),
              prefix_in_response=prefix_in_response)
    static = rollouts(model, tok, ["1+1?", "7*8?", "2-9?"], **kw)
    refill = rollouts(model, tok, ["1+1?", "7*8?", "2-9?"], engine="refill", max_batch=4, **kw)
    for field in ("prompt_ids", "prompt_mask", "response_ids", "response_mask", "sampled_mask", "lengths",
                  "stop_reason", "budgets", "prompt_index", "prefix_lengths"):
        np.testing.assert_array_equal(getattr(refill, field), getattr(static, field), err_msg=field)
    assert refill.texts == static.texts
    sampled = static.sampled_mask
    np.testing.assert_allclose(refill.logprobs[sampled], static.logprobs[sampled], atol=1e-5)
    prefix = refill.scored_mask & ~refill.sampled_mask
    assert prefix.any() == prefix_in_response
    assert (refill.logprobs[prefix] < 0).all() and (static.scored_mask == static.sampled_mask).all()
    with pytest.raises(ValueError, match="engine must be one of"):
        rollouts(model, tok, ["1+1?"], engine="paged", **kw)


@pytest.mark.slow
def test_shared_prompt_pages_pinned_on_a_mesh_equal_one_device(model, rows):
    """Pages of 2 tokens: a prompt's full pages are written once per device and shared by its rows
    there (8 slots over 4 devices, kv heads over 2 more; rows pinned to their prompt's device);
    the greedy tokens of one device without a mesh, and of the same engine with pages of 16 (no
    page shared)."""
    key = jax.random.key(2)
    st = sampler.SamplerSettings(max_new_tokens=N, eos_ids=(2,), temperature=0.0)
    one, one_stats = engine.RefillEngine(model[0], CFG, st, slots=8, admit=2, page_size=16).run(
        model[1], PROMPTS, *rows, key=key)
    assert one_stats.shared_prompt_pages == 0  # no prompt fills a page of 16
    eng = engine.RefillEngine(model[0], CFG, st, slots=8, admit=2, mesh=make_mesh((1, 4, 2)), page_size=2)
    sharded, stats = eng.run(model[1], PROMPTS, *rows, key=key)
    np.testing.assert_array_equal(sharded.tokens, one.tokens)
    np.testing.assert_array_equal(sharded.lengths, one.lengths)
    assert stats.shared_prompt_pages > 0
    single = engine.RefillEngine(model[0], CFG, st, slots=24, page_size=2)  # every row in flight, one device
    got, all_in = single.run(model[1], PROMPTS, *rows, key=key)
    np.testing.assert_array_equal(got.tokens, one.tokens)
    # Prompts of 3, 7, 1, 4 tokens share 1, 3, 0, 1 pages of 2 with each of their later rows.
    plen = np.array([len(p) for p in PROMPTS])[rows[0]]
    admitted = rows[2] > 0
    firsts = {p for p in rows[0][admitted]}
    want = sum(((plen[r] - 1) // 2) for r in np.flatnonzero(admitted)) - sum((len(PROMPTS[p]) - 1) // 2 for p in firsts)
    assert all_in.shared_prompt_pages == want and all_in.admit_calls == 1
    # Every row in flight on the mesh (10 slots a device, the most rows a prompt has): each prompt
    # decodes on its home device, where its pages are written once, as on one device.
    pinned = engine.RefillEngine(model[0], CFG, st, slots=40, mesh=make_mesh((1, 4, 2)), page_size=2)
    got, pinned_stats = pinned.run(model[1], PROMPTS, *rows, key=key)
    np.testing.assert_array_equal(got.tokens, one.tokens)
    assert pinned_stats.shared_prompt_pages == want and pinned_stats.admit_calls == 1


def test_store_layout_gives_each_prompt_one_home_shard():
    """Prompts go to shards heaviest first under a cap of G / shards each, every row of a prompt
    on its home shard, whose block of the store holds the prompt; prompts that do not divide over
    the shards are split into parts (rows dealt by limit), so every shard gets as many rows; one
    shard holds every prompt once."""
    make = lambda g, rows, shards: engine.StoreLayout.make(engine.Rows.make(  # noqa: E731
        [[5]] * g, np.repeat(np.arange(g), rows), [[]] * (g * rows), np.arange(1, g * rows + 1), jax.random.key(0),
        None, N, engine.RefillEngine.start_width), shards)
    layout = make(12, 2, 4)
    assert layout.size == 16 and np.bincount(layout.home, minlength=4).tolist() == [6, 6, 6, 6]
    np.testing.assert_array_equal(layout.row // (layout.size // 4), layout.home)
    np.testing.assert_array_equal(layout.prompt[layout.row], np.repeat(np.arange(12), 2))  # its prompt's row
    assert (layout.home[0::2] == layout.home[1::2]).all()  # a prompt's rows together
    assert layout.home[22:].tolist() == [0, 0] and layout.home[16::2].tolist() == [3, 2, 1, 0]  # heaviest first
    split = make(4, 4, 8)  # 4 prompts of 4 rows on 8 shards: 8 parts of 2 rows
    assert split.size == 8 and np.bincount(split.home).tolist() == [2] * 8
    assert sorted(split.prompt.tolist()) == [0, 0, 1, 1, 2, 2, 3, 3]
    np.testing.assert_array_equal(split.prompt[split.row], np.repeat(np.arange(4), 4))
    one = make(12, 2, 1)
    assert one.size == 16 and sorted(one.prompt[:12].tolist()) == list(range(12)) and not one.home.any()
    assert one.prompt[12:].tolist() == [-1] * 4
    np.testing.assert_array_equal(one.prompt[one.row], np.repeat(np.arange(12), 2))
    assert engine.StoreLayout.size_for(64, 16) == 64 and engine.StoreLayout.size_for(4, 8) == 8


def test_admit_moves_no_kv_between_devices(model):
    """A row's prompt KV is read from its own device's part of the store and written into its own
    device's pages: the compiled admit on the (1, 4, 2) mesh holds no collective across the slots'
    4 devices (at most one within a pair that splits the kv heads)."""
    mesh = make_mesh((1, 4, 2))
    st = sampler.SamplerSettings(max_new_tokens=N, eos_ids=(2,))
    eng = engine.RefillEngine(model[0], CFG, st, slots=8, admit=4, mesh=mesh, page_size=2)
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), model[1])
    _, admit, _ = eng.lower(params, prompts=8, prompt_len=16, prefix_len=4, rows=24)
    per_call, per_step = ici.traffic(admit.compile().as_text(), devices=8)
    assert all(t.n <= mesh.shape["tensor"] for t in per_call + per_step), per_call + per_step
