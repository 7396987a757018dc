"""Rows packed by tokens: the update's micro-batches as fixed token budgets.

A mini-batch's rows (each its real prompt tokens, unpadded, then its counted response) are laid
end to end in lanes of S tokens; a micro-batch is k lanes, [k, S]; a mini-batch is U such
micro-batches, [U, k, S], U = the unpacked layout's rows / micro-batch (enough when every row is
at the cap), the ones packing leaves empty skipped by the update, and the last one of half
lanes (rows in each lane's first S / 2 tokens) run at half width when the rows fit that way (a
lax.switch: skip / half / full, in one program). So the update pays for real tokens, and its
shapes depend only on the config: one program per run.

Each token position carries what the loss needs at the position that predicts the next token:
the target token, the row's advantage, the sampler's (and reference) log-prob, the loss mask and
the token's weight in the mini-batch's loss, which folds in the objective's aggregation over the
whole mini-batch (`token_weights`), so the sum over micro-batches of sum(weight x per-token
loss) is the unpacked update's loss, and its gradient the unpacked gradient.

Shapes: R rows of a mini-batch, P the (bucketed, left-padded) prompt width of update_arrays, N
its response width; k lanes per micro-batch, S tokens per lane (at least the longest possible
row: max prompt + max response), U micro-batches.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from hbpo_jax.loss import AGGREGATIONS

# The packed micro-batch fields: [U, k, S] each, plus weight [U] and half [U] (rows only in each
# lane's first S / 2 tokens: the update runs that micro-batch at half width).
FIELDS = {"tokens": np.int32, "segment_ids": np.int32, "positions": np.int32, "targets": np.int32,
          "loss_mask": np.bool_, "loss_weight": np.float32, "old_logp": np.float32, "advantages": np.float32}


def token_weights(response_mask: np.ndarray, aggregation: str, loss_scale_tokens: float | None,
                  micro: int) -> np.ndarray:
    """Each loss token's weight in its mini-batch's loss: float64 [R, N] (0 off the mask), so that
    sum(weight x per-token loss) equals the unpacked update's loss (the micro-batch losses of
    policy_loss times micro_weights, summed) under `aggregation`:
      token-mean: 1 / (loss tokens of the mini-batch);
      sequence-mean-token-mean: 1 / (the row's loss tokens x rows with a loss token);
      token-sum-norm: 1 / loss_scale_tokens (default: micro x N, policy_loss's per micro-batch).
    response_mask: bool [R, N]; micro: rows per unpacked micro-batch."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; expected one of {AGGREGATIONS}")
    m = np.asarray(response_mask, bool).astype(np.float64)
    if aggregation == "token-mean":
        return m / max(m.sum(), 1.0)
    if aggregation == "sequence-mean-token-mean":
        per_row = m.sum(1, keepdims=True)
        return m / np.maximum(per_row, 1.0) / max(int((per_row > 0).sum()), 1)
    scale = loss_scale_tokens if loss_scale_tokens is not None else micro * m.shape[1]
    return m / float(scale)


def lane_layout(lengths: np.ndarray, lane_len: int) -> list[list[int]]:
    """First-fit decreasing: the rows (lengths int [R], each ≤ lane_len; 0 = left out) in lanes of
    lane_len tokens. Returns the lanes, each its rows in order of placement."""
    lanes: list[list[int]] = []
    room: list[int] = []
    for r in np.argsort(-np.asarray(lengths), kind="stable"):
        n = int(lengths[r])
        if n == 0:
            continue
        if n > lane_len:
            raise ValueError(f"a row of {n} tokens does not fit a lane of {lane_len}")
        j = next((j for j, free in enumerate(room) if free >= n), None)
        if j is None:
            lanes.append([])
            room.append(lane_len)
            j = len(lanes) - 1
        lanes[j].append(int(r))
        room[j] -= n
    return lanes


def _first_fit(lengths: np.ndarray, capacities: list[int]) -> list[list[int]] | None:
    """First-fit decreasing of the rows (lengths int [R], 0 = left out) into bins of the given
    capacities, tried in order; None when a row finds no room."""
    bins: list[list[int]] = [[] for _ in capacities]
    room = list(capacities)
    for r in np.argsort(-np.asarray(lengths), kind="stable"):
        n = int(lengths[r])
        if n == 0:
            continue
        j = next((j for j, free in enumerate(room) if free >= n), None)
        if j is None:
            return None
        bins[j].append(int(r))
        room[j] -= n
    return bins


def lane_plan(lengths: np.ndarray, lane_len: int, lanes: int) -> tuple[list[list[int]], list[list[int]]]:
    """The lanes of one mini-batch: (full lanes of lane_len tokens, half lanes of lane_len // 2).

    A mini-batch's micro-batches hold `lanes` lanes each and the last one is partly empty (half
    of one on average: 9 points of padding at HBPO's mix with 16 lanes of 5,120 tokens). The
    update runs a micro-batch whose rows all sit in the first half of each lane at half width (a
    branch of the same program), so the last micro-batch is made of half lanes whenever the rows
    fit that way: first-fit decreasing into one micro-batch fewer of full lanes, then `lanes`
    half lanes. Returns (full lanes, half lanes or []), each lane its rows in order of placement
    (the full lanes as lane_layout packs them when no half micro-batch is taken). lengths: int
    [R] (0: left out)."""
    plain = lane_layout(lengths, lane_len)
    whole = -(-len(plain) // lanes)
    if whole == 0:
        return plain, []
    mixed = _first_fit(lengths, [lane_len] * ((whole - 1) * lanes) + [lane_len // 2] * lanes)
    if mixed is None:
        return plain, []
    full, half = mixed[:(whole - 1) * lanes], mixed[(whole - 1) * lanes:]
    return [lane for lane in full if lane], [lane for lane in half if lane]


def pack(arrays: dict, rows: slice, *, lanes: int, lane_len: int, micro_batches: int, aggregation: str,
         loss_scale_tokens: float | None, micro: int) -> dict | None:
    """One mini-batch (arrays' rows `rows`) packed: a dict of numpy [U, k, S] fields (FIELDS, and
    ref_logp when arrays has it) plus weight float32 [U] (the micro-batch's share of the mini-batch's
    loss tokens: the weight of its metrics; 0 for an empty micro-batch, which the update skips) and
    half bool [U] (the micro-batch of half lanes, lane_plan, run at half width).
    None when no row has a loss token (no optimizer step). Rows without a loss token are left out.

    arrays: minibatches.update_arrays' fields (tokens [R, P + N], attention_mask, response_mask,
    old_logp, advantages, prompt_len, optionally ref_logp); lanes k; lane_len S; micro_batches U.
    """
    p = arrays["prompt_len"]
    tokens, attn = arrays["tokens"][rows], arrays["attention_mask"][rows].astype(bool)
    resp_mask = arrays["response_mask"][rows]
    if not resp_mask.any():
        return None
    weights = token_weights(resp_mask, aggregation, loss_scale_tokens, micro)
    prompt_n, resp_n = attn[:, :p].sum(1), attn[:, p:].sum(1)
    full, half = lane_plan(row_lengths(arrays)[rows], lane_len, lanes)
    n_full = -(-len(full) // lanes)
    if n_full + bool(half) > micro_batches:
        raise ValueError(f"{n_full + bool(half)} micro-batches of {lanes} lanes of {lane_len} tokens needed, "
                         f"{micro_batches} available")
    # Full lanes first; the half lanes (rows in each lane's first half only) make the next micro-batch.
    layout = list(enumerate(full)) + [(n_full * lanes + i, lane) for i, lane in enumerate(half)]
    shape = (micro_batches * lanes, lane_len)
    out = {k: np.zeros(shape, dt) for k, dt in FIELDS.items()}
    refs = "ref_logp" in arrays
    if refs:
        out["ref_logp"] = np.zeros(shape, np.float32)
    old, adv = arrays["old_logp"][rows], arrays["advantages"][rows]
    for j, lane in layout:
        at = 0
        for seg, r in enumerate(lane, start=1):
            pn, rn = int(prompt_n[r]), int(resp_n[r])
            row = np.concatenate([tokens[r, p - pn:p], tokens[r, p:p + rn]])  # the prompt is left-padded
            n = pn + rn
            out["tokens"][j, at:at + n] = row
            out["segment_ids"][j, at:at + n] = seg
            out["positions"][j, at:at + n] = np.arange(n)
            # Position at + pn - 1 + t predicts response token t (the unpacked hidden[:, P - 1 + t]).
            pred = slice(at + pn - 1, at + pn - 1 + rn)
            out["targets"][j, pred] = tokens[r, p:p + rn]
            out["loss_mask"][j, pred] = resp_mask[r, :rn]
            out["loss_weight"][j, pred] = weights[r, :rn]
            out["old_logp"][j, pred] = old[r, :rn]
            out["advantages"][j, pred] = adv[r]
            if refs:
                out["ref_logp"][j, pred] = arrays["ref_logp"][rows][r, :rn]
            at += n
    out = {k: v.reshape((micro_batches, lanes, lane_len)) for k, v in out.items()}
    loss_tokens = out["loss_mask"].sum(axis=(1, 2))
    out["weight"] = (loss_tokens / max(loss_tokens.sum(), 1)).astype(np.float32)
    out["half"] = np.arange(micro_batches) == (n_full if half else -1)
    return out


def row_lengths(arrays: dict) -> np.ndarray:
    """Each row's packed length (int [R]): its real prompt and counted response tokens, 0 for a
    row without a loss token (packing leaves it out). arrays: minibatches.update_arrays' fields."""
    p = arrays["prompt_len"]
    attn = arrays["attention_mask"].astype(bool)
    return np.where(arrays["response_mask"].any(1), attn[:, :p].sum(1) + attn[:, p:].sum(1), 0)


def padded_fraction(arrays: dict, rows_per_minibatch: int, *, lanes: int, lane_len: int,
                    half_lanes: bool = True) -> float:
    """The share of the token slots the packed update computes (the micro-batches it does not
    skip: micro_batch_cost x k x S per mini-batch) that hold no token of a row with a loss token;
    half_lanes False: as if every micro-batch ran at full width."""
    lengths = row_lengths(arrays)
    slots = tokens = 0
    for start in range(0, len(lengths), rows_per_minibatch):
        part = lengths[start:start + rows_per_minibatch]
        slots += micro_batch_cost(part, lane_len, lanes, half_lanes) * lanes * lane_len
        tokens += int(part.sum())
    return 1.0 - tokens / max(slots, 1)


def micro_batch_cost(lengths: np.ndarray, lane_len: int, lanes: int, half_lanes: bool = True) -> float:
    """The micro-batches one mini-batch's rows (lengths int [R], prompt + response; 0 = left out)
    cost the packed update: its full ones, and 1/2 for a micro-batch of half lanes (lane_plan;
    half_lanes False: full lanes only, lane_layout)."""
    if not half_lanes:
        return float(-(-len(lane_layout(lengths, lane_len)) // lanes))
    full, half = lane_plan(lengths, lane_len, lanes)
    return -(-len(full) // lanes) + 0.5 * bool(half)


def layout_for(run) -> tuple[int, int, int]:
    """(k lanes, S tokens per lane, U micro-batches) of a run spec's packed update. S: the longest
    row, the bucketed prompt width + max response; k = train.micro_batch_size: a micro-batch's
    token budget k x S is the unpacked micro-batch at the cap, the program whose memory the plan
    compiles for the slice (launch/memory.py --programs=train: `update:`), one lane per chip of
    the batch axes on the default pod meshes; U = rows_per_minibatch / micro_batch_size, enough
    for every row at the cap (the micro-batches packing leaves empty are skipped)."""
    from hbpo_jax.rollout import static as sampler
    s, t = run.sampling, run.train
    lane = sampler.bucket_length(s.max_prompt_len) + s.rollout.max_response_len
    return t.micro_batch_size, lane, t.rows_per_minibatch // t.micro_batch_size


def abstract(lanes: int, lane_len: int, micro_batches: int, mesh, rules, *, with_ref: bool = False) -> dict:
    """ShapeDtypeStructs of one packed mini-batch with the shardings `put` gives (the plan)."""
    from hbpo_jax.train import minibatches
    row_s, rep = minibatches.shardings(mesh, rules)
    keys = list(FIELDS) + (["ref_logp"] if with_ref else [])
    dtypes = dict(FIELDS, ref_logp=np.float32)
    out = {k: jax.ShapeDtypeStruct((micro_batches, lanes, lane_len), jnp.dtype(dtypes[k]), sharding=row_s)
           for k in keys}
    out["weight"] = jax.ShapeDtypeStruct((micro_batches,), jnp.float32, sharding=rep)
    out["half"] = jax.ShapeDtypeStruct((micro_batches,), jnp.bool_, sharding=rep)
    return out
