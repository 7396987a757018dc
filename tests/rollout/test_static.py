"""The sampler against the full forward pass without a cache (tiny random models, CPU)."""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hbpo_jax.models import ModelConfig, create_model
from hbpo_jax.rollout import next_token as sampling
from hbpo_jax.rollout import static as sampler
from hbpo_jax.sharding import make_mesh
from tests.helpers import char_tokenizer

CFG = ModelConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2)
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [3], [40, 41, 42, 43]]


@pytest.fixture(scope="module")
def model():
    m = create_model(CFG, seed=3)
    # Sharper logits than the 0.02 init gives (std ≈ 1.7): argmax margins well above float noise
    # and a distribution whose temperature matters for the chi-square test.
    m.lm_head[...] = m.lm_head[...] * 15.0
    return m


_WIDTH = 32  # every reference sequence is left-padded to this width: one compilation


_FORWARDS = {}


def _forward(graphdef, state, ids, mask):
    if graphdef not in _FORWARDS:
        _FORWARDS[graphdef] = jax.jit(lambda s, i, m: nnx.merge(graphdef, s)(i, attention_mask=m))
    return _FORWARDS[graphdef](state, ids, mask)


def _full_logits(model, seq):
    """float32 [len(seq), V]: the model without a cache (left padding is checked against
    transformers in test_qwen2.py)."""
    ids, mask = sampler.pad_prompts([seq], length=_WIDTH)
    return np.asarray(_forward(*nnx.split(model), ids, mask)[0, _WIDTH - len(seq):])


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_pad_prompts_and_buckets():
    ids, mask = sampler.pad_prompts([[1, 2, 3], [4]], pad_id=9)
    assert ids.shape == (2, 16) and ids.dtype == np.int32
    np.testing.assert_array_equal(ids[0, -3:], [1, 2, 3])
    np.testing.assert_array_equal(ids[1, -4:], [9, 9, 9, 4])
    assert mask.sum(1).tolist() == [3, 1] and mask[0, -3:].all() and not mask[0, :-3].any()
    assert [sampler.bucket_length(n) for n in (1, 16, 17, 100, 1000, 1025)] == [16, 16, 32, 128, 1024, 2048]
    assert sampler.bucket_length(65, 64) == 128 and sampler.bucket_length(65, None) == 65
    with pytest.raises(ValueError):
        sampler.pad_prompts([[1], []])


def test_greedy_equals_stepwise_argmax_of_full_forward(model):
    ids, mask = sampler.pad_prompts(PROMPTS, pad_id=0)
    n = 6
    out = sampler.generate(model, ids, mask, key=jax.random.key(0), max_new_tokens=n, temperature=0.0)
    tokens, logprobs = np.asarray(out.tokens), np.asarray(out.logprobs)
    assert tokens.shape == (4, n) and logprobs.dtype == np.float32
    assert np.asarray(out.lengths).tolist() == [n] * 4
    assert np.asarray(out.stop_reason).tolist() == [sampler.STOP_LIMIT] * 4
    for r, prompt in enumerate(PROMPTS):
        seq = list(prompt)
        for j in range(n):
            last = _full_logits(model, seq)[-1]
            assert tokens[r, j] == last.argmax(), (r, j)
            assert abs(logprobs[r, j] - _log_softmax(last)[tokens[r, j]]) <= 1e-4
            seq.append(int(last.argmax()))


def test_sampled_logprobs_are_full_tempered_softmax(model):
    ids, mask = sampler.pad_prompts(PROMPTS, pad_id=0)
    t = 0.8
    out = sampler.generate(model, ids, mask, key=jax.random.key(1), max_new_tokens=7, temperature=t)
    tokens, logprobs = np.asarray(out.tokens), np.asarray(out.logprobs)
    for r, prompt in enumerate(PROMPTS):
        logits = _full_logits(model, list(prompt) + tokens[r].tolist())
        ref = _log_softmax(logits[len(prompt) - 1:-1] / t)[np.arange(7), tokens[r]]
        np.testing.assert_allclose(logprobs[r], ref, atol=1e-4, rtol=0)


def test_reproducible_and_each_row_stops_at_its_own_eos_or_limit(model):
    ids, mask = sampler.pad_prompts(PROMPTS, pad_id=0)
    n, pad = 10, 99
    kw = dict(key=jax.random.key(7), max_new_tokens=n, temperature=1.0, pad_id=pad)
    base = sampler.generate(model, ids, mask, **kw)
    again = sampler.generate(model, ids, mask, **kw)
    other = sampler.generate(model, ids, mask, **{**kw, "key": jax.random.key(8)})
    base_tokens = np.asarray(base.tokens)
    np.testing.assert_array_equal(base_tokens, np.asarray(again.tokens))
    np.testing.assert_array_equal(np.asarray(base.logprobs), np.asarray(again.logprobs))
    assert (base_tokens != np.asarray(other.tokens)).any()

    # Two EOS ids taken from the run without EOS: a row's draws do not depend on the other rows,
    # so each row must stop at its first EOS or at its own limit, whichever comes first.
    eos = (int(base_tokens[0, 3]), int(base_tokens[1, 1]))
    limits = np.array([n, n, 2, 5], np.int32)
    out = sampler.generate(model, ids, mask, limits=limits, eos_ids=eos, **kw)
    for r in range(4):
        hits = [j for j in range(n) if base_tokens[r, j] in eos]
        first = hits[0] + 1 if hits else n + 1
        length = min(first, limits[r])
        assert int(out.lengths[r]) == length, r
        reason = sampler.STOP_EOS if first <= limits[r] else sampler.STOP_LIMIT
        assert int(out.stop_reason[r]) == reason, r
        np.testing.assert_array_equal(np.asarray(out.tokens[r, :length]), base_tokens[r, :length])
        np.testing.assert_allclose(np.asarray(out.logprobs[r, :length]),
                                   np.asarray(base.logprobs[r, :length]), atol=1e-6)
        assert (np.asarray(out.tokens[r, length:]) == pad).all()
        assert (np.asarray(out.logprobs[r, length:]) == 0).all()
        assert (np.asarray(out.logprobs[r, :length]) < 0).all()


def test_loop_stops_when_all_rows_finish_and_does_not_retrace(model):
    kw = dict(max_new_tokens=10, temperature=1.0, pad_id=99, key=jax.random.key(7))
    ids, mask = sampler.pad_prompts(PROMPTS, pad_id=0)
    out = sampler.generate(model, ids, mask, limits=np.array([3, 1, 2, 3]), **kw)
    assert int(out.num_steps) == 3 and np.asarray(out.lengths).tolist() == [3, 1, 2, 3]
    before = dict(sampler.TRACE_COUNTS)
    # Other prompts of the same bucket, other limits, another key, the (graphdef, state) form.
    ids2, mask2 = sampler.pad_prompts([[1] * 9, [2], [3, 4], [5] * 15], pad_id=0)
    out2 = sampler.generate(nnx.split(model), ids2, mask2, limits=np.array([10, 4, 0, 1]),
                            **{**kw, "key": jax.random.key(3)})
    assert dict(sampler.TRACE_COUNTS) == before
    assert np.asarray(out2.lengths).tolist() == [10, 4, 0, 1]
    assert int(out2.stop_reason[2]) == sampler.STOP_LIMIT and (np.asarray(out2.tokens[2]) == 99).all()


def _chi2_critical(dof, z=3.0902):
    """Upper 0.1% point of chi-square(dof) (scipy if present, else Wilson-Hilferty)."""
    try:
        from scipy import stats
        return float(stats.chi2.isf(1e-3, dof))
    except ImportError:
        return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def _chi2(counts, probs):
    """Pearson statistic with bins of expected count < 5 merged into one."""
    expected = probs * counts.sum()
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    keep = exp > 0
    return float((((obs - exp) ** 2)[keep] / exp[keep]).sum()), int(keep.sum()) - 1


def test_token_frequencies_match_tempered_softmax(model):
    n, t = 10_000, 0.7
    prompt = [11, 12, 13]
    ids = np.tile(np.asarray(prompt, np.int32), (n, 1))
    out = sampler.generate(model, ids, key=jax.random.key(123), max_new_tokens=1, temperature=t)
    counts = np.bincount(np.asarray(out.tokens[:, 0]), minlength=CFG.vocab_size)
    logits = _full_logits(model, prompt)[-1]
    stat, dof = _chi2(counts, np.exp(_log_softmax(logits / t)))
    assert stat < _chi2_critical(dof), (stat, dof)
    # The test has power: the untempered distribution is rejected on the same draws.
    stat1, dof1 = _chi2(counts, np.exp(_log_softmax(logits)))
    assert stat1 > _chi2_critical(dof1), (stat1, dof1)


@pytest.mark.parametrize("top_p,candidates", [(1.0, sampling.TOP_P_CANDIDATES), (0.9, 64), (0.9, 4)])
def test_frequencies_match_truncated_softmax_over_several_blocks(top_p, candidates):
    """The two-level inverse CDF over a vocabulary of several blocks (1,000 = 7 x 128 + a padded
    one), untruncated and with top-p: the nucleus found among 64 candidates, and (4 candidates,
    a nucleus of 19) the bisection fallback. Rows draw with their own keys fold_in(key, row)."""
    n, t = 10_000, 0.8
    rng = np.random.default_rng(1)
    row = rng.normal(0, 3 * t, size=1000).astype(np.float32)
    probs = np.exp(_log_softmax(row.astype(np.float64) / t))
    order = np.argsort(-probs)
    before = np.cumsum(probs[order]) - probs[order]
    nucleus = order[before < top_p]
    if top_p < 1:
        assert 4 < len(nucleus) < 64
    toks, lps = jax.jit(lambda x, k: sampling.sample_logits(x, k, t, top_p, candidates=candidates))(
        jnp.asarray(np.tile(row, (n, 1))), jax.random.key(17))
    toks = np.asarray(toks)
    assert set(np.unique(toks).tolist()) <= set(nucleus.tolist())
    np.testing.assert_allclose(np.asarray(lps), np.log(probs[toks]), atol=1e-5)  # full softmax
    target = np.zeros_like(probs)
    target[nucleus] = probs[nucleus] / probs[nucleus].sum()
    counts = np.bincount(toks, minlength=row.size)
    stat, dof = _chi2(counts, target)
    assert stat < _chi2_critical(dof), (stat, dof)
    stat1, dof1 = _chi2(counts, np.exp(_log_softmax(row.astype(np.float64))))  # T = 1: rejected
    assert stat1 > _chi2_critical(dof1), (stat1, dof1)


def test_inverse_cdf_never_returns_a_zero_weight_entry():
    """u · total rounding to the total, and zero weights (masked tokens) before, between and
    after the positive ones: the index is always a positive entry, never past the end."""
    w = jnp.asarray([[0.0, 1.0, 0.0, 2.0, 0.0], [0.0, 0.0, 3.0, 0.0, 0.0], [1e-30, 0.0, 0.0, 0.0, 0.0]])
    for u in (0.0, 0.3, 1 / 3, 0.5, np.nextafter(np.float32(1), np.float32(0)), 1.0, 2.0):
        idx, total = sampling._inverse_cdf(w, jnp.full((3,), u, jnp.float32))
        assert (np.asarray(total) > 0).all()
        assert (np.asarray(w)[np.arange(3), np.asarray(idx)] > 0).all(), u
    idx, _ = sampling._inverse_cdf(w[:1], jnp.asarray([0.4], jnp.float32))  # 0.4 x 3 = 1.2 -> index 3
    assert int(idx[0]) == 3


def test_nucleus_threshold_from_candidates_and_by_bisection_equal_the_sorted_one():
    """Rows whose 0.9-nucleus fits among 16 candidates and rows where it does not: the candidate
    threshold (exact top_k, and approx_max_k with its count check) is the sorted row's wherever it
    says `inside`, and bisection finds it for every row; float64 sums decide the reference."""
    rng = np.random.default_rng(3)
    scales = np.array([0.3, 1.0, 3.0, 6.0, 10.0, 0.5, 8.0, 2.0])[:, None]
    x64 = rng.normal(0, 1, size=(8, 1000)) * scales
    x64[4, :5] = x64[4].max() + 1.0  # a tie of five at the top
    x = jnp.asarray(x64, jnp.float32)
    x64 = np.asarray(x, np.float64)
    p = 0.9
    w = np.exp(x64 - x64.max(1, keepdims=True))
    srt = -np.sort(-x64, axis=1)
    ws = np.exp(srt - srt[:, :1])
    before = np.cumsum(ws, 1) - ws
    ref = np.where(before < p * w.sum(1, keepdims=True), srt, np.inf).min(1)
    m = jnp.max(x, axis=-1)
    target = p * jnp.sum(jnp.exp(x - m[:, None]), axis=-1)
    np.testing.assert_array_equal(np.asarray(jax.jit(sampling._bisect_threshold)(x, m, target)), ref)
    for approx in (False, True):
        vals, ids, thr, inside = sampling._nucleus_candidates(x, m, target, 16, approx)
        inside = np.asarray(inside)
        assert inside.any() and not inside.all(), approx
        np.testing.assert_array_equal(np.asarray(thr)[inside], ref[inside])
        np.testing.assert_array_equal(np.take_along_axis(x64, np.asarray(ids), 1), np.asarray(vals))


def test_top_p_and_top_k_stay_inside_their_sets():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(np.tile(rng.normal(0, 2, size=(1, 50)), (4000, 1)), jnp.float32)
    t = 0.9
    probs = np.exp(_log_softmax(np.asarray(logits[0]) / t))
    order = np.argsort(-probs)
    top5 = set(order[:5].tolist())
    toks, lps = sampling.sample_logits(logits, jax.random.key(0), t, top_k=5)
    assert set(np.asarray(toks).tolist()) == top5  # all of the top 5 appear, nothing else
    np.testing.assert_allclose(np.asarray(lps), np.log(probs[np.asarray(toks)]), atol=1e-5)

    mass_before = np.cumsum(probs[order]) - probs[order]
    nucleus = set(order[mass_before < 0.7].tolist())
    assert 1 < len(nucleus) < 50
    toks, _ = sampling.sample_logits(logits, jax.random.key(1), t, top_p=0.7)
    assert set(np.asarray(toks).tolist()) == nucleus

    # Both: the nucleus of the renormalised top-3 distribution.
    p3 = probs[order[:3]] / probs[order[:3]].sum()
    both = set(order[:3][(np.cumsum(p3) - p3) < 0.5].tolist())
    toks, _ = sampling.sample_logits(logits, jax.random.key(2), t, top_p=0.5, top_k=3)
    assert set(np.asarray(toks).tolist()) == both


def test_a_rows_tokens_do_not_depend_on_its_batch_its_slot_or_its_start(model):
    """Engine independence at temperature 1: the same rows sampled as one batch, permuted, in
    chunks, and resumed after their first 3 tokens (prompt + those tokens, token_offset 3) give the
    same tokens and log-probs for the same row keys."""
    ids, mask = sampler.pad_prompts(PROMPTS, pad_id=0)
    n, key = 8, jax.random.key(21)
    kw = dict(max_new_tokens=n, temperature=1.0, pad_id=99)
    whole = sampler.generate(model, ids, mask, key=key, **kw)
    tokens, logprobs = np.asarray(whole.tokens), np.asarray(whole.logprobs)
    keys = sampling.row_keys(key, len(PROMPTS))  # what one key for the call derives

    def check(out, rows, upto=n, start=0):
        np.testing.assert_array_equal(np.asarray(out.tokens)[:, :upto - start], tokens[rows, start:upto])
        np.testing.assert_allclose(np.asarray(out.logprobs)[:, :upto - start], logprobs[rows, start:upto],
                                   atol=1e-5, rtol=0)

    check(sampler.generate(model, ids, mask, key=jax.random.key_data(keys), **kw), [0, 1, 2, 3])  # raw [B, 2]
    perm = np.array([2, 0, 3, 1])
    check(sampler.generate(model, ids[perm], mask[perm], key=keys[perm], **kw), perm)
    for rows in (np.array([0, 1]), np.array([2, 3])):
        check(sampler.generate(model, ids[rows], mask[rows], key=keys[rows], **kw), rows)

    k = 3
    resumed_ids, resumed_mask = sampler.pad_prompts([p + tokens[r, :k].tolist() for r, p in enumerate(PROMPTS)])
    graphdef, state = nnx.split(model)
    smp = sampler.get_sampler(graphdef, state, sampler.SamplerSettings(**kw))
    out = smp(state, resumed_ids, resumed_mask, key=keys, limits=np.full(4, n - k), token_offset=np.full(4, k))
    check(out, [0, 1, 2, 3], start=k)
    assert (tokens != np.asarray(sampler.generate(model, ids, mask, key=jax.random.key(22), **kw).tokens)).any()


@pytest.mark.slow
def test_step_sample_gives_the_same_rows_for_any_max_batch():
    """The training rollout keys each row by its index among the step's rows: cutting the 8 rows
    into sampler calls of 3 (the last padded) changes no token at temperature 1."""
    from hbpo_jax.rollout.settings import RolloutSettings
    from hbpo_jax.spec import SamplingSpec
    from hbpo_jax.train import step

    cfg = ModelConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, eos_token_ids=(2,))
    m = create_model(cfg, seed=0)
    m.lm_head[...] = m.lm_head[...].at[:, 2].add(0.6)  # some rows end early
    graphdef, params = nnx.split(m)
    settings = RolloutSettings(max_response_len=24, budgets=(24, 32), samples_per_budget=2, prefix_in_response=False)
    spec = SamplingSpec(settings, group=4, max_prompt_len=64, prefix_loss=False, prompt_format="template")
    tok, problems, key = char_tokenizer(), ["1+1?", "7*8?"], jax.random.key(9)
    whole = step.sample(spec, graphdef, params, tok, problems, key)
    chunked = step.sample(dataclasses.replace(spec, rollout=settings.replace(max_batch=3)), graphdef, params, tok,
                          problems, key)
    for field in ("response_ids", "lengths", "stop_reason", "response_mask"):
        np.testing.assert_array_equal(getattr(chunked, field), getattr(whole, field), err_msg=field)
    np.testing.assert_allclose(chunked.logprobs, whole.logprobs, atol=1e-5)
    assert len(set(map(tuple, whole.response_ids.tolist()))) > 1  # rows differ: it is sampling


def test_top_k_through_generate(model):
    ids, mask = sampler.pad_prompts([[7, 8, 9]] * 64, pad_id=0)
    out = sampler.generate(model, ids, mask, key=jax.random.key(5), max_new_tokens=1, temperature=1.0,
                           top_k=4)
    allowed = set(np.argsort(-_full_logits(model, [7, 8, 9])[-1])[:4].tolist())
    seen = set(np.asarray(out.tokens[:, 0]).tolist())
    assert seen <= allowed and len(seen) > 1


@pytest.mark.slow
def test_sharded_greedy_equals_unsharded_and_uses_params_in_place():
    cfg = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=8,
                      num_kv_heads=4)
    mesh = make_mesh((1, 2, 4))
    model = create_model(cfg, seed=1, mesh=mesh)
    model.lm_head[...] = model.lm_head[...] * 15.0
    graphdef, state = nnx.split(model)
    assert any(len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated
               for x in jax.tree.leaves(state))
    host_state = jax.tree.map(lambda x: jax.device_put(np.asarray(x), jax.devices()[0]), state)
    ids, mask = sampler.pad_prompts(PROMPTS, pad_id=0)
    kw = dict(key=jax.random.key(0), max_new_tokens=5, temperature=0.0, limits=np.array([5, 3, 5, 4]),
              eos_ids=(), pad_id=0, top_p=1.0, top_k=0, prompt_bucket="pow2", cache_dtype=None)
    sharded = sampler.generate((graphdef, state), ids, mask, mesh=mesh, **kw)
    plain = sampler.generate((graphdef, host_state), ids, mask, **kw)
    np.testing.assert_array_equal(np.asarray(sharded.tokens), np.asarray(plain.tokens))
    np.testing.assert_allclose(np.asarray(sharded.logprobs), np.asarray(plain.logprobs), atol=1e-5)
    assert np.asarray(sharded.lengths).tolist() == [5, 3, 5, 4]

    # The jitted prefill and decode take the parameter arrays as they are: the compiled
    # executables expect exactly the parameters' shardings (so nothing is resharded).
    settings = sampler.SamplerSettings(max_new_tokens=5, temperature=0.0)
    smp = sampler.get_sampler(graphdef, state, settings, mesh=mesh)
    param_shardings = [x.sharding for x in jax.tree.leaves(state)]
    prefill, _ = smp.lower(state, batch=4, prompt_len=ids.shape[1])
    got = jax.tree.leaves(prefill.compile().input_shardings[0][0])
    assert len(got) == len(param_shardings)
    assert all(g.is_equivalent_to(p, x.ndim) for g, p, x in zip(got, param_shardings, jax.tree.leaves(state)))
    # The cache [L, B, S, K, D]: layers replicated, batch over (data, fsdp), kv heads over tensor.
    spec = smp.new_cache(4, ids.shape[1]).keys.sharding.spec
    assert tuple(spec)[:4] in ((None, ("data", "fsdp"), None, "tensor"), (None, "fsdp", None, "tensor"))


def test_sampler_object_compiles_once_and_equals_generate(model):
    """Two Samplers' worth of calls: the same settings share one compilation (get_sampler), a
    Sampler's two halves give generate's output, and lowering needs no arrays."""
    graphdef, state = nnx.split(model)
    ids, mask = sampler.pad_prompts(PROMPTS, pad_id=0)
    settings = sampler.SamplerSettings(max_new_tokens=4, eos_ids=[7], pad_id=99, temperature=0.9, top_k=20)
    assert settings == sampler.SamplerSettings(4, (7,), 99, 0.9, 1.0, 20) and hash(settings)
    smp = sampler.get_sampler(graphdef, state, settings)
    assert sampler.get_sampler(graphdef, state, sampler.SamplerSettings(4, (7,), 99, 0.9, 1.0, 20)) is smp
    key = jax.random.key(11)
    first = smp(state, ids, mask, key=key)
    before = dict(sampler.TRACE_COUNTS)
    inputs = smp.prepare(ids, mask, key=key)
    logits, cache = smp.prefill(state, smp.new_cache(*inputs.prompt_ids.shape), inputs)
    halves, _ = smp.decode(state, cache, logits, inputs)
    ref = sampler.generate(model, ids, mask, key=key, max_new_tokens=4, eos_ids=(7,), pad_id=99,
                           temperature=0.9, top_k=20)
    assert dict(sampler.TRACE_COUNTS) == before  # neither the halves nor generate traced again
    for out in (halves, ref):
        np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(first.tokens))
        np.testing.assert_array_equal(np.asarray(out.logprobs), np.asarray(first.logprobs))
        np.testing.assert_array_equal(np.asarray(out.lengths), np.asarray(first.lengths))

    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    prefill, decode = smp.lower(abstract, batch=2, prompt_len=20)
    assert "while" in decode.as_text()
    assert prefill.out_info[0].shape == (2, CFG.vocab_size)
    with pytest.raises(ValueError, match="top_p"):
        sampler.SamplerSettings(max_new_tokens=4, top_p=0.0)
