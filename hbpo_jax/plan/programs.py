"""The training step, the log-prob pass and the sampler of a config, built from abstract arrays
(no weights allocated) and lowered or compiled on a mesh: to check that a big config fits before
a pod is spent, and to read the per-device memory XLA plans for it (launch/memory.py).

They are built the way a run builds them: the config resolved into a spec (spec.resolve), the
update batch in the loop's layout (batching.abstract_minibatch), the log-prob pass as
step.Step._logprobs calls trainer.compute_logprobs, and the rollouts through the public Sampler
and RefillEngine APIs. The mesh may hold local devices or a TPU topology's (`topology_mesh`): the programs
then compile for that TPU on this machine (hbpo_jax.plan.tpu).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from hbpo_jax import sharding, spec
from hbpo_jax.models import Qwen2, lora, qwen2
from hbpo_jax.models.config import ModelConfig
from hbpo_jax.rollout import prompting
from hbpo_jax.rollout import refill as engine
from hbpo_jax.rollout import static as sampler
from hbpo_jax.train import minibatches as batching
from hbpo_jax.train import packing
from hbpo_jax.train import update as trainer


def _sds(x, s):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)


def abstract_params(cfg, mesh, rules):
    """(graphdef, parameters as ShapeDtypeStructs sharded per the rule table)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Qwen2(cfg, rngs=nnx.Rngs(0))))
    return graphdef, jax.tree.map(_sds, state, sharding.state_shardings(state, mesh, rules))


def abstract_state(cfg, mesh, rules, optimizer):
    """(graphdef, TrainState of ShapeDtypeStruct carrying shardings, frozen): params per the rule
    table, Adam moments like their parameters, scalars replicated. With LoRA (cfg.lora_rank) the
    state's params are the adapters and `frozen` the base (None otherwise), as train.step holds them."""
    graphdef, params = abstract_params(cfg, mesh, rules)
    params, frozen = lora.split(params) if cfg.lora_rank else (params, None)
    shardings = jax.tree.map(lambda x: x.sharding, params)
    replicated = NamedSharding(mesh, PartitionSpec())
    opt = jax.eval_shape(optimizer.init, params)
    opt = optax.tree_map_params(optimizer, lambda p, s: _sds(p, s), opt, shardings,
                                transform_non_params=lambda x: _sds(x, replicated))
    scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
    return graphdef, trainer.TrainState(params, opt, scalar, scalar, scalar), frozen


def _resolve(config, mesh):
    """(RunSpec, ModelConfig, rules) of `config` for `mesh` (ConfigError naming the key)."""
    run = spec.resolve(config, num_devices=mesh.devices.size, slices=sharding.num_slices(mesh.devices.flat))
    return run, model_config(run, mesh), run.mesh.rules


def model_config(run, mesh) -> ModelConfig:
    """The run's ModelConfig (LoRA applied) as compiled on `mesh`: remat "auto" resolved for its
    chips (qwen2.resolve_remat), so the plan's floor and labels name the policy that runs."""
    cfg = run.lora.model_config(run.model.config())
    return cfg.replace(remat=qwen2.resolve_remat(cfg.remat, mesh.devices.flat[0].device_kind))


def lower_train_step(config, mesh, *, prompt_width: int | None = None, response_width: int | None = None,
                     rows: int | None = None):
    """The jitted mini-batch update of `config` at its full shapes: the bucketed prompt width plus
    L_max response tokens, rows_per_minibatch rows in micro-batches (with the reference
    log-probs when the loss has a KL term); or at `prompt_width` + `response_width` tokens and
    `rows` rows (a multiple of the micro-batch), as a length-grouped piece runs."""
    run, cfg, rules = _resolve(config, mesh)
    s, t = run.sampling, run.train
    optimizer = trainer.make_optimizer(run.optim, t.total_updates)
    graphdef, state, frozen = abstract_state(cfg, mesh, rules, optimizer)
    # The rollout's prompts, pad_prompts' default bucket.
    prompt_width = prompt_width or sampler.bucket_length(s.max_prompt_len)
    if t.pack_rows and not (rows or response_width):  # every micro-batch full: the packed update's most
        lanes, lane_len, micro_batches = packing.layout_for(run)
        batch = packing.abstract(lanes, lane_len, micro_batches, mesh, rules, with_ref=run.loss.kl_coef > 0)
    else:
        batch = batching.abstract_minibatch(rows or t.rows_per_minibatch, t.micro_batch_size, prompt_width,
                                            response_width or s.rollout.max_response_len, mesh, rules,
                                            with_ref=run.loss.kl_coef > 0)
    return trainer.update.lower(graphdef, state, batch, optimizer=optimizer, prompt_len=prompt_width,
                                temperature=s.rollout.temperature, loss_kwargs=run.loss.kwargs(), rules=rules,
                                frozen=frozen)


def lower_logprobs(config, mesh):
    """The jitted old- (or reference-) log-prob pass at its full shapes, as the loop calls it
    (step.Step._logprobs): one micro-batch of micro_batch_size rows of the bucketed prompt width
    plus L_max tokens, rows over the batch axes; the policy's parameters as the train state holds
    them. The loop runs it R / micro_batch_size times per pass (R = prompts_per_step x group)."""
    run, cfg, rules = _resolve(config, mesh)
    s, t = run.sampling, run.train
    graphdef, params = abstract_params(cfg, mesh, rules)
    prompt_width = sampler.bucket_length(s.max_prompt_len)
    rows = NamedSharding(mesh, PartitionSpec(sharding.logical_to_spec(("batch",), rules, mesh)[0]))
    tokens = jax.ShapeDtypeStruct((t.micro_batch_size, prompt_width + s.rollout.max_response_len), jnp.int32,
                                  sharding=rows)
    return trainer.compute_logprobs.lower(graphdef, params, tokens, tokens, prompt_len=prompt_width,
                                          temperature=s.rollout.temperature, rules=rules)


def logprob_passes(run) -> int:
    """Log-prob passes over a step's rollouts, as step.Step runs them: the old log-probs when
    train.recompute_old_logprobs is "always", or "auto" and a pre-filled budget prefix takes the
    loss (prefix_in_response and prefix_loss in a mode that pre-fills one); the reference
    log-probs when the loss has a KL term. The refill engine scores the prefix as it prefills it,
    so with it "auto" needs no old-log-prob pass."""
    mode, s = run.train.recompute_old_logprobs, run.sampling
    prefix_takes_loss = s.rollout.mode in prompting.PREFIXES and s.rollout.prefix_in_response and s.prefix_loss
    old = mode == "always" or (mode == "auto" and prefix_takes_loss and s.rollout.engine == "static")
    return int(old) + int(run.loss.kl_coef > 0)


def topology_mesh(mesh_cfg, topology: str, slices: int = 1):
    """The config's mesh (`mesh.shape`, -1 = the rest; `mesh.axes`) laid on the chips of a TPU
    topology ("v5p:2x2x4", "v5e:4x4", ...; jax.experimental.topologies, needs libtpu), or of
    `slices` such slices (multislice: a hybrid mesh, sharding.make_mesh): programs lowered on it
    compile for that TPU here, without one."""
    from jax.experimental import topologies
    kwargs = {"num_slices": slices} if slices > 1 else {}
    try:
        devices = topologies.get_topology_desc(platform="tpu", topology_name=topology, **kwargs).devices
    except Exception as e:
        # A slice smaller than libtpu's default host (v5e: 2x2 chips per host), e.g. Colab's
        # "v5e:1x1": the host is the slice itself.
        if "chips_per_host_bounds" not in str(e):
            raise
        dims = [int(x) for x in topology.split(":")[1].split("x")]
        kwargs["chips_per_host_bounds"] = (dims + [1, 1, 1])[:3]
        devices = topologies.get_topology_desc(platform="tpu", topology_name=topology, **kwargs).devices
    return sharding.make_mesh(tuple(mesh_cfg["shape"]), tuple(mesh_cfg["axes"]), devices=devices)


def lower_sampler(config, mesh, batch: int | None = None):
    """(prefill, decode) of `config`'s rollouts, lowered: batch defaults to one sampler call's rows
    (rollout.max_batch, or all of a step's rollouts), prompts of max_prompt_len tokens (padded to
    their bucket), L_max new tokens."""
    run, cfg, rules = _resolve(config, mesh)
    s = run.sampling
    graphdef, params = abstract_params(cfg, mesh, rules)
    mesh = sharding.decode_mesh(mesh, s.rollout.decode_tensor_parallel)  # as rollout.budget_rollouts
    params = sharding.decode_weights(params, mesh, rules, cfg.compute_dtype)  # as rollout.sample_rows
    smp = sampler.Sampler(graphdef, cfg, _settings(s, cfg), mesh=mesh, rules=rules)
    return smp.lower(params, batch or s.rollout.max_batch or run.train.prompts_per_step * s.group, s.max_prompt_len)


PREFIX_TOKENS = 15  # the plan's bound on a budget prefix's tokens (HBPO's sentence is ~11 in Qwen's)


def lower_engine(config, mesh):
    """(store prefill, admit, decode segment) of `config`'s refill engine, lowered: the step's
    prompts_per_step prompts of max_prompt_len tokens, prefixes of PREFIX_TOKENS, rollout.max_batch
    slots (0: one per rollout), L_max new tokens."""
    run, cfg, rules = _resolve(config, mesh)
    s, rows = run.sampling, run.train.prompts_per_step * run.sampling.group
    graphdef, params = abstract_params(cfg, mesh, rules)
    mesh = sharding.decode_mesh(mesh, s.rollout.decode_tensor_parallel)  # as rollout.budget_rollouts
    params = sharding.decode_weights(params, mesh, rules, cfg.compute_dtype)  # as rollout.sample_rows
    eng = engine.RefillEngine(graphdef, cfg, _settings(s, cfg), slots=min(s.rollout.max_batch or rows, rows), mesh=mesh,
                              rules=rules, kv_tokens=s.rollout.kv_tokens, page_size=s.rollout.page_size)
    return eng, eng.lower(params, run.train.prompts_per_step, s.max_prompt_len, PREFIX_TOKENS, rows)


def _settings(s, cfg) -> sampler.SamplerSettings:
    return sampler.SamplerSettings(max_new_tokens=s.rollout.max_response_len, eos_ids=cfg.eos_token_ids,
                                   temperature=s.rollout.temperature, top_p=s.rollout.top_p, top_k=s.rollout.top_k)


def memory_table(config, mesh) -> str:
    """Compiles the training step and the sampler and tabulates XLA's per-device memory plan."""
    cfg = spec.resolve_lora(config).model_config(spec.resolve_model(config).config())
    devices = mesh.devices.size
    param_bytes = cfg.num_params() * jnp.dtype(cfg.param_dtype).itemsize
    lines = [f"config {config.name}: {cfg.num_params():,} parameters ({cfg.param_dtype}), "
             f"mesh {dict(mesh.shape)} on {devices} {jax.devices()[0].platform} devices",
             f"parameters {param_bytes / 2**30:.2f} GiB, + AdamW moments {2 * cfg.num_params() * 4 / 2**30:.2f} GiB "
             f"(float32), before sharding",
             "", "| program | arguments GiB/device | outputs GiB/device | temporaries GiB/device | total GiB/device |",
             "|---|---|---|---|---|"]
    prefill, decode = lower_sampler(config, mesh)
    gib = lambda x: x / 2**30  # noqa: E731
    for name, lowered in (("train step (one mini-batch)", lower_train_step(config, mesh)),
                          ("sampler prefill", prefill), ("sampler decode loop", decode)):
        m = lowered.compile().memory_analysis()
        args, outs, temp = (m.argument_size_in_bytes, m.output_size_in_bytes, m.temp_size_in_bytes)
        alias = getattr(m, "alias_size_in_bytes", 0)
        lines.append(f"| {name} | {gib(args):.2f} | {gib(outs):.2f} | {gib(temp):.2f} | "
                     f"{gib(args + outs + temp - alias):.2f} |")
    return "\n".join(lines)
