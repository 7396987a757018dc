"""The update-batch layout: one rollout batch -> the arrays the jitted update takes.

One function builds it for the training loop, the memory plan and the HBPO-step benchmark, so the
three compile the same program. Shapes: R rows (prompt-major), P = the (bucketed) prompt width,
N = the response width the update trains on, U micro-batches of b rows per mini-batch.
"""
from __future__ import annotations

from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from hbpo_jax import sharding

# The keys of a mini-batch, with their trailing shape ("L" = P + N, "N") and dtype.
from hbpo_jax.train import update as trainer

FIELDS = {"tokens": ("L", np.int32), "attention_mask": ("L", np.int32), "response_mask": ("N", np.bool_),
          "old_logp": ("N", np.float32), "advantages": ((), np.float32)}


def response_width(longest: int, cap: int) -> int:
    """The response width N the update trains on: the longest counted response rounded up to a
    multiple of max(64, cap / 2), at most `cap`. At most two widths per run, so the update
    compiles at most twice (a compile of the tiny model's step costs as much as several steps)."""
    multiple = max(64, cap // 2)
    return min(max(multiple, -(-int(longest) // multiple) * multiple), int(cap))


def update_arrays(batch, advantages: np.ndarray, *, keep_rows: np.ndarray | None = None,
                  prefix_loss: bool = True) -> dict:
    """The training arrays of a rollout batch (rollout.RolloutBatch), cut to `response_width`.

    advantages: float32 [R]; keep_rows: bool [R], rows that may take the loss (dynamic sampling);
    prefix_loss False: the pre-filled budget text counts in the length but gets no loss.
    Returns numpy arrays: tokens int32 [R, P + N]; attention_mask int32 [R, P + N];
      response_mask bool [R, N] (the loss mask); old_logp float32 [R, N] (the sampler's, 0 where it
      did not sample or score); sampled_mask bool [R, N]; scored_mask bool [R, N] (where old_logp is
      the sampling policy's: rollout.RolloutBatch); advantages float32 [R]; and prompt_len = P.
    """
    counted = np.asarray(batch.response_mask, bool)
    n = response_width(int(counted.sum(1).max()), counted.shape[1])
    resp_mask = counted[:, :n].copy()
    if keep_rows is not None:
        resp_mask &= np.asarray(keep_rows, bool)[:, None]
    sampled = np.asarray(batch.sampled_mask, bool)[:, :n]
    if not prefix_loss:
        resp_mask &= sampled
    tokens = np.concatenate([np.asarray(batch.prompt_ids), np.asarray(batch.response_ids)[:, :n]], 1)
    attn = np.concatenate([np.asarray(batch.prompt_mask, bool), counted[:, :n]], 1)
    return dict(tokens=tokens.astype(np.int32), attention_mask=attn.astype(np.int32),
                response_mask=resp_mask, old_logp=np.asarray(batch.logprobs, np.float32)[:, :n],
                sampled_mask=sampled, scored_mask=np.asarray(batch.scored_mask, bool)[:, :n],
                advantages=np.asarray(advantages, np.float32),
                prompt_len=int(np.asarray(batch.prompt_ids).shape[1]))


def response_lengths(arrays: dict) -> np.ndarray:
    """Counted response tokens per row of update_arrays' output: int [R]."""
    return arrays["attention_mask"][:, arrays["prompt_len"]:].sum(1)


def micro_layout(lengths: np.ndarray, rows: int, micro: int, width: int, width_step: int = 0):
    """How a mini-batch's rows become micro-batches. lengths: int [rows], counted response tokens;
    width: N, the batch's response width. Returns (order int [rows], the rows in micro-batch order;
    widths int [rows / micro], each micro-batch's response width).

    width_step 0: the rows in place, every micro-batch at width N. width_step w > 0: the rows
    sorted by length, each micro-batch cut to its longest row rounded up to a multiple of w (at
    most N), so the update's cost follows the real tokens (at most N / w widths: compilations).
    """
    u = rows // micro
    if width_step <= 0:
        return np.arange(rows), np.full(u, int(width))
    order = np.argsort(lengths, kind="stable")
    longest = np.asarray(lengths)[order].reshape(u, micro).max(1)
    return order, np.minimum(np.maximum(-(-longest // width_step), 1) * width_step, int(width)).astype(int)


def padded_fraction(lengths: np.ndarray, rows: int, micro: int, width: int, width_step: int = 0) -> float:
    """The share of the update's response slots that hold no counted token (lengths int [R], R a
    multiple of `rows`): the padding the update pays for, under micro_layout."""
    slots = 0
    for start in range(0, len(lengths), rows):
        _, widths = micro_layout(lengths[start:start + rows], rows, micro, width, width_step)
        slots += int(widths.sum()) * micro
    return 1.0 - float(np.sum(lengths)) / max(slots, 1)


def minibatches(arrays: dict, rows: int, micro: int, aggregation: str, *,
                width_step: int = 0) -> Iterator[list | None]:
    """The mini-batches of `rows` rows. Each is a list of pieces (trainer.update_pieces), each a
    dict of [U_i, b, ...] arrays plus weight float32 [U_i] (trainer.micro_weights over the whole
    mini-batch, so the pieces' gradients sum to the mini-batch's). width_step 0: one piece of all
    U micro-batches at the batch's width; > 0: one piece per micro-batch, rows grouped by length
    and cut to their width (micro_layout). Yields None for a mini-batch with no loss token (every
    group masked out by dynamic sampling): it must take no optimizer step.

    arrays: update_arrays' [R, ...] training fields (FIELDS, optionally ref_logp); R % rows == 0.
    """
    keys = [k for k in (*FIELDS, "ref_logp") if k in arrays]
    total, p, n = len(arrays["tokens"]), arrays["prompt_len"], arrays["response_mask"].shape[1]
    lengths = response_lengths(arrays)
    u = rows // micro
    for start in range(0, total, rows):
        order, widths = micro_layout(lengths[start:start + rows], rows, micro, n, width_step)
        mb = {k: arrays[k][start:start + rows][order].reshape((u, micro) + arrays[k].shape[1:]) for k in keys}
        if not mb["response_mask"].any():
            yield None
            continue
        mb["weight"] = trainer.micro_weights(mb["response_mask"], aggregation)
        if width_step <= 0:
            yield [mb]
            continue
        yield [{k: _cut(k, v[i:i + 1], p + w, w) for k, v in mb.items()} for i, w in enumerate(widths)]


def _cut(key: str, x: np.ndarray, full: int, response: int) -> np.ndarray:
    """A micro-batch field cut to `full` = P + w columns ([.., L] fields) or `response` = w ([.., N])."""
    if key == "weight" or key == "advantages":
        return x
    tail = FIELDS[key][0] if key in FIELDS else "N"
    return x[..., :full] if tail == "L" else x[..., :response]


def shardings(mesh, rules) -> tuple[NamedSharding, NamedSharding]:
    """(micro-batch rows split over the batch axes: [U, b, ...], replicated: weight [U])."""
    batch_axes = sharding.logical_to_spec(("batch",), rules, mesh)[0]
    return NamedSharding(mesh, PartitionSpec(None, batch_axes)), NamedSharding(mesh, PartitionSpec())


def put(mb: dict, mesh, rules) -> dict:
    """A minibatches() piece onto the mesh."""
    rows, replicated = shardings(mesh, rules)
    return {k: jax.device_put(v, rows if v.ndim > 1 else replicated) for k, v in mb.items()}


def abstract_minibatch(rows: int, micro: int, prompt_len: int, n: int, mesh, rules, *,
                       with_ref: bool = False) -> dict:
    """ShapeDtypeStructs of one mini-batch at full shapes (the memory plan): the same keys and
    shardings that minibatches() + put() produce."""
    row_s, rep = shardings(mesh, rules)
    u, width = rows // micro, {"L": prompt_len + n, "N": n}
    out = {}
    for k, (tail, dtype) in FIELDS.items():
        shape = (u, micro) + ((width[tail],) if tail else ())
        out[k] = jax.ShapeDtypeStruct(shape, jnp.dtype(dtype), sharding=row_s)
    if with_ref:
        out["ref_logp"] = jax.ShapeDtypeStruct((u, micro, n), jnp.float32, sharding=row_s)
    out["weight"] = jax.ShapeDtypeStruct((u,), jnp.float32, sharding=rep)
    return out
