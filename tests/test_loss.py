"""Tests of hbpo_jax.loss: the paper's worked examples, properties, and NumPy references."""

import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hbpo_jax import loss as L

BUDGETS = (512, 1024, 2048, 2560)
HYP = settings(max_examples=25, deadline=None)
# Jitted once per shape; the strategies below draw from a few shapes so tests compile little.
adv_fn = jax.jit(L.hierarchical_advantages)


def hbpo_batch(rewards_per_budget, prompts=1, samples=4):
    """[prompts, budgets*samples] budgets and rewards in the [prompts, budgets, samples] layout."""
    b = np.repeat(np.array(BUDGETS, np.int32), samples)[None].repeat(prompts, 0)
    r = np.repeat(np.asarray(rewards_per_budget, np.float32), samples)[None].repeat(prompts, 0)
    return r, b


def f2_ref(b, beta=4.0, l_max=4096):
    return beta * math.cos(math.pi * b / (2 * l_max))


# ---------------------------------------------------------------------------- the paper's examples

def test_budget_ceiling_values():
    got = np.asarray(L.budget_ceiling(jnp.array(BUDGETS)))
    np.testing.assert_array_equal(np.round(got.astype(np.float64), 4), [3.9231, 3.6955, 2.8284, 2.2223])


def test_all_correct_within_budget_worked_example():
    r, b = hbpo_batch([f2_ref(x) for x in BUDGETS])
    a = np.asarray(L.hierarchical_advantages(r, b))[0]
    np.testing.assert_array_equal(np.round(a[::4].astype(np.float64), 3), [1.074, 0.750, -0.481, -1.343])
    # Within a subgroup every response gets the same advantage.
    np.testing.assert_allclose(a.reshape(4, 4), a[::4, None].repeat(4, 1), rtol=0, atol=1e-6)


def test_all_wrong_gives_minus_ceiling():
    r, b = hbpo_batch([0.0] * 4)
    a = np.asarray(L.hierarchical_advantages(r, b))[0]
    np.testing.assert_allclose(a, -np.array([f2_ref(x) for x in b[0]]), atol=1e-5)
    assert abs(a[0] - (-3.923)) < 1e-3


def released_code_advantage(rewards, budgets, k, m):
    """Independent re-derivation of the released code: reshape to [P, K, M], intra added twice."""
    p = rewards.shape[0]
    r = rewards.astype(np.float64)
    inter = (r - r.mean(1, keepdims=True)) / (r.std(1, ddof=1, keepdims=True) + 1e-6)
    sub = r.reshape(p, k, m).mean(2, keepdims=True).repeat(m, 2).reshape(p, k * m)
    ceil = 4.0 * np.cos(np.pi * budgets / (2 * 4096))
    return inter + (sub - ceil) + (sub - ceil)


def test_intra_weight_two_reproduces_released_code():
    rng = np.random.default_rng(0)
    r = rng.uniform(-1, 4, size=(3, 16)).astype(np.float32)
    _, b = hbpo_batch([0] * 4, prompts=3)
    got = np.asarray(L.hierarchical_advantages(r, b, intra_weight=2.0))
    np.testing.assert_allclose(got, released_code_advantage(r, b, 4, 4), rtol=1e-5, atol=1e-5)
    # And it really differs from the default weight.
    assert not np.allclose(got, np.asarray(L.hierarchical_advantages(r, b)), atol=1e-3)


def test_code_and_paper_variants_differ_only_for_512_below_322():
    n = np.arange(4097)
    diff = set()
    for b in BUDGETS:
        code = np.asarray(L.budget_reward(True, True, n, b, variant="code"))
        paper = np.asarray(L.budget_reward(True, True, n, b, variant="paper"))
        diff |= {(b, int(i)) for i in np.nonzero(np.abs(code - paper) > 1e-6)[0]}
    assert diff == {(512, i) for i in range(322)}


def test_correct_at_cap_with_small_budget_scores_below_wrong():
    r = float(L.budget_reward(True, True, 4096, 512))
    assert r == pytest.approx(-0.875, abs=1e-5)
    assert r < float(L.budget_reward(False, True, 4096, 512))


def test_budget_reward_cases():
    correct = jnp.array([True, False, True, False])
    fmt = jnp.array([True, True, False, False])
    r = np.asarray(L.budget_reward(correct, fmt, 800, 1024))
    n, b = 800.0, 1024.0
    f1 = 4 * math.cos(math.pi * n / 8192) - (b - n) / 4096
    np.testing.assert_allclose(r, [min(f1, f2_ref(b)), 0.0, -1.0, -1.0], atol=1e-5)
    r_paper = L.budget_reward(correct, fmt, 800, 1024, variant="paper", format_reward=0.0)
    np.testing.assert_allclose(np.asarray(r_paper), [f2_ref(1024), 0.0, 0.0, 0.0], atol=1e-5)
    beyond = float(L.budget_reward(True, True, 3000, 1024, alpha=0.001))
    assert beyond == pytest.approx(4 * math.cos(math.pi * 3000 / 8192) - 0.001 * 1976, abs=1e-5)


def test_bad_variant_names_it():
    with pytest.raises(ValueError, match="oops"):
        L.budget_reward(True, True, 1, 1, variant="oops")


# ---------------------------------------------------------------------------- properties

@st.composite
def groups(draw):
    p = draw(st.sampled_from([1, 3]))
    g = draw(st.sampled_from([2, 5, 16]))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    r = rng.normal(size=(p, g)).astype(np.float32) * draw(st.sampled_from([0.1, 1.0, 3.0]))
    b = rng.choice(np.array([256, 512, 1024, 2048, 2560, 3000], np.int32),
                   size=(p, g))[:, :] if draw(st.booleans()) else np.full((p, g), 1024, np.int32)
    return r, b, rng


def loop_reference(r, b, w=1.0):
    """Plain per-group Python loops."""
    out = np.zeros(r.shape, np.float64)
    for p in range(r.shape[0]):
        row = [float(x) for x in r[p]]
        g = len(row)
        mean = sum(row) / g
        std = math.sqrt(sum((x - mean) ** 2 for x in row) / (g - 1))
        for i in range(g):
            peers = [row[j] for j in range(g) if b[p, j] == b[p, i]]
            intra = sum(peers) / len(peers) - f2_ref(float(b[p, i]))
            out[p, i] = (row[i] - mean) / (std + 1e-6) + w * intra
    return out


def f32_rounding(r):
    """[P, 1]: how far float32 rounding can move a row's normalised rewards (r - mean) / std: a few
    ulps of its largest |r| over its std, large when a group's rewards nearly tie (two draws 3e-5
    apart at a scale of 0.1 move the float32 result by ~3e-4; the float64 reference does not)."""
    std = r.astype(np.float64).std(1, ddof=1, keepdims=True)
    return 8 * np.finfo(np.float32).eps * np.abs(r).max(1, keepdims=True) / (std + 1e-6)


@HYP
@given(groups())
def test_matches_python_loop(data):
    r, b, _ = data
    got = np.asarray(adv_fn(r, b, intra_weight=1.5))
    want = loop_reference(r, b, 1.5)
    assert (np.abs(got - want) <= 1e-4 + 1e-4 * np.abs(want) + f32_rounding(r)).all()


@HYP
@given(groups())
def test_inter_term_sums_to_zero(data):
    r, b, _ = data
    inter = np.asarray(adv_fn(r, b, intra_weight=0.0))
    scale = np.abs(inter).max() + 1.0
    tol = r.shape[1] * (1e-4 * scale + f32_rounding(r)[:, 0])
    assert (np.abs(inter.sum(1)) <= tol).all(), (inter.sum(1), tol)


def test_inter_term_of_a_near_tie():
    # The group that made test_inter_term_sums_to_zero fail at a fixed 3.4e-4: rewards 3.5e-5
    # apart, so the float32 sum of the two normalised rewards is off by 5.8e-4, within
    # f32_rounding's bound and far from a wrong sign or scale.
    r = np.array([[-0.24432059, -0.10114574], [-0.13491786, -0.13488318]], np.float32)
    b = np.full(r.shape, 1024, np.int32)
    inter = np.asarray(adv_fn(r, b, intra_weight=0.0))
    np.testing.assert_allclose(np.abs(inter), np.abs(loop_reference(r, b, 0.0)), atol=1e-3)
    assert (np.abs(inter.sum(1)) <= r.shape[1] * f32_rounding(r)[:, 0] + 1e-4).all()


@HYP
@given(groups(), st.floats(-50, 50))
def test_inter_term_shift_invariant(data, c):
    r, b, _ = data
    a0 = np.asarray(adv_fn(r, b, intra_weight=0.0))
    a1 = np.asarray(adv_fn(r + np.float32(c), b, intra_weight=0.0))
    np.testing.assert_allclose(a0, a1, atol=2e-3)


@HYP
@given(groups())
def test_permuting_a_group_permutes_advantages(data):
    r, b, rng = data
    perm = rng.permutation(r.shape[1])
    a = np.asarray(adv_fn(r, b))
    ap = np.asarray(adv_fn(r[:, perm], b[:, perm]))
    np.testing.assert_allclose(ap, a[:, perm], rtol=1e-5, atol=1e-5)


def test_group_of_one_is_finite():
    a = np.asarray(L.hierarchical_advantages(np.ones((2, 1), np.float32), np.full((2, 1), 512)))
    assert np.all(np.isfinite(a))
    np.testing.assert_allclose(a, 1.0 - f2_ref(512), atol=1e-5)  # inter 0, intra R - f2
    assert np.all(np.asarray(L.grpo_advantages(np.ones((2, 1)))) == 0.0)


def test_grpo_and_dr_grpo():
    r = np.array([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]], np.float32)
    std = np.std(r[0], ddof=1)
    np.testing.assert_allclose(np.asarray(L.grpo_advantages(r))[0], (r[0] - 0.5) / (std + 1e-6),
                               rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(L.grpo_advantages(r))[1], 0.0)
    np.testing.assert_array_equal(np.asarray(L.grpo_advantages(r, scale_by_std=False))[0],
                                  [0.5, -0.5, -0.5, 0.5])


def test_jit_vmap_grad():
    r, b = hbpo_batch([3.0, 2.0, 1.0, 0.0], prompts=2)
    r = r + np.arange(16, dtype=np.float32)[None] * 0.01
    eager = L.hierarchical_advantages(r, b)
    np.testing.assert_allclose(jax.jit(L.hierarchical_advantages)(r, b), eager, atol=1e-6)
    stacked = jax.vmap(L.hierarchical_advantages)(jnp.stack([r, r * 2]), jnp.stack([b, b]))
    np.testing.assert_allclose(stacked[0], eager, atol=1e-6)
    g = jax.jit(jax.grad(lambda x: jnp.sum(L.hierarchical_advantages(x, b) ** 2)))(jnp.asarray(r))
    assert np.all(np.isfinite(g)) and np.any(g != 0)
    gr = jax.jit(jax.grad(lambda n: L.budget_reward(True, True, n, 1024)))(jnp.float32(900.0))
    assert np.isfinite(gr)


# ---------------------------------------------------------------------------- policy loss

def np_policy_loss(logp, old, adv, mask, clip_low, clip_high, dual, ref, kl_coef, agg, scale):
    """Direct NumPy transcription of the loss as the paper (arXiv 2507.15844) states it."""
    logp, old, mask = logp.astype(np.float64), old.astype(np.float64), mask.astype(np.float64)
    a = adv[:, None] if adv.ndim == 1 else adv
    a = np.broadcast_to(a, logp.shape).astype(np.float64)
    r = np.exp(logp - old)
    pg = np.maximum(-a * r, -a * np.clip(r, 1 - clip_low, 1 + clip_high))
    if dual is not None:
        pg = np.where(a < 0, np.minimum(pg, -a * dual), pg)
    tok = pg.copy()
    if ref is not None and kl_coef > 0:
        d = ref - logp
        tok = tok + kl_coef * (np.exp(d) - d - 1)
    if agg == "token-mean":
        return (tok * mask).sum() / max(mask.sum(), 1)
    if agg == "sequence-mean-token-mean":
        rows = [(tok[i] * mask[i]).sum() / mask[i].sum() for i in range(len(tok)) if mask[i].sum()]
        return np.mean(rows) if rows else 0.0
    return (tok * mask).sum() / (scale if scale is not None else tok.size)


@pytest.mark.parametrize("agg", L.AGGREGATIONS)
@pytest.mark.parametrize("dual", [None, 3.0])
@pytest.mark.parametrize("with_ref", [False, True])
def test_policy_loss_matches_numpy(agg, dual, with_ref):
    rng = np.random.default_rng(zlib.crc32(f"{agg}{dual}{with_ref}".encode()))
    bsz, t = 8, 12
    logp = rng.normal(-2, 0.3, (bsz, t)).astype(np.float32)
    old = (logp + rng.normal(0, 0.6, (bsz, t))).astype(np.float32)  # wide: all clips active
    adv = rng.normal(0, 2, (bsz,)).astype(np.float32)
    mask = rng.random((bsz, t)) < 0.7
    mask[0] = False  # one empty sequence
    ref = (logp + rng.normal(0, 0.2, (bsz, t))).astype(np.float32) if with_ref else None
    scale = 100.0 if agg == "token-sum-norm" and with_ref else None
    loss, m = L.policy_loss(logp, old, adv, mask, dual_clip=dual, ref_logp=ref, kl_coef=0.1,
                            aggregation=agg, loss_scale_tokens=scale)
    want = np_policy_loss(logp, old, adv, mask, 0.2, 0.28, dual, ref, 0.1, agg, scale)
    assert float(loss) == pytest.approx(want, rel=1e-5, abs=1e-6)
    pg_only = np_policy_loss(logp, old, adv, mask, 0.2, 0.28, dual, None, 0.0, agg, scale)
    assert float(m["pg_loss"]) == pytest.approx(pg_only, rel=1e-5, abs=1e-6)
    # Clip fractions from their definitions.
    r = np.exp(logp.astype(np.float64) - old)
    a = np.broadcast_to(adv[:, None], r.shape)
    n = mask.sum()
    assert float(m["clip_frac_low"]) == pytest.approx(((a < 0) & (r < 0.8) & mask).sum() / n)
    assert float(m["clip_frac_high"]) == pytest.approx(((a > 0) & (r > 1.28) & mask).sum() / n)
    want_dual = ((a < 0) & (r > 3.0) & mask).sum() / n if dual else 0.0
    assert float(m["clip_frac_dual"]) == pytest.approx(want_dual)
    assert float(m["ratio_mean"]) == pytest.approx((r * mask).sum() / n, rel=1e-5)
    assert float(m["approx_kl"]) == pytest.approx(((r - 1 - np.log(r)) * mask).sum() / n,
                                                  rel=1e-4)
    assert ("ref_kl" in m) == with_ref
    assert float(m["clip_frac_low"]) > 0 and float(m["clip_frac_high"]) > 0


def test_per_token_advantages_and_kl_coef_zero():
    rng = np.random.default_rng(1)
    logp = rng.normal(-1, 0.2, (3, 5)).astype(np.float32)
    old = logp + 0.1
    adv = rng.normal(size=(3, 5)).astype(np.float32)
    mask = np.ones((3, 5), bool)
    loss, _ = L.policy_loss(logp, old, adv, mask, ref_logp=logp - 1.0, kl_coef=0.0)
    want = np_policy_loss(logp, old, adv, mask, 0.2, 0.28, 3.0, None, 0.0, "token-mean", None)
    assert float(loss) == pytest.approx(want, rel=1e-5)


def test_dual_clip_caps_negative_advantage():
    loss, m = L.policy_loss(jnp.array([[5.0]]), jnp.array([[0.0]]), jnp.array([-2.0]),
                            jnp.array([[True]]))
    assert float(loss) == pytest.approx(6.0)  # -A * 3, not -A * e^5
    assert float(m["clip_frac_dual"]) == 1.0


def test_sgd_step_moves_logp_with_advantage_sign():
    logp0 = jnp.full((2, 4), -1.5)
    adv = jnp.array([1.0, -1.0])
    mask = jnp.array([[1, 1, 1, 0], [1, 1, 0, 0]], bool)
    grad = jax.jit(jax.grad(lambda lp: L.policy_loss(lp, logp0, adv, mask)[0]))(logp0)
    logp1 = logp0 - 0.1 * grad
    assert np.all(np.asarray(logp1[0, :3] > logp0[0, :3]))
    assert np.all(np.asarray(logp1[1, :2] < logp0[1, :2]))
    np.testing.assert_array_equal(np.asarray(grad)[~np.asarray(mask)], 0.0)


def test_masked_garbage_does_not_leak():
    logp = jnp.array([[-1.0, jnp.nan, -jnp.inf], [-0.5, -0.7, jnp.inf]])
    old = jnp.array([[-1.1, jnp.inf, 0.0], [-0.4, -jnp.inf, jnp.nan]])
    mask = jnp.array([[True, False, False], [True, False, False]])
    for agg in L.AGGREGATIONS:
        f = lambda lp: L.policy_loss(lp, old, jnp.array([1.0, -1.0]), mask, ref_logp=old,
                                     kl_coef=0.1, aggregation=agg)
        (loss, metrics), g = jax.jit(jax.value_and_grad(f, has_aux=True))(logp)
        assert np.isfinite(float(loss)) and np.all(np.isfinite(np.asarray(g)))
        assert all(np.isfinite(float(v)) for v in metrics.values())


def test_all_masked_batch_is_zero():
    z = jnp.zeros((2, 3))
    for agg in L.AGGREGATIONS:
        f = lambda lp: L.policy_loss(lp, z, jnp.ones(2), jnp.zeros((2, 3), bool), aggregation=agg)[0]
        loss, g = jax.jit(jax.value_and_grad(f))(z)
        assert float(loss) == 0.0 and np.all(np.asarray(g) == 0.0)


def test_policy_loss_jits_and_rejects_bad_aggregation():
    f = jax.jit(lambda a, b, c, d: L.policy_loss(a, b, c, d)[0])
    assert np.isfinite(float(f(jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.ones(2), jnp.ones((2, 3)))))
    with pytest.raises(ValueError, match="token-avg"):
        L.policy_loss(jnp.zeros((1, 1)), jnp.zeros((1, 1)), jnp.ones(1), jnp.ones((1, 1)),
                      aggregation="token-avg")


# ---------------------------------------------------------------------------- related objectives

def test_related_rewards():
    c, f = jnp.array([True, True, False, True]), jnp.array([True, True, True, False])
    np.testing.assert_array_equal(np.asarray(L.classic_reward(c, f)), [1, 1, 0, 0])
    n, b = jnp.array([100, 3000, 100, 100]), jnp.array([1000, 1000, 1000, 1000])
    np.testing.assert_allclose(np.asarray(L.l1_exact_reward(c, f, n, b)),
                               [1 - 0.27, 1 - 0.6, -0.27, -0.27], atol=1e-6)
    np.testing.assert_allclose(np.asarray(L.l1_max_reward(c, f, n, b)),
                               [min(1.0, 0.5 + 0.00015 * 900), 0.5 - 0.3, 0.0, 0.0], atol=1e-6)
    # Yeo et al.: correct 2 -> 1 over the length, wrong -10 -> 0, format error (cut off) -10.
    cos = np.asarray(L.cosine_reward(c, f, jnp.array([0, 4096, 0, 0])))
    np.testing.assert_allclose(cos, [2.0, 1.0, -10.0, -10.0], atol=1e-6)
    wrong = np.asarray(L.cosine_reward(jnp.zeros(3, bool), jnp.ones(3, bool), jnp.array([0, 2048, 4096])))
    np.testing.assert_allclose(wrong, [-10.0, -5.0, 0.0], atol=1e-5)
    mid = float(L.cosine_reward(True, True, 2048, r_min=-1.0, r_max=3.0))
    assert mid == pytest.approx(1.0, abs=1e-6)


def test_dapo_overlong_penalty():
    pen = np.asarray(L.dapo_overlong_penalty(jnp.array([0, 3584, 3840, 4096, 5000]),
                                             max_len=4096, cache_len=512))
    np.testing.assert_allclose(pen, [0.0, 0.0, -0.5, -1.0, -1.0], atol=1e-6)
    step = np.asarray(L.dapo_overlong_penalty(jnp.array([4096, 4097]), max_len=4096, cache_len=0))
    np.testing.assert_array_equal(step, [0.0, -1.0])


def test_dynamic_sampling_mask():
    c = jnp.array([[True, True], [False, False], [True, False]])
    np.testing.assert_array_equal(np.asarray(L.dynamic_sampling_mask(c)), [False, False, True])


def test_length_rewards_refuse_concrete_misuse_and_leave_tracers_alone():
    # Budgets above l_max used to pay a correct answer -1.4 to -4.0, silently (issue 31, row 12).
    ok = np.ones(3, bool)
    with pytest.raises(ValueError, match="budgets above l_max=4096"):
        L.budget_reward(ok, ok, np.array([100, 200, 300]), np.array([512, 8192, 8192]))
    with pytest.raises(ValueError, match="lengths must be ≥ 0"):
        L.budget_reward(ok, ok, np.array([-1, 2, 3]), np.array([512, 512, 512]), l_max=1024)
    with pytest.raises(ValueError, match="budgets above l_max"):
        L.budget_ceiling(np.array([5000]))
    with pytest.raises(ValueError, match="lengths must be ≥ 0"):
        L.l1_exact_reward(ok, ok, np.array([-5, 1, 1]), np.array([8, 8, 8]))
    with pytest.raises(ValueError, match="lengths must be ≥ 0"):
        L.dapo_overlong_penalty(np.array([-5]), max_len=16, cache_len=4)
    # Under jit the inputs are tracers: not checked (the run spec checks budgets < l_max).
    traced = jax.jit(lambda n, b: L.budget_reward(ok, ok, n, b))(np.array([1, 2, 3]), np.array([512, 8192, 8192]))
    assert traced.shape == (3,)
    assert float(L.budget_reward(True, True, 100, 512, l_max=8192)) > 0
