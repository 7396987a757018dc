"""The objective registry: a config picks an RL objective by name, and each objective owns its
recipe (reward, advantage, prompting, clip range, dual clip, aggregation, overlong shaping,
dynamic sampling). The pure functions it combines are in hbpo_jax.loss; hbpo_jax.spec resolves a
config against these recipes.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax

from hbpo_jax.loss import (
    BETA,
    L_MAX,
    budget_reward,
    classic_reward,
    cosine_reward,
    dapo_overlong_penalty,
    dapo_reward,
    grpo_advantages,
    hierarchical_advantages,
    l1_exact_reward,
    l1_max_reward,
)

__all__ = ["Objective", "OBJECTIVES", "get_objective", "compute_advantages"]

RewardFn = Callable[..., jax.Array]      # (correct, format_ok, lengths, budgets, **settings) -> R
AdvantageFn = Callable[..., jax.Array]   # (rewards, budgets, **settings) -> A


@dataclasses.dataclass(frozen=True)
class Objective:
    """One RL objective's recipe: how to prompt, score, normalise and aggregate.

    reward_fn: (correct, format_ok, lengths, budgets, **reward_settings) -> float32, same shape.
    advantage_fn: (rewards [P, G], budgets [P, G], **advantage_settings) -> float32 [P, G].
    reward_settings / advantage_settings: the settings each function takes, with this objective's
      defaults (the names config.objective may override; see spec.py).
    prompting: the rollout mode its training rollouts use (prompting.MODES): "budget" (HBPO's
      prefixes), "natural" (no prefix), "l1" / "l1_max" (L1's prompts, N drawn per prompt).
    dynamic_sampling: drop groups that are all right or all wrong (dynamic_sampling_mask).
    overlong_penalty: add dapo_overlong_penalty(max_len = L_max, cache_len = L_max / 8).
    """
    name: str
    reward_fn: RewardFn
    advantage_fn: AdvantageFn
    prompting: str = "natural"
    aggregation: str = "token-mean"
    clip_low: float = 0.2
    clip_high: float = 0.28
    dual_clip: float | None = 3.0
    reward_settings: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    advantage_settings: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    dynamic_sampling: bool = False
    overlong_penalty: bool = False

    def setting_names(self) -> set[str]:
        """Every setting its reward and advantage functions take."""
        return set(self.reward_settings) | set(self.advantage_settings)


# Adapters normalising every reward to (correct, format_ok, lengths, budgets, **settings).
def _classic(correct, format_ok, lengths, budgets):
    del lengths, budgets
    return classic_reward(correct, format_ok)


def _dapo(correct, format_ok, lengths, budgets):
    del lengths, budgets
    return dapo_reward(correct, format_ok)


def _cosine(correct, format_ok, lengths, budgets, **settings):
    del budgets
    return cosine_reward(correct, format_ok, lengths, **settings)


def _grpo_adv(rewards, budgets):
    del budgets
    return grpo_advantages(rewards, scale_by_std=True)


def _dr_grpo_adv(rewards, budgets):
    del budgets
    return grpo_advantages(rewards, scale_by_std=False)


_HBPO_REWARD = dict(beta=BETA, l_max=L_MAX, variant="code", format_reward=-1.0, wrong_reward=0.0)
_HBPO_ADVANTAGE = dict(beta=BETA, l_max=L_MAX, intra_weight=1.0)
_SYMMETRIC = dict(clip_low=0.2, clip_high=0.2, dual_clip=None)
OBJECTIVES: Mapping[str, Objective] = {o.name: o for o in (
    Objective("hbpo", budget_reward, hierarchical_advantages, prompting="budget",
              reward_settings=_HBPO_REWARD, advantage_settings=_HBPO_ADVANTAGE),
    Objective("grpo", _classic, _grpo_adv, aggregation="sequence-mean-token-mean", **_SYMMETRIC),
    Objective("dr_grpo", _classic, _dr_grpo_adv, aggregation="token-sum-norm", **_SYMMETRIC),
    Objective("dapo", _dapo, _grpo_adv, dual_clip=None, dynamic_sampling=True, overlong_penalty=True),
    # L1, cosine and classic as run in HBPO's ablations: HBPO's loss settings, GRPO advantages.
    Objective("l1_exact", l1_exact_reward, _grpo_adv, prompting="l1", reward_settings=dict(alpha=0.0003)),
    Objective("l1_max", l1_max_reward, _grpo_adv, prompting="l1_max", reward_settings=dict(alpha=0.0003)),
    Objective("cosine", _cosine, _grpo_adv,
              reward_settings=dict(l_max=L_MAX, r_min=1.0, r_max=2.0, wrong_r0=-10.0, wrong_rl=0.0,
                                   format_reward=-10.0)),
    Objective("classic", _classic, _grpo_adv),
)}


def get_objective(name: str) -> Objective:
    """The registered Objective called `name`; ValueError listing valid names otherwise."""
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise ValueError(f"unknown objective {name!r}; valid names: {sorted(OBJECTIVES)}") from None


def compute_advantages(objective: Objective | str, correct, format_ok, lengths, budgets,
                       **settings) -> tuple[jax.Array, jax.Array]:
    """Rewards and advantages of one rollout batch under `objective`.

    settings: values for the objective's declared settings (Objective.reward_settings /
    advantage_settings; a name both declare, e.g. HBPO's `beta` and `l_max`, reaches both);
    the rest keep the objective's defaults. `max_len` / `cache_len` set the DAPO overlong
    penalty (defaults 4096 / 512). Dynamic sampling is not applied here: it decides which groups
    to keep, see `dynamic_sampling_mask`.

    Args:
      correct, format_ok: bool [prompts, group]; lengths, budgets: int32 [prompts, group].
    Returns:
      (rewards, advantages): float32 [prompts, group] each.
    Raises:
      TypeError: a setting the objective does not declare.
    """
    obj = get_objective(objective) if isinstance(objective, str) else objective
    overlong = {"max_len": settings.pop("max_len", L_MAX), "cache_len": settings.pop("cache_len", 512)}
    unused = set(settings) - obj.setting_names()
    if unused:
        raise TypeError(f"objective {obj.name!r} takes no setting(s) {sorted(unused)}")
    r_kw = {**obj.reward_settings, **{k: v for k, v in settings.items() if k in obj.reward_settings}}
    a_kw = {**obj.advantage_settings, **{k: v for k, v in settings.items() if k in obj.advantage_settings}}
    rewards = obj.reward_fn(correct, format_ok, lengths, budgets, **r_kw)
    if obj.overlong_penalty:
        rewards = rewards + dapo_overlong_penalty(lengths, **overlong)
    return rewards, obj.advantage_fn(rewards, budgets, **a_kw)
