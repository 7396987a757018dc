"""hbpo_jax.objectives: the registry, each objective's recipe, and compute_advantages routing
each setting to the function that declares it."""
import numpy as np
import pytest

from hbpo_jax import loss as L
from hbpo_jax import objectives as O


def hbpo_batch(per_budget_rewards, prompts=1, samples=4, budgets=(512, 1024, 2048, 2560)):
    """[prompts, budgets*samples] budgets and rewards in the [prompts, budgets, samples] layout."""
    b = np.tile(np.repeat(np.asarray(budgets), samples), (prompts, 1))
    r = np.tile(np.repeat(np.asarray(per_budget_rewards, np.float32), samples), (prompts, 1))
    return r, b


def test_registry():
    assert set(O.OBJECTIVES) == {"hbpo", "grpo", "dr_grpo", "dapo", "l1_exact", "l1_max",
                                 "cosine", "classic"}
    with pytest.raises(ValueError, match="hbpo"):
        O.get_objective("ppo")
    hbpo = O.get_objective("hbpo")
    assert hbpo.prompting == "budget" and hbpo.aggregation == "token-mean"
    assert {o.prompting for o in O.OBJECTIVES.values() if o.name != "hbpo"} == {"natural", "l1", "l1_max"}
    assert (hbpo.clip_low, hbpo.clip_high, hbpo.dual_clip) == (0.2, 0.28, 3.0)
    assert O.get_objective("dapo").dynamic_sampling and O.get_objective("dapo").overlong_penalty
    assert O.get_objective("dr_grpo").aggregation == "token-sum-norm"
    with pytest.raises(Exception):
        hbpo.name = "x"  # frozen


def test_compute_advantages():
    rng = np.random.default_rng(3)
    correct = rng.random((2, 16)) < 0.5
    fmt = rng.random((2, 16)) < 0.9
    lengths = rng.integers(50, 4096, (2, 16)).astype(np.int32)
    _, b = hbpo_batch([0] * 4, prompts=2)
    r, a = O.compute_advantages("hbpo", correct, fmt, lengths, b, intra_weight=2.0, beta=3.0)
    want_r = L.budget_reward(correct, fmt, lengths, b, beta=3.0)
    np.testing.assert_allclose(r, want_r)
    np.testing.assert_allclose(a, L.hierarchical_advantages(want_r, b, beta=3.0, intra_weight=2.0),
                               atol=1e-6)
    r, a = O.compute_advantages("dapo", correct, fmt, lengths, b, max_len=4096, cache_len=1024)
    want_r = L.dapo_reward(correct, fmt) + L.dapo_overlong_penalty(lengths, max_len=4096,
                                                                    cache_len=1024)
    np.testing.assert_allclose(r, want_r)
    np.testing.assert_allclose(a, L.grpo_advantages(want_r), atol=1e-6)
    for name in O.OBJECTIVES:
        r, a = O.compute_advantages(name, correct, fmt, lengths, b)
        assert r.shape == a.shape == (2, 16) and np.all(np.isfinite(np.asarray(a)))
    with pytest.raises(TypeError, match="intra_weight"):
        O.compute_advantages("grpo", correct, fmt, lengths, b, intra_weight=2.0)
    # Each objective declares the settings it takes (spec.py passes only those).
    assert O.OBJECTIVES["hbpo"].setting_names() == {"beta", "format_reward", "intra_weight", "l_max", "variant",
                                                      "wrong_reward"}
    assert not O.OBJECTIVES["grpo"].setting_names() and not O.OBJECTIVES["dr_grpo"].setting_names()
