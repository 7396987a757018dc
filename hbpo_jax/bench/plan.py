"""The training step and the sampler of a config, built from abstract arrays (no weights
allocated) and lowered or compiled on a mesh: to check that a big config fits before a pod is
spent, and to read the per-device memory XLA plans for it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from hbpo_jax import config as config_lib
from hbpo_jax import loop, sampler, sharding, trainer
from hbpo_jax.models import KVCache, Qwen2


def _sds(x, s):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)


def abstract_state(cfg, mesh, rules, optimizer):
    """(graphdef, TrainState of ShapeDtypeStruct carrying shardings): params per the rule table,
    Adam moments like their parameters, scalars replicated."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Qwen2(cfg, rngs=nnx.Rngs(0))))
    shardings = sharding.state_shardings(state, mesh, rules)
    params = jax.tree.map(_sds, state, shardings)
    replicated = NamedSharding(mesh, PartitionSpec())
    opt = jax.eval_shape(optimizer.init, params)
    opt = optax.tree_map_params(optimizer, lambda p, s: _sds(p, s), opt, shardings,
                                transform_non_params=lambda x: _sds(x, replicated))
    scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
    return graphdef, trainer.TrainState(params, opt, scalar, scalar, scalar)


def lower_train_step(config, mesh):
    """The jitted mini-batch update of `config` at its full shapes (prompt + L_max tokens)."""
    rules = sharding.rules_from_config(config.mesh)
    cfg = config_lib.model_config(config)
    t, r = config.train, config.rollout
    objective = loop.loss_lib.get_objective(config.objective.name)
    group = r.rollouts_per_prompt
    rows = t.prompts_per_step // t.mini_batches * group
    optimizer = trainer.make_optimizer(config.optim, t.steps * t.mini_batches)
    graphdef, state = abstract_state(cfg, mesh, rules, optimizer)
    micro, n, p = t.micro_batch_size, r.max_response_len, r.max_prompt_len
    u = rows // micro
    batch_axes = sharding.logical_to_spec(("batch",), rules, mesh)[0]
    row = NamedSharding(mesh, PartitionSpec(None, batch_axes))
    ones = NamedSharding(mesh, PartitionSpec())
    batch = dict(
        tokens=jax.ShapeDtypeStruct((u, micro, p + n), jnp.int32, sharding=row),
        attention_mask=jax.ShapeDtypeStruct((u, micro, p + n), jnp.int32, sharding=row),
        response_mask=jax.ShapeDtypeStruct((u, micro, n), jnp.bool_, sharding=row),
        old_logp=jax.ShapeDtypeStruct((u, micro, n), jnp.float32, sharding=row),
        advantages=jax.ShapeDtypeStruct((u, micro), jnp.float32, sharding=row),
        weight=jax.ShapeDtypeStruct((u,), jnp.float32, sharding=ones))
    loss_kwargs = loop._loss_kwargs(objective, config, rows)
    return trainer.update.lower(graphdef, state, batch, optimizer=optimizer, prompt_len=p,
                                temperature=r.temperature, loss_kwargs=loss_kwargs)


def lower_sampler(config, mesh, batch: int | None = None):
    """(prefill, decode) of `config`'s rollouts, lowered: batch defaults to one sampler call's rows
    (rollout.max_batch, or all of a step's rollouts), prompt max_prompt_len, L_max new tokens."""
    rules = tuple(sharding.rules_from_config(config.mesh))
    cfg = config_lib.model_config(config)
    r = config.rollout
    b = batch or r.max_batch or config.train.prompts_per_step * r.rollouts_per_prompt
    p, n = r.max_prompt_len, r.max_response_len
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Qwen2(cfg, rngs=nnx.Rngs(0))))
    params = jax.tree.map(_sds, state, sharding.state_shardings(state, mesh, rules))
    st = sampler._Static(n, tuple(cfg.eos_token_ids), 0, float(r.temperature), float(r.top_p),
                         int(r.top_k), jnp.dtype(cfg.compute_dtype), mesh, rules)
    fns = sampler._functions(graphdef, st)
    cache_sh = sampler._cache_shardings(cfg, st, b, p + n)
    cache = jax.tree.map(_sds, jax.eval_shape(lambda: KVCache.init(cfg, b, p + n)), cache_sh)
    rows = lambda shape, dtype: jax.ShapeDtypeStruct(  # noqa: E731
        shape, dtype, sharding=sharding.batch_sharding(mesh, rules, len(shape), shape))
    prefill = fns.prefill.lower(params, cache, rows((b, p), jnp.int32), rows((b, p), jnp.int32))
    logits = rows((b, cfg.vocab_size), jnp.float32)
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=NamedSharding(mesh, PartitionSpec()))
    decode = fns.decode.lower(params, cache, logits, rows((b,), jnp.int32), rows((b,), jnp.int32), key)
    return prefill, decode


def memory_table(config, mesh) -> str:
    """Compiles the training step and the sampler and tabulates XLA's per-device memory plan."""
    cfg = config_lib.model_config(config)
    devices = mesh.devices.size
    param_bytes = cfg.num_params() * jnp.dtype(cfg.param_dtype).itemsize
    lines = [f"config {config.name}: {cfg.num_params():,} parameters ({cfg.param_dtype}), "
             f"mesh {dict(mesh.shape)} on {devices} {jax.devices()[0].platform} devices",
             f"parameters {param_bytes / 2**30:.2f} GiB, + AdamW moments {2 * cfg.num_params() * 4 / 2**30:.2f} GiB "
             f"(float32), before sharding",
             "", "| program | arguments GiB/device | outputs GiB/device | temporaries GiB/device | total GiB/device |",
             "|---|---|---|---|---|"]
    prefill, decode = lower_sampler(config, mesh)
    for name, lowered in (("train step (one mini-batch)", lower_train_step(config, mesh)),
                          ("sampler prefill", prefill), ("sampler decode loop", decode)):
        m = lowered.compile().memory_analysis()
        gib = lambda x: x / 2**30  # noqa: E731
        args, outs, temp = (m.argument_size_in_bytes, m.output_size_in_bytes, m.temp_size_in_bytes)
        alias = getattr(m, "alias_size_in_bytes", 0)
        lines.append(f"| {name} | {gib(args):.2f} | {gib(outs):.2f} | {gib(temp):.2f} | "
                     f"{gib(args + outs + temp - alias):.2f} |")
    return "\n".join(lines)

