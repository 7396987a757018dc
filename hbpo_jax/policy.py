"""The policy a run trains: model (split for jit), tokenizer and problem records.

`pretrained(spec, mesh, rules)` loads a Hugging Face folder (spec.model.path) and the
training data (spec.data: a file, or reasoning-gym's problems for data.path "rg:..."); the tiny
task builds its own (hbpo_jax.tasks.warmstart).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax
from flax import nnx

from hbpo_jax import sharding
from hbpo_jax.data import sources
from hbpo_jax.errors import ConfigError
from hbpo_jax.models import Qwen2, load_pretrained, lora
from hbpo_jax.models.hub import resolve_model_path
from hbpo_jax.rollout import prompting

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Policy:
    """graphdef + params (nnx.State on the mesh); records: dicts with problem, answer (and id,
    level); cache_dir: where a cached warm start lives (its "before" evaluation is cached there)."""

    graphdef: Any
    params: Any
    tokenizer: Any
    train_records: list
    eval_records: list
    cache_dir: str | None = None


def fitting(records: list, tokenizer, sampling) -> list:
    """The records whose templated prompt fits sampling.max_prompt_len (the rest dropped and
    logged); ConfigError when none does."""
    kept, dropped = prompting.split_long_prompts(tokenizer, records, sampling.max_prompt_len,
                                                 sampling.rollout.system_prompt)
    if dropped:
        log.warning("data: %d of %d problems are longer than rollout.max_prompt_len=%d tokens and are skipped.",
                    len(dropped), len(records), sampling.max_prompt_len)
    if not kept:
        raise ConfigError(f"rollout.max_prompt_len={sampling.max_prompt_len}: no problem is short enough.")
    return kept


def pretrained(spec, mesh, rules) -> Policy:
    """spec.model.path's model and tokenizer (a local folder, or a hub id resolved to its
    snapshot in the HF cache), spec.data's records (prompts that fit)."""
    path, overrides = resolve_model_path(spec.model.path), spec.model.overrides()
    dtype, compute_dtype = overrides.pop("param_dtype", "float32"), overrides.pop("dtype", None)
    if spec.lora.rank:  # the frozen base is read straight into its dtype (no float32 copy first)
        dtype, compute_dtype = spec.lora.base_dtype, compute_dtype or dtype
    model, _, tokenizer = load_pretrained(path, dtype=dtype, compute_dtype=compute_dtype, mesh=mesh, rules=rules,
                                          **overrides)
    if tokenizer is None:
        raise FileNotFoundError(f"{path}: no tokenizer files (tokenizer.json) in the model folder.")
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"{path}: the tokenizer has no chat template.")
    records, report = sources.training_records(spec.data)
    if report.total:
        log.warning("data: %s", report.summary())
    graphdef, params = nnx.split(model)
    return Policy(graphdef, params, tokenizer, fitting(records, tokenizer, spec.sampling), [])


def with_adapters(policy: Policy, lora_spec, *, seed: int, mesh=None, rules=sharding.DEFAULT_RULES) -> Policy:
    """The policy with LoRA adapters (spec.LoRASpec; the policy itself when its rank is 0): the
    base cast to lora_spec.base_dtype, fresh adapters (A drawn from `seed`, B = 0, so the model
    is unchanged) created on their shards. The same for a pretrained model and the tiny task's
    warm start, and on resume: a checkpoint holds only the adapters, the base is this one again."""
    if not lora_spec.rank:
        return policy
    cfg = lora_spec.model_config(nnx.merge(policy.graphdef, policy.params).cfg)
    make = lambda: Qwen2(cfg, rngs=nnx.Rngs(0), lora_rngs=nnx.Rngs(lora=seed))  # noqa: E731
    graphdef, abstract = nnx.split(nnx.eval_shape(make))
    abstract_adapters, _ = lora.split(abstract)
    shardings = None if mesh is None else sharding.state_shardings(abstract_adapters, mesh, rules)
    # Only the adapters leave the jit, so XLA drops the base's initialisation.
    adapters = jax.jit(lambda: lora.split(nnx.split(make())[1])[0], out_shardings=shardings)()
    base = jax.tree.map(lambda x: x.astype(cfg.weight_dtype), policy.params)
    return dataclasses.replace(policy, graphdef=graphdef, params=lora.join(base, adapters))
