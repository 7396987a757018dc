"""The jitted, sharded policy update: chunked log-probs, the clipped policy loss, gradient
accumulation over micro-batches, AdamW, and skipping of non-finite steps.

Shapes: R = sequences in a mini-batch, split into U micro-batches of b = R / U sequences; P = the
(bucketed) prompt length, N = response length, L = P + N, E = hidden, V = vocabulary.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

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
    [B, N]; the entropy carries no gradient. Only [B, chunk, V] logits exist at a time, in the
    forward and (recomputed from the chunk's hidden rows and saved log-normalizers) in the backward
    pass, so the float32 [B, N, V] tensor is never materialised.
    """
    b, n, e = hidden.shape
    c = min(chunk, n)
    pad = -n % c
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
    hs = hidden.reshape(b, -1, c, e).swapaxes(0, 1)  # [chunks, B, c, E]
    ts = targets.reshape(b, -1, c).swapaxes(0, 1)
    layout = _vocab_parallel(head, b)
    if layout is not None:
        head = jax.lax.with_sharding_constraint(head, layout["head"])
    one = _chunk_logprobs(temperature, layout)

    def step(args):
        h, t = args
        if layout is not None:  # every row of the chunk on each chip, the vocabulary split
            h = jax.lax.with_sharding_constraint(h, layout["rows"])
        return one(h, head, t)

    logp, entropy = jax.lax.map(step, (hs, ts))
    unchunk = lambda x: x.swapaxes(0, 1).reshape(b, -1)[:, :n]  # noqa: E731
    logp, entropy = unchunk(logp), unchunk(entropy)
    if layout is not None:
        logp, entropy = (jax.lax.with_sharding_constraint(x, layout["out"]) for x in (logp, entropy))
    return logp, entropy


def _chunk_logprobs(temperature: float, layout: dict | None):
    """One chunk's (logp, entropy) [B, c] from h [B, c, E], head [E, V], t int32 [B, c], with a
    hand-written gradient. Autodiff of the rematerialised forward passes over the float32
    [B, c, V] logits four times in the backward: the recomputation writes them, the log-sum-exp
    reads them again, and each of the two gradient matmuls (dh, dhead) reads them in float32 to
    form the softmax's gradient. This backward takes the log-normalizer the forward saved, and its
    recomputation writes d logits = g (onehot - softmax) / temperature once, in the compute dtype
    (what the MXU rounds a float32 operand to anyway), which the two matmuls read: on v5p-32 the
    update's LM head moved 0.34 TB a mini-batch before, 0.22 TB after (docs/tpu_plan.md)."""

    def logits_of(h, head):
        logits = jnp.einsum("bce,ev->bcv", h, head.astype(h.dtype),
                            preferred_element_type=jnp.float32) / temperature
        return logits if layout is None else jax.lax.with_sharding_constraint(logits, layout["logits"])

    def hits(logits, t):
        return jax.lax.broadcasted_iota(jnp.int32, logits.shape, 2) == t[..., None]

    def forward(h, head, t):
        logits = logits_of(h, head)
        # Two passes over the float32 logits: their maximum, then (fused into one) the sum of
        # exp(logit - max), the entropy's sum of exp(logit - max) x logit, and the target's logit
        # as a masked sum over a sharded V.
        top = jnp.max(logits, axis=-1, keepdims=True)
        weights = jnp.exp(logits - top)
        total = jnp.sum(weights, axis=-1)
        lse = jnp.log(total) + top[..., 0]
        logp = jnp.sum(jnp.where(hits(logits, t), logits, 0.0), axis=-1) - lse
        entropy = lse - jnp.sum(weights * logits, axis=-1) / total
        return (logp, entropy), lse

    @jax.custom_vjp
    def one(h, head, t):
        return forward(h, head, t)[0]

    def one_fwd(h, head, t):
        out, lse = forward(h, head, t)
        return out, (h, head, t, lse)

    def one_bwd(res, cotangents):
        h, head, t, lse = res
        g = cotangents[0]  # the entropy's cotangent is dropped: it carries no gradient
        logits = logits_of(h, head)
        d = g[..., None] * (hits(logits, t) - jnp.exp(logits - lse[..., None])) / temperature
        d = d.astype(h.dtype)
        if layout is not None:
            d = jax.lax.with_sharding_constraint(d, layout["logits"])
        dh = jnp.einsum("bcv,ev->bce", d, head.astype(h.dtype), preferred_element_type=jnp.float32)
        dhead = jnp.einsum("bce,bcv->ev", h, d, preferred_element_type=jnp.float32)
        return dh.astype(h.dtype), dhead.astype(head.dtype), np.zeros(t.shape, jax.dtypes.float0)

    one.defvjp(one_fwd, one_bwd)
    return one


def _vocab_parallel(head, rows: int) -> dict | None:
    """The lm head's layout for the chunked log-probs under sharding.logical_rules: vocabulary-
    parallel over the weights' FSDP axes (the `embed` rule's) and `tensor`. Gathering the head
    whole for each chunk (as each layer's weights are) would read the [E, V] head (467 MB in
    bfloat16 for Qwen2-1.5B) and all-reduce its gradient at every chunk, most of the update's
    bytes; split on V, the non-contracting dimension, each chip reads its 1/n of the head, its
    gradient stays local, and what moves is a chunk's hidden rows (all-gathered over FSDP, a few
    MB) and per-row softmax statistics. The head itself is resharded E -> V once per call (an
    all-to-all of 1/n of it per chip), its gradient back once.
    Returns NamedShardings head [E, V], rows [B, c, E], logits [B, c, V], out [B, N]; None
    outside logical_rules, without a mesh, or when the axes do not divide V and the rows."""
    rules, mesh = sharding_lib.active_rules(), sharding_lib.array_mesh(head)
    if rules is None or mesh is None:
        return None
    table = dict(rules)
    live = lambda axes: tuple(a for a in axes if mesh.shape.get(a, 1) > 1)  # noqa: E731
    fsdp = live(table.get("embed", ()))
    vocab = fsdp + tuple(a for a in live(table.get("vocab", ())) if a not in fsdp)
    batch = live(table.get("batch", ()))
    keep = tuple(a for a in batch if a not in vocab)  # row axes the vocabulary does not use (data)
    split = math.prod(mesh.shape[a] for a in vocab)
    if not vocab or head.shape[1] % split or rows % math.prod(mesh.shape[a] for a in batch):
        return None
    spec = lambda *dims: NamedSharding(mesh, P(*dims))  # noqa: E731
    axes = lambda a: None if not a else a if len(a) > 1 else a[0]  # noqa: E731
    return dict(head=spec(None, axes(vocab)), rows=spec(axes(keep), None, None),
                logits=spec(axes(keep), None, axes(vocab)), out=spec(axes(batch), None))


def response_logprobs(model, tokens, attention_mask, prompt_len: int, temperature: float = 1.0,
                      chunk: int = 512):
    """Log-probs of the response tokens given everything before them.

    tokens: int32 [B, L] = left-padded prompt [B, P] then response [B, N];
    attention_mask: [B, L] (0 on prompt padding and after each response's end).
    Returns float32 (logp, entropy) [B, N]: logp[:, j] = log p(tokens[:, P + j] | tokens[:, :P + j]).
    """
    hidden, _ = model.forward(tokens, attention_mask=attention_mask, return_hidden=True)
    h = sharding_lib.constrain(hidden[:, prompt_len - 1: -1], ("batch", "act_seq", "act_embed"))
    return chunked_logprobs(h, head_weight(model), tokens[:, prompt_len:], temperature, chunk)


def head_weight(model):
    """The output projection [E, V] as the log-probs read it (chunked_logprobs lays it out)."""
    return model.head_weight()


@functools.partial(jax.jit, static_argnames=("graphdef", "prompt_len", "temperature", "chunk", "rules"))
def compute_logprobs(graphdef, params, tokens, attention_mask, *, prompt_len: int,
                     temperature: float = 1.0, chunk: int = 512, rules=None):
    """Jitted response_logprobs for a batch (old or reference log-probs): float32 [B, N].
    rules: the mesh's rule table (normalised, hashable; None: sharding.DEFAULT_RULES)."""
    with sharding_lib.logical_rules(rules):
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


_UPDATE_STATIC = ("graphdef", "optimizer", "prompt_len", "temperature", "chunk", "loss_kwargs", "rules")


def pin_like(tree, params, rules=None):
    """tree (params' structure: gradients, new parameters) constrained to the parameters' stored
    (FSDP-sharded) layouts under jit, so the gradient accumulator stays sharded (each micro-batch's
    weight gradients summed into their shards, never kept whole on a chip) and the update's outputs
    keep the layouts its inputs have. Identity without a mesh."""
    shardings = sharding_lib.param_shardings(params, rules)
    if shardings is None:
        return tree
    return jax.tree.map(jax.lax.with_sharding_constraint, tree, shardings)


def pin_opt_state(opt_state, params, optimizer, rules=None):
    """The optimizer state's per-parameter entries (Adam's moments) pinned like their parameters."""
    shardings = sharding_lib.param_shardings(params, rules)
    if shardings is None:
        return opt_state
    return optax.tree_map_params(optimizer, jax.lax.with_sharding_constraint, opt_state, shardings,
                                 transform_non_params=lambda x: x)


def _accumulate(graphdef, params, acc: tuple, batch: dict, prompt_len: int, temperature: float,
                loss_kwargs: tuple, chunk: int, rules=None, frozen=None) -> tuple:
    """acc = (grads, loss, metrics) plus batch's U micro-batches (a scan): gradients and losses
    are summed (each micro-batch's loss carries its weight), metrics summed weighted. The model
    is traced under `rules` (sharding.logical_rules: activations pinned, weights gathered)."""
    kwargs = dict(loss_kwargs)
    grad_fn = jax.value_and_grad(_micro_loss, has_aux=True)

    def step(carry, mb):
        grads, loss_sum = carry
        with sharding_lib.logical_rules(rules):
            (loss, metrics), g = grad_fn(params, graphdef, mb, prompt_len, temperature, chunk, kwargs, frozen)
        grads = pin_like(jax.tree.map(jnp.add, grads, g), params, rules)
        return (grads, loss_sum + loss), metrics

    grads, loss, metrics = acc
    (grads, loss), per_micro = jax.lax.scan(step, (grads, loss), batch)
    weighted = jax.tree.map(lambda m: jnp.sum(m * batch["weight"]), per_micro)  # weighted means
    metrics = weighted if metrics is None else jax.tree.map(jnp.add, metrics, weighted)
    return grads, loss, metrics


# ----------------------------------------------------------------------------- the packed update

_TOKEN_LOSS_KEYS = ("clip_low", "clip_high", "dual_clip", "kl_coef")


def _packed_micro_loss(params, graphdef, mb, temperature, chunk, loss_kwargs, frozen=None):
    """One packed micro-batch (train/packing.py: [k, S] fields): (sum of weight x per-token loss,
    (metric means over its loss tokens, the sum of weight x surrogate))."""
    model = nnx.merge(graphdef, params) if frozen is None else nnx.merge(graphdef, params, frozen)
    hidden, _ = model.forward(mb["tokens"], positions=mb["positions"], segment_ids=mb["segment_ids"],
                              return_hidden=True)
    hidden = sharding_lib.constrain(hidden, ("batch", "act_seq", "act_embed"))
    logp, entropy = chunked_logprobs(hidden, head_weight(model), mb["targets"], temperature, chunk)
    per_token, pg, m, stats = loss_lib.token_losses(
        logp, mb["old_logp"], mb["advantages"], mb["loss_mask"], ref_logp=mb.get("ref_logp"),
        **{k: v for k, v in loss_kwargs.items() if k in _TOKEN_LOSS_KEYS})
    count = jnp.maximum(jnp.sum(m), 1.0)
    means = {k: jnp.sum(v) / count for k, v in stats.items()}
    means["entropy"] = jnp.sum(jax.lax.stop_gradient(entropy) * m) / count
    if loss_kwargs.get("dual_clip", 3.0) is None:
        means["clip_frac_dual"] = jnp.float32(0.0)
    return jnp.sum(per_token * mb["loss_weight"]), (means, jax.lax.stop_gradient(jnp.sum(pg * mb["loss_weight"])))


def _accumulate_packed(graphdef, params, batch: dict, temperature: float, loss_kwargs: tuple, chunk: int,
                       rules=None, frozen=None) -> tuple:
    """(grads, loss, metrics) of a packed mini-batch [U, k, S] (a scan over its U micro-batches).
    Each micro-batch's loss already carries its tokens' weights in the mini-batch's aggregation,
    so gradients and losses are plain sums; a micro-batch of weight 0 (packing left it empty) is
    skipped and one marked `half` (its rows in each lane's first S / 2 tokens) runs on that half
    (lax.switch: both widths in one program), so the update costs the tokens' micro-batches.
    Metrics: token means weighted by each micro-batch's share of loss tokens; pg_loss summed
    like the loss."""
    kwargs = dict(loss_kwargs)
    grad_fn = jax.value_and_grad(_packed_micro_loss, has_aux=True)

    def compute(mb):
        with sharding_lib.logical_rules(rules):
            (loss, (means, pg)), g = grad_fn(params, graphdef, mb, temperature, chunk, kwargs, frozen)
        metrics = {k: v * mb["weight"] for k, v in means.items()}
        return pin_like(g, params, rules), loss, dict(metrics, pg_loss=pg)

    first = jax.tree.map(lambda x: x[0], batch)
    shapes = jax.eval_shape(compute, first)
    skip = lambda mb: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)  # noqa: E731
    half_len = first["tokens"].shape[-1] // 2
    half = lambda mb: compute({k: v[:, :half_len] if v.ndim == 2 else v for k, v in mb.items()})  # noqa: E731

    def step(carry, mb):
        branch = jnp.where(mb["weight"] > 0, jnp.where(mb["half"], 1, 2), 0)
        g, loss, metrics = jax.lax.switch(branch, (skip, half, compute), mb)
        grads = pin_like(jax.tree.map(jnp.add, carry[0], g), params, rules)
        return (grads, carry[1] + loss, jax.tree.map(jnp.add, carry[2], metrics)), None

    init = (pin_like(jax.tree.map(jnp.zeros_like, params), params, rules), jnp.zeros((), jnp.float32),
            jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes[2]))
    acc, _ = jax.lax.scan(step, init, batch)
    return acc


def _apply(state: TrainState, acc: tuple, optimizer, rules=None) -> tuple[TrainState, dict]:
    """One AdamW step from accumulated (grads, loss, metrics); a non-finite loss or gradient
    leaves params and optimizer state unchanged and counts a skip."""
    grads, loss, metrics = acc
    grad_norm = optax.tree_utils.tree_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, new_opt = optimizer.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
    new_state = TrainState(
        params=pin_like(keep(new_params, state.params), state.params, rules),
        opt_state=pin_opt_state(keep(new_opt, state.opt_state), state.params, optimizer, rules),
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
           temperature: float, loss_kwargs: tuple, chunk: int = 512, rules=None, frozen=None):
    """One optimizer update from one mini-batch, accumulated over U micro-batches.

    batch: tokens int32 [U, b, L]; attention_mask [U, b, L]; response_mask bool [U, b, N];
      old_logp float32 [U, b, N]; advantages float32 [U, b]; weight float32 [U] (micro_weights);
      optional ref_logp float32 [U, b, N]. Or packed rows (train/packing.py: [U, k, S] fields
      with segment_ids, weight [U]): the same loss and gradient, paying for real tokens.
    loss_kwargs: policy_loss keyword arguments as a tuple of (name, value) pairs (hashable).
    rules: the mesh's rule table, normalised (sharding.normalize_rules; None: the default).
    A non-finite loss or gradient leaves params and optimizer state unchanged and counts a skip.
    frozen: None, or with LoRA the frozen base's nnx.State (state.params then holds the adapters
      only: gradients, optimizer state and updates are theirs alone).
    Returns (new state, metrics: float32 scalars).
    """
    if "segment_ids" in batch:  # packed rows (train/packing.py); prompt_len unused
        acc = _accumulate_packed(graphdef, state.params, batch, temperature, loss_kwargs, chunk, rules, frozen)
    else:
        acc = _accumulate(graphdef, state.params, _zero_acc(state.params), batch, prompt_len, temperature,
                          loss_kwargs, chunk, rules, frozen)
    return _apply(state, acc, optimizer, rules)


_PIECE_STATIC = ("graphdef", "prompt_len", "temperature", "chunk", "loss_kwargs", "rules")


@functools.partial(jax.jit, static_argnames=_PIECE_STATIC)
def _first_piece(graphdef, params, batch, *, prompt_len, temperature, loss_kwargs, chunk, rules=None, frozen=None):
    return _accumulate(graphdef, params, _zero_acc(params), batch, prompt_len, temperature, loss_kwargs, chunk,
                       rules, frozen)


@functools.partial(jax.jit, donate_argnums=(2,), static_argnames=_PIECE_STATIC)
def _next_piece(graphdef, params, acc, batch, *, prompt_len, temperature, loss_kwargs, chunk, rules=None,
                frozen=None):
    return _accumulate(graphdef, params, acc, batch, prompt_len, temperature, loss_kwargs, chunk, rules, frozen)


_apply_jit = jax.jit(_apply, donate_argnums=(0,), static_argnames=("optimizer", "rules"))


def update_pieces(graphdef, state: TrainState, pieces: list, *, optimizer, prompt_len: int,
                  temperature: float, loss_kwargs: tuple, chunk: int = 512, rules=None, frozen=None):
    """One optimizer update from a mini-batch given as pieces of different response widths
    (batching.minibatches with length grouping): each piece [U_i, b, P + N_i] is accumulated by
    its own program (one compilation per shape), then one AdamW step. One piece is `update`.
    The weights of all pieces together sum to 1, so the gradient is the whole mini-batch's."""
    kw = dict(prompt_len=prompt_len, temperature=temperature, loss_kwargs=loss_kwargs, chunk=chunk,
              rules=None if rules is None else sharding_lib.normalize_rules(rules), frozen=frozen)
    if len(pieces) == 1:
        return update(graphdef, state, pieces[0], optimizer=optimizer, **kw)
    acc = _first_piece(graphdef, state.params, pieces[0], **kw)
    for piece in pieces[1:]:
        acc = _next_piece(graphdef, state.params, acc, piece, **kw)
    return _apply_jit(state, acc, optimizer=optimizer, rules=kw["rules"])
