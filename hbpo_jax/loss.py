"""Rewards, advantages and the clipped policy loss of HBPO and related objectives (the pure
math; hbpo_jax.objectives puts them together into named recipes).

Every array function here is pure `jax.numpy`: safe under `jax.jit`, `jax.vmap` and
`jax.grad`. String/enum arguments (variants, aggregation names) are static Python values and
are validated eagerly, before any tracing.

Layout: a rollout batch is [prompts, budgets, samples] flattened to
[prompts, group] with group = budgets * samples. The advantage functions do not rely on that
order: budget subgroups are found by equality of budget values, so shuffled groups and any
number of distinct budgets work.

Dtypes: rewards and advantages are float32; lengths and budgets int32 (any integer or float
dtype is accepted and cast to float32 for arithmetic); correct / format_ok are bool.

Misuse: on concrete inputs (numpy arrays, Python numbers, jax arrays outside a trace) the length
rewards raise ValueError for a negative length or budget and for a budget above `l_max` (HBPO's
cosine turns negative past l_max: a correct answer would be paid less than a wrong one). Under
jit / vmap / grad the inputs are tracers and are not checked: check them before tracing (the
run spec does: rollout.budgets < rollout.max_response_len = objective.l_max).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "budget_ceiling", "budget_reward", "hierarchical_advantages", "grpo_advantages",
    "policy_loss", "classic_reward", "cosine_reward", "l1_exact_reward", "l1_max_reward",
    "dapo_reward", "dapo_overlong_penalty", "dynamic_sampling_mask", "check_lengths", "AGGREGATIONS",
    "REWARD_VARIANTS",
]

# The paper's constants (Lyu et al. 2025, arXiv 2507.15844).
BETA = 4.0
L_MAX = 4096
REWARD_VARIANTS = ("code", "paper")
AGGREGATIONS = ("token-mean", "sequence-mean-token-mean", "token-sum-norm")


def _concrete(x) -> np.ndarray | None:
    """x as a numpy array, or None for a tracer (a value known only when the program runs)."""
    if isinstance(x, jax.core.Tracer):
        return None
    return np.asarray(x)


def check_lengths(lengths=None, budgets=None, *, l_max: int | None = None) -> None:
    """ValueError for concrete negative lengths or budgets, or budgets above l_max (see the
    module docstring); tracers pass unchecked."""
    if l_max is not None and not l_max > 0:
        raise ValueError(f"l_max must be positive, got {l_max}.")
    for name, x in (("lengths", lengths), ("budgets", budgets)):
        v = None if x is None else _concrete(x)
        if v is None or v.size == 0:
            continue
        if (v < 0).any():
            raise ValueError(f"{name} must be ≥ 0, got {v.min()}.")
        if name == "budgets" and l_max is not None and (v > l_max).any():
            raise ValueError(f"budgets above l_max={l_max} (got {v.max()}): the reward's cosine turns negative "
                             "past l_max; pass l_max = the rollout's max_response_len.")


def _f32(x) -> jax.Array:
    return jnp.asarray(x).astype(jnp.float32)


def _cos_len(n, beta: float, l_max: int) -> jax.Array:
    """beta * cos(pi * n / (2 * l_max)), the shape shared by f1 and f2 (true pi)."""
    return beta * jnp.cos(math.pi * _f32(n) / (2.0 * l_max))


def budget_ceiling(budgets, *, beta: float = BETA, l_max: int = L_MAX) -> jax.Array:
    """f2(b) = beta * cos(pi * b / (2 * l_max)): the best reward a budget can pay.

    Args:
      budgets: int32 array, any shape (token budgets b).
    Returns:
      float32 array of the same shape. f2(512, 1024, 2048, 2560) = 3.9231, 3.6955, 2.8284, 2.2223.
    Raises:
      ValueError: concrete budgets negative or above l_max.
    """
    check_lengths(budgets=budgets, l_max=l_max)
    return _cos_len(budgets, beta, l_max)


def budget_reward(correct, format_ok, lengths, budgets, *, beta: float = BETA,
                  l_max: int = L_MAX, alpha: float | None = None, variant: str = "code",
                  format_reward: float = -1.0, wrong_reward: float = 0.0) -> jax.Array:
    """HBPO's budget-aware reward.

    f1(n, b) = beta*cos(pi*n/(2*l_max)) - alpha*|n - b|   (exploration beyond the budget)
    f2(b)    = beta*cos(pi*b/(2*l_max))                    (the budget's ceiling)

    Correct answers: variant "code" (released code, default) pays min(f1, f2); variant "paper"
    pays f2 if n <= b else f1. The two differ only where f1 < f2 with n <= b, i.e. b = 512 and
    n < 322 among the default budgets. Wrong answers pay `wrong_reward`, format errors (no
    `</think>` or no box) pay `format_reward` whatever `correct` says.

    Args:
      correct: bool array [...] (answer matches).
      format_ok: bool array [...] (response had `</think>` and a box after it).
      lengths: int32 array [...] response lengths n in tokens (budget prefix included).
      budgets: int32 array [...] budgets b; all four arrays broadcast together.
    Returns:
      float32 array [...] of rewards.
    Raises:
      ValueError: unknown `variant`; concrete lengths or budgets negative, budgets above l_max.
    """
    if variant not in REWARD_VARIANTS:
        raise ValueError(f"unknown HBPO reward variant {variant!r}; expected one of {REWARD_VARIANTS}")
    check_lengths(lengths, budgets, l_max=l_max)
    alpha = 1.0 / l_max if alpha is None else alpha
    n, b = _f32(lengths), _f32(budgets)
    f1 = _cos_len(n, beta, l_max) - alpha * jnp.abs(n - b)
    f2 = _cos_len(b, beta, l_max)
    if variant == "code":
        r_correct = jnp.minimum(f1, f2)
    else:
        r_correct = jnp.where(n <= b, f2, f1)
    r = jnp.where(jnp.asarray(correct, bool), r_correct, jnp.float32(wrong_reward))
    return jnp.where(jnp.asarray(format_ok, bool), r, jnp.float32(format_reward)).astype(jnp.float32)


def _group_stats(rewards: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-group mean and std (ddof=1) over the last axis; a group of one has std 0, not NaN."""
    g = rewards.shape[-1]
    mean = jnp.mean(rewards, axis=-1, keepdims=True)
    sq = jnp.sum(jnp.square(rewards - mean), axis=-1, keepdims=True)
    # G is static: for G == 1 the sum of squares is 0 and max(G-1, 1) avoids 0/0.
    std = jnp.sqrt(sq / max(g - 1, 1))
    return mean, std


def grpo_advantages(rewards, *, scale_by_std: bool = True, eps: float = 1e-6) -> jax.Array:
    """GRPO group-normalised advantages; scale_by_std=False is Dr. GRPO (R - mean).

    Args:
      rewards: float32 [prompts, group].
    Returns:
      float32 [prompts, group]: (R - mean) / (std(ddof=1) + eps) per group, or R - mean.
    """
    r = _f32(rewards)
    mean, std = _group_stats(r)
    centred = r - mean
    return centred / (std + eps) if scale_by_std else centred


def hierarchical_advantages(rewards, budgets, *, beta: float = BETA, l_max: int = L_MAX,
                            intra_weight: float = 1.0, eps: float = 1e-6) -> jax.Array:
    """HBPO's two-level advantage: A = A_inter + intra_weight * A_intra.

    A_inter[i] = (R[i] - mean(R)) / (std(R, ddof=1) + eps) over the prompt's whole group.
    A_intra[i] = mean(R over the responses sharing i's budget) - f2(b_i)  (<= 0 when R <= f2).
    intra_weight=2 reproduces the released code (which adds the intra term twice).

    Subgroups are found with an equality mask, so responses may come in any order within a
    group and the number of distinct budgets is free (a [G, G] mask per prompt: G is small).

    Args:
      rewards: float32 [prompts, group].
      budgets: int32 [prompts, group], the budget each response was prompted with.
    Returns:
      float32 [prompts, group]. A group of size 1 has A_inter = 0.
    """
    r = _f32(rewards)
    a_inter = grpo_advantages(r, scale_by_std=True, eps=eps)
    b = jnp.asarray(budgets)
    same = (b[..., :, None] == b[..., None, :]).astype(jnp.float32)  # [P, G, G]
    # Each row contains its own diagonal, so the count is >= 1: no division by zero.
    sub_mean = jnp.sum(same * r[..., None, :], axis=-1) / jnp.sum(same, axis=-1)
    a_intra = sub_mean - budget_ceiling(b, beta=beta, l_max=l_max)
    return a_inter + intra_weight * a_intra


# ----------------------------------------------------------------------------------------
# Policy loss.

# Bound on |log ratio| before exp: keeps a stale or corrupted log-prob from making inf (and
# inf * 0 = NaN) while changing nothing for any ratio a clipped objective can still use.
_MAX_LOG_RATIO = 20.0


def _k3(log_r: jax.Array) -> jax.Array:
    """k3 estimator of KL(p || q) from log_r = log q(x) - log p(x), x ~ p: e^lr - lr - 1 >= 0."""
    return jnp.exp(log_r) - log_r - 1.0


def _masked_mean(x: jax.Array, m: jax.Array) -> jax.Array:
    return jnp.sum(x * m) / jnp.maximum(jnp.sum(m), 1.0)


def _aggregate(per_token: jax.Array, m: jax.Array, aggregation: str,
               loss_scale_tokens: float | None) -> jax.Array:
    """Reduce masked per-token losses [batch, tokens] to a scalar (see `policy_loss`)."""
    if aggregation == "token-mean":
        return _masked_mean(per_token, m)
    if aggregation == "sequence-mean-token-mean":
        n_tok = jnp.sum(m, axis=-1)
        seq = jnp.sum(per_token * m, axis=-1) / jnp.maximum(n_tok, 1.0)
        has = (n_tok > 0).astype(jnp.float32)
        return jnp.sum(seq * has) / jnp.maximum(jnp.sum(has), 1.0)
    # token-sum-norm
    scale = per_token.shape[0] * per_token.shape[1] if loss_scale_tokens is None else loss_scale_tokens
    return jnp.sum(per_token * m) / scale


def policy_loss(logp, old_logp, advantages, mask, *, clip_low: float = 0.2,
                clip_high: float = 0.28, dual_clip: float | None = 3.0, ref_logp=None,
                kl_coef: float = 0.0, aggregation: str = "token-mean",
                loss_scale_tokens: float | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Clipped surrogate (clip-higher + dual clip) with optional k3 KL to a reference.

    Per token: r = exp(logp - old_logp),
      pg = max(-A*r, -A*clip(r, 1 - clip_low, 1 + clip_high)),
      for A < 0: pg = min(pg, -A*dual_clip)  (dual clip; dual_clip=None disables it),
      loss = pg + kl_coef * k3(ref_logp - logp)  when ref_logp is given and kl_coef > 0,
    where k3(x) = exp(x) - x - 1.

    Aggregations of the masked per-token loss:
      "token-mean": sum over masked tokens / number of masked tokens (DAPO, HBPO).
      "sequence-mean-token-mean": mean over each sequence's tokens, then mean over sequences
        with at least one token (original GRPO).
      "token-sum-norm": sum over masked tokens / constant (Dr. GRPO). The constant is
        `loss_scale_tokens`, default batch * tokens (the padded tensor size, i.e. batch x the
        generation cap when tokens is padded to it). Pass a fixed value (e.g. global batch x
        L_max) when gradients are accumulated so every mini-batch is scaled alike.

    Masked-out positions are zeroed with `where` before exp, so padding holding garbage
    (-inf, NaN) leaks into neither loss nor gradient. An all-masked batch gives loss 0.

    Args:
      logp: float32 [batch, tokens] log-probs of the sampled tokens under the current policy.
      old_logp: float32 [batch, tokens] the same under the rollout policy (treated as constant).
      advantages: float32 [batch] (broadcast over tokens) or [batch, tokens].
      mask: bool or float [batch, tokens], true on response tokens that receive the loss.
      ref_logp: optional float32 [batch, tokens] log-probs under the reference model.
    Returns:
      (loss, metrics): loss float32 scalar; metrics float32 scalars (all gradient-stopped):
        pg_loss (the surrogate alone, same aggregation), clip_frac_low / clip_frac_high
        (token fraction where the lower / upper clip is the active branch: A<0 and
        r<1-clip_low / A>0 and r>1+clip_high), clip_frac_dual (A<0 and r>dual_clip),
        approx_kl (k3 estimate of KL(old || current) = r - 1 - log r, token-mean),
        ratio_mean (token-mean of r), and ref_kl (token-mean k3 to the reference) when
        ref_logp is given.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; expected one of {AGGREGATIONS}")
    per_token, pg, m, stats = token_losses(logp, old_logp, advantages, mask, clip_low=clip_low,
                                           clip_high=clip_high, dual_clip=dual_clip, ref_logp=ref_logp,
                                           kl_coef=kl_coef)
    loss = _aggregate(per_token, m, aggregation, loss_scale_tokens)
    metrics = {k: _masked_mean(v, m) for k, v in stats.items()}
    metrics["pg_loss"] = _aggregate(pg, m, aggregation, loss_scale_tokens)
    if dual_clip is None:
        metrics["clip_frac_dual"] = jnp.float32(0.0)
    return loss, jax.tree_util.tree_map(jax.lax.stop_gradient, metrics)


def token_losses(logp, old_logp, advantages, mask, *, clip_low: float = 0.2, clip_high: float = 0.28,
                 dual_clip: float | None = 3.0, ref_logp=None, kl_coef: float = 0.0):
    """policy_loss's per-token terms, before any aggregation (the packed update weighs each token
    itself: hbpo_jax/train/update.py).

    Args: as policy_loss (advantages [batch] or [batch, tokens]; any batch shape [..., tokens]).
    Returns (per_token, pg, m, stats): per_token float32 [...] the loss of each token (surrogate +
    kl_coef * k3 to the reference), pg float32 [...] the surrogate alone, m float32 [...] the mask
    as 0/1, stats: float32 [...] per-token statistics (gradient-stopped) whose masked means are
    policy_loss's metrics: clip_frac_low, clip_frac_high, clip_frac_dual (when dual_clip),
    approx_kl, ratio_mean, ref_kl (when ref_logp). Every value is 0 where the mask is.
    """
    m_bool = jnp.asarray(mask).astype(bool)
    m = m_bool.astype(jnp.float32)
    logp = jnp.where(m_bool, _f32(logp), 0.0)
    old = jax.lax.stop_gradient(jnp.where(m_bool, _f32(old_logp), 0.0))
    adv = _f32(advantages)
    if adv.ndim == m.ndim - 1:
        adv = adv[..., None]
    adv = jax.lax.stop_gradient(jnp.where(m_bool, jnp.broadcast_to(adv, m.shape), 0.0))

    log_r = jnp.clip(logp - old, -_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    ratio = jnp.exp(log_r)
    pg = jnp.maximum(-adv * ratio, -adv * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high))
    neg = adv < 0
    if dual_clip is not None:
        pg = jnp.where(neg, jnp.minimum(pg, -adv * dual_clip), pg)
    per_token = pg

    stats: dict[str, jax.Array] = {}
    if ref_logp is not None:
        ref = jax.lax.stop_gradient(jnp.where(m_bool, _f32(ref_logp), 0.0))
        k3_ref = _k3(jnp.clip(ref - logp, -_MAX_LOG_RATIO, _MAX_LOG_RATIO))
        stats["ref_kl"] = k3_ref
        if kl_coef > 0:
            per_token = per_token + kl_coef * k3_ref
    pos = adv > 0
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    stats.update(clip_frac_low=f32(neg & (ratio < 1.0 - clip_low)), clip_frac_high=f32(pos & (ratio > 1.0 + clip_high)),
                 approx_kl=_k3(log_r), ratio_mean=ratio)  # approx_kl: KL(old || new) ~ E_old[r - 1 - log r]
    if dual_clip is not None:
        stats["clip_frac_dual"] = f32(neg & (ratio > dual_clip))
    stats = {k: jax.lax.stop_gradient(v * m) for k, v in stats.items()}
    return per_token * m, pg * m, m, stats


# ----------------------------------------------------------------------------------------
# Related objectives: GRPO (Shao et al. 2024), Dr. GRPO (Liu et al. 2025), DAPO (Yu et al.
# 2025), L1 (Aggarwal & Welleck 2025), cosine (Yeo et al. 2025).

def classic_reward(correct, format_ok=True) -> jax.Array:
    """R = 1[correct] (a format error counts as not correct).

    Args: correct, format_ok: bool [...]. Returns float32 [...].
    """
    return (jnp.asarray(correct, bool) & jnp.asarray(format_ok, bool)).astype(jnp.float32)


def dapo_reward(correct, format_ok=True) -> jax.Array:
    """DAPO's rule reward: +1 if correct, -1 otherwise (format errors included).

    Args: correct, format_ok: bool [...]. Returns float32 [...].
    """
    return 2.0 * classic_reward(correct, format_ok) - 1.0


def _cos_schedule(n, l_max: int, r_0: float, r_l: float) -> jax.Array:
    """r_l + (r_0 - r_l)/2 * (1 + cos(pi * n / l_max)): r_0 at n = 0, r_l at n = l_max."""
    return r_l + 0.5 * (r_0 - r_l) * (1.0 + jnp.cos(math.pi * n / l_max))


def cosine_reward(correct, format_ok, lengths, *, l_max: int = L_MAX, r_min: float = 1.0,
                  r_max: float = 2.0, wrong_r0: float = -10.0, wrong_rl: float = 0.0,
                  format_reward: float = -10.0) -> jax.Array:
    """Cosine length reward (Yeo et al. 2025, arXiv 2502.03373, "Demystifying Long Chain-of-Thought
    Reasoning in LLMs").

    Correct answers: r_max at n = 0 falling to r_min at n = l_max (shorter is better). Wrong
    answers: wrong_r0 at n = 0 rising to wrong_rl at n = l_max (a wrong answer given after longer
    thought is penalised less). Format errors, including responses cut off at l_max, pay
    `format_reward` (the paper's exceed-length penalty, -10). Lengths beyond l_max are clamped.

    Args:
      correct, format_ok: bool [...]; lengths: int32 [...]. Returns float32 [...].
    """
    check_lengths(lengths, l_max=l_max)
    n = jnp.minimum(_f32(lengths), float(l_max))
    r = jnp.where(jnp.asarray(correct, bool), _cos_schedule(n, l_max, r_max, r_min),
                  _cos_schedule(n, l_max, wrong_r0, wrong_rl))
    return jnp.where(jnp.asarray(format_ok, bool), r, jnp.float32(format_reward)).astype(jnp.float32)


def l1_exact_reward(correct, format_ok, lengths, budgets, *, alpha: float = 0.0003) -> jax.Array:
    """L1-Exact: R = 1[correct] - alpha * |N - n| (format errors count as not correct).

    Args: correct, format_ok: bool [...]; lengths n, budgets N: int32 [...]. Returns float32 [...].
    """
    check_lengths(lengths, budgets)
    gap = jnp.abs(_f32(budgets) - _f32(lengths))
    return classic_reward(correct, format_ok) - alpha * gap


def l1_max_reward(correct, format_ok, lengths, budgets, *, alpha: float = 0.0003) -> jax.Array:
    """L1-Max (Aggarwal & Welleck 2025, arXiv 2503.04697): R = 1[correct] * clip(0.5 + (alpha/2)(N - n), 0, 1).

    Args: correct, format_ok: bool [...]; lengths n, budgets N: int32 [...]. Returns float32 [...].
    """
    check_lengths(lengths, budgets)
    soft = jnp.clip(0.5 + 0.5 * alpha * (_f32(budgets) - _f32(lengths)), 0.0, 1.0)
    return classic_reward(correct, format_ok) * soft


def dapo_overlong_penalty(lengths, *, max_len: int, cache_len: int) -> jax.Array:
    """DAPO soft overlong punishment, added to the reward.

    0 for n <= max_len - cache_len, then linear down to -1 at n = max_len, -1 beyond.

    Args: lengths: int32 [...]. Returns float32 [...] in [-1, 0].
    """
    if cache_len < 0 or cache_len > max_len:
        raise ValueError(f"cache_len must be in [0, max_len={max_len}], got {cache_len}")
    check_lengths(lengths)
    n = _f32(lengths)
    start = float(max_len - cache_len)
    over = (n - start) / max(cache_len, 1)  # cache_len = 0: a hard step at max_len
    pen = jnp.where(n > start, -jnp.clip(over, 0.0, 1.0), 0.0)
    return jnp.where(n > max_len, -1.0, pen).astype(jnp.float32)


def dynamic_sampling_mask(correct) -> jax.Array:
    """DAPO dynamic sampling: keep groups whose answers are neither all right nor all wrong.

    Args: correct: bool [prompts, group]. Returns bool [prompts].
    """
    c = jnp.asarray(correct, bool)
    return jnp.any(c, axis=-1) & ~jnp.all(c, axis=-1)
