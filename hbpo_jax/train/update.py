"""The jitted, sharded policy update: chunked log-probs, the clipped policy loss, gradient
accumulation over micro-batches, AdamW, and skipping of non-finite steps.

Shapes: R = sequences in a mini-batch, split into U micro-batches of b = R / U sequences; P = the
(bucketed) prompt length, N = response length, L = P + N, E = hidden, V = vocabulary.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from hbpo_jax import loss as loss_lib
from hbpo_jax import sharding as sharding_lib


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    """params: the policy's nnx.State; opt_state: optax state; step: int32 updates applied;
    skipped: int32 consecutive updates skipped for a non-finite loss or gradient; skipped_total."""

    params: Any
    opt_state: Any
    step: jax.Array
    skipped: jax.Array
    skipped_total: jax.Array


def make_optimizer(optim, total_updates: int) -> optax.GradientTransformation:
    """AdamW with global-norm clipping and a schedule (spec.SCHEDULES), from spec.OptimSpec (or the
    config's `optim` section: the same fields)."""
    lr, warmup = optim.learning_rate, int(optim.warmup_steps)
    if optim.schedule == "constant":
        schedule = optax.constant_schedule(lr) if not warmup else optax.join_schedules(
            [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])
    elif optim.schedule == "cosine":
        schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup, 1), max(total_updates, warmup + 1))
    else:  # linear
        schedule = optax.join_schedules(
            [optax.linear_schedule(0.0, lr, max(warmup, 1)),
             optax.linear_schedule(lr, 0.0, max(total_updates - warmup, 1))], [max(warmup, 1)])
    parts = [optax.clip_by_global_norm(optim.grad_clip)] if optim.grad_clip else []
    parts.append(optax.adamw(schedule, b1=optim.b1, b2=optim.b2, weight_decay=optim.weight_decay))
    return optax.chain(*parts)


def init_state(params, optimizer: optax.GradientTransformation) -> TrainState:
    """params: the policy's nnx.State (already sharded); the optimizer state follows its sharding."""
    opt_state = jax.jit(optimizer.init)(params)
    # Counters (ours and optax's step count) replicated on the params' mesh, as the update returns
    # them, so that a checkpoint restores them there, on every process and any device count.
    # Distinct buffers: the state is donated.
    shardings = {x.sharding for x in jax.tree.leaves(params)}
    mesh = next((s.mesh for s in shardings if isinstance(s, jax.sharding.NamedSharding)), None)
    if mesh is None:
        zero = lambda: jnp.zeros((), jnp.int32)  # noqa: E731
    else:
        rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        zero = lambda: jax.device_put(np.zeros((), np.int32), rep)  # noqa: E731
        opt_state = jax.tree.map(
            lambda x: x if isinstance(x.sharding, jax.sharding.NamedSharding) else sharding_lib.put(x, rep),
            opt_state)
    return TrainState(params, opt_state, zero(), zero(), zero())


# ----------------------------------------------------------------------------- log-probs

def chunked_logprobs(hidden, head, targets, temperature: float = 1.0, chunk: int = 512):
    """log softmax(hidden @ head / temperature) at `targets`, and the entropy, chunk by chunk.

    hidden: [B, N, E]; head: [E, V]; targets: int32 [B, N]. Returns float32 (logp, entropy), each
    [B, N]. Only [B, chunk, V] logits exist at a time, in the forward and (by rematerialising
    each chunk) in the backward pass, so the float32 [B, N, V] tensor is never materialised.
    """
    b, n, e = hidden.shape
    c = min(chunk, n)
    pad = -n % c
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
    hs = hidden.reshape(b, -1, c, e).swapaxes(0, 1)  # [chunks, B, c, E]
    ts = targets.reshape(b, -1, c).swapaxes(0, 1)

    @jax.checkpoint
    def one(args):
        h, t = args
        logits = jnp.einsum("bce,ev->bcv", h, head.astype(h.dtype),
                            preferred_element_type=jnp.float32) / temperature
        lse = jax.nn.logsumexp(logits, axis=-1)
        logp = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0] - lse
        probs = jax.nn.softmax(jax.lax.stop_gradient(logits), axis=-1)
        entropy = jax.lax.stop_gradient(lse) - jnp.sum(probs * jax.lax.stop_gradient(logits), -1)
        return logp, entropy

    logp, entropy = jax.lax.map(one, (hs, ts))
    unchunk = lambda x: x.swapaxes(0, 1).reshape(b, -1)[:, :n]
    return unchunk(logp), unchunk(entropy)


def response_logprobs(model, tokens, attention_mask, prompt_len: int, temperature: float = 1.0,
                      chunk: int = 512):
    """Log-probs of the response tokens given everything before them.

    tokens: int32 [B, L] = left-padded prompt [B, P] then response [B, N];
    attention_mask: [B, L] (0 on prompt padding and after each response's end).
    Returns float32 (logp, entropy) [B, N]: logp[:, j] = log p(tokens[:, P + j] | tokens[:, :P + j]).
    """
    hidden, _ = model.forward(tokens, attention_mask=attention_mask, return_hidden=True)
    h = hidden[:, prompt_len - 1: -1]
    return chunked_logprobs(h, model.head_weight(), tokens[:, prompt_len:], temperature, chunk)


@functools.partial(jax.jit, static_argnames=("graphdef", "prompt_len", "temperature", "chunk"))
def compute_logprobs(graphdef, params, tokens, attention_mask, *, prompt_len: int,
                     temperature: float = 1.0, chunk: int = 512):
    """Jitted response_logprobs for a batch (old or reference log-probs): float32 [B, N]."""
    logp, _ = response_logprobs(nnx.merge(graphdef, params), tokens, attention_mask, prompt_len,
                                temperature, chunk)
    return logp


# ----------------------------------------------------------------------------- the update

def micro_weights(response_mask: np.ndarray, aggregation: str) -> np.ndarray:
    """How much each micro-batch's loss counts, so that accumulated gradients equal those of the
    whole mini-batch under `aggregation`. response_mask: [U, b, N] -> float32 [U]."""
    mask = np.asarray(response_mask, bool)
    if aggregation == "token-mean":
        counts = mask.sum(axis=(1, 2))
    elif aggregation == "sequence-mean-token-mean":
        counts = mask.any(axis=2).sum(axis=1)
    else:  # token-sum-norm: each micro-batch already divides by the same constant
        return np.ones(mask.shape[0], np.float32)
    return (counts / max(counts.sum(), 1)).astype(np.float32)


def _micro_loss(params, graphdef, mb, prompt_len, temperature, chunk, loss_kwargs, frozen=None):
    # frozen: the LoRA base, merged in but not differentiated (params are then the adapters).
    model = nnx.merge(graphdef, params) if frozen is None else nnx.merge(graphdef, params, frozen)
    logp, entropy = response_logprobs(model, mb["tokens"], mb["attention_mask"], prompt_len,
                                      temperature, chunk)
    loss, metrics = loss_lib.policy_loss(
        logp, mb["old_logp"], mb["advantages"], mb["response_mask"],
        ref_logp=mb.get("ref_logp"), **loss_kwargs)
    mask = mb["response_mask"].astype(jnp.float32)
    metrics["entropy"] = jnp.sum(entropy * mask) / jnp.maximum(jnp.sum(mask), 1.0)
    return loss * mb["weight"], metrics


_UPDATE_STATIC = ("graphdef", "optimizer", "prompt_len", "temperature", "chunk", "loss_kwargs")


def _accumulate(graphdef, params, acc: tuple, batch: dict, prompt_len: int, temperature: float,
                loss_kwargs: tuple, chunk: int, frozen=None) -> tuple:
    """acc = (grads, loss, metrics) plus batch's U micro-batches (a scan): gradients and losses
    are summed (each micro-batch's loss carries its weight), metrics summed weighted."""
    kwargs = dict(loss_kwargs)
    grad_fn = jax.value_and_grad(_micro_loss, has_aux=True)

    def step(carry, mb):
        grads, loss_sum = carry
        (loss, metrics), g = grad_fn(params, graphdef, mb, prompt_len, temperature, chunk, kwargs, frozen)
        return (jax.tree.map(jnp.add, grads, g), loss_sum + loss), metrics

    grads, loss, metrics = acc
    (grads, loss), per_micro = jax.lax.scan(step, (grads, loss), batch)
    weighted = jax.tree.map(lambda m: jnp.sum(m * batch["weight"]), per_micro)  # weighted means
    metrics = weighted if metrics is None else jax.tree.map(jnp.add, metrics, weighted)
    return grads, loss, metrics


def _apply(state: TrainState, acc: tuple, optimizer) -> tuple[TrainState, dict]:
    """One AdamW step from accumulated (grads, loss, metrics); a non-finite loss or gradient
    leaves params and optimizer state unchanged and counts a skip."""
    grads, loss, metrics = acc
    grad_norm = optax.tree_utils.tree_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, new_opt = optimizer.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
    new_state = TrainState(
        params=keep(new_params, state.params),
        opt_state=keep(new_opt, state.opt_state),
        step=state.step + finite.astype(jnp.int32),
        skipped=jnp.where(finite, 0, state.skipped + 1),
        skipped_total=state.skipped_total + (~finite).astype(jnp.int32),
    )
    metrics = dict(metrics, loss=loss, grad_norm=grad_norm, skipped=(~finite).astype(jnp.float32))
    return new_state, metrics


def _zero_acc(params) -> tuple:
    return jax.tree.map(jnp.zeros_like, params), jnp.zeros((), jnp.float32), None


@functools.partial(jax.jit, donate_argnums=(1,), static_argnames=_UPDATE_STATIC)
def update(graphdef, state: TrainState, batch: dict, *, optimizer, prompt_len: int,
           temperature: float, loss_kwargs: tuple, chunk: int = 512, frozen=None):
    """One optimizer update from one mini-batch, accumulated over U micro-batches.

    batch: tokens int32 [U, b, L]; attention_mask [U, b, L]; response_mask bool [U, b, N];
      old_logp float32 [U, b, N]; advantages float32 [U, b]; weight float32 [U] (micro_weights);
      optional ref_logp float32 [U, b, N].
    loss_kwargs: policy_loss keyword arguments as a tuple of (name, value) pairs (hashable).
    A non-finite loss or gradient leaves params and optimizer state unchanged and counts a skip.
    frozen: None, or with LoRA the frozen base's nnx.State (state.params then holds the adapters
      only: gradients, optimizer state and updates are theirs alone).
    Returns (new state, metrics: float32 scalars).
    """
    acc = _accumulate(graphdef, state.params, _zero_acc(state.params), batch, prompt_len, temperature,
                      loss_kwargs, chunk, frozen)
    return _apply(state, acc, optimizer)


@functools.partial(jax.jit, static_argnames=("graphdef", "prompt_len", "temperature", "chunk", "loss_kwargs"))
def _first_piece(graphdef, params, batch, *, prompt_len, temperature, loss_kwargs, chunk, frozen=None):
    return _accumulate(graphdef, params, _zero_acc(params), batch, prompt_len, temperature, loss_kwargs, chunk,
                       frozen)


@functools.partial(jax.jit, donate_argnums=(2,),
                   static_argnames=("graphdef", "prompt_len", "temperature", "chunk", "loss_kwargs"))
def _next_piece(graphdef, params, acc, batch, *, prompt_len, temperature, loss_kwargs, chunk, frozen=None):
    return _accumulate(graphdef, params, acc, batch, prompt_len, temperature, loss_kwargs, chunk, frozen)


_apply_jit = jax.jit(_apply, donate_argnums=(0,), static_argnames=("optimizer",))


def update_pieces(graphdef, state: TrainState, pieces: list, *, optimizer, prompt_len: int,
                  temperature: float, loss_kwargs: tuple, chunk: int = 512, frozen=None):
    """One optimizer update from a mini-batch given as pieces of different response widths
    (batching.minibatches with length grouping): each piece [U_i, b, P + N_i] is accumulated by
    its own program (one compilation per shape), then one AdamW step. One piece is `update`.
    The weights of all pieces together sum to 1, so the gradient is the whole mini-batch's."""
    kw = dict(prompt_len=prompt_len, temperature=temperature, loss_kwargs=loss_kwargs, chunk=chunk, frozen=frozen)
    if len(pieces) == 1:
        return update(graphdef, state, pieces[0], optimizer=optimizer, **kw)
    acc = _first_piece(graphdef, state.params, pieces[0], **kw)
    for piece in pieces[1:]:
        acc = _next_piece(graphdef, state.params, acc, piece, **kw)
    return _apply_jit(state, acc, optimizer=optimizer)
