"""Rows packed by tokens (train/packing.py): the packed update's loss and gradient equal the
unpacked rows' under every aggregation (float32), with and without a reference term."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hbpo_jax.models import ModelConfig, create_model
from hbpo_jax.train import minibatches as batching
from hbpo_jax.train import packing
from hbpo_jax.train import update as trainer

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2, attention_impl="xla")
P, N, ROWS, MICRO = 6, 9, 8, 4


def _arrays(seed=0, with_ref=False):
    """update_arrays-shaped rows: left-padded prompts of 2..P tokens, responses of 1..N counted
    tokens, one row without a loss token (dynamic sampling) and one with a masked prefix."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, 64, size=(ROWS, P + N)).astype(np.int32)
    attn = np.zeros((ROWS, P + N), np.int32)
    prompt = rng.integers(2, P + 1, size=ROWS)
    resp = rng.integers(1, N + 1, size=ROWS)
    for r in range(ROWS):
        attn[r, P - prompt[r]:P] = 1
        attn[r, P:P + resp[r]] = 1
    counted = attn[:, P:].astype(bool)
    mask = counted.copy()
    mask[3] = False  # a row dropped by dynamic sampling
    mask[5, :2] = False  # a pre-filled prefix without loss
    out = dict(tokens=tokens, attention_mask=attn, response_mask=mask,
               old_logp=rng.normal(-4.0, 0.3, size=(ROWS, N)).astype(np.float32),
               advantages=rng.normal(size=ROWS).astype(np.float32), prompt_len=P)
    if with_ref:
        out["ref_logp"] = rng.normal(-4.0, 0.3, size=(ROWS, N)).astype(np.float32)
    return out


@functools.partial(jax.jit, static_argnames=("graphdef", "kw"))
def _packed(graphdef, params, batch, kw):
    return trainer._accumulate_packed(graphdef, params, batch, 1.0, kw, 4)


@pytest.mark.parametrize("aggregation,with_ref", [("token-mean", False), ("sequence-mean-token-mean", False),
                                                  ("token-sum-norm", True)])
def test_packed_update_equals_the_unpacked_rows(aggregation, with_ref):
    graphdef, params = nnx.split(create_model(CFG, seed=1))
    arrays = _arrays(with_ref=with_ref)
    scale = 3.0 * N if aggregation == "token-sum-norm" else None
    kw = dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0, aggregation=aggregation)
    if with_ref:
        kw["kl_coef"] = 0.1
    if scale:
        kw["loss_scale_tokens"] = scale
    kw = tuple(sorted(kw.items()))
    # Today's path: micro-batches of MICRO rows at the batch's width, one scan.
    (mb,) = next(batching.minibatches(arrays, ROWS, MICRO, aggregation))
    ref_grads, ref_loss, ref_metrics = trainer._first_piece(graphdef, params, jax.tree.map(jnp.asarray, mb),
                                                            prompt_len=P, temperature=1.0, loss_kwargs=kw, chunk=4)
    # Packed: lanes of 24 tokens (rows are unpadded: several share a lane), 2 lanes per micro-batch.
    packed = packing.pack(arrays, slice(0, ROWS), lanes=2, lane_len=24, micro_batches=4, aggregation=aggregation,
                          loss_scale_tokens=scale, micro=MICRO)
    assert packed["segment_ids"].max() >= 2  # rows share lanes
    assert (packed["weight"] == 0).any()  # an empty micro-batch, skipped
    assert packed["half"].any()  # the last one of half lanes, run at half width
    grads, loss, metrics = _packed(graphdef, params, jax.tree.map(jnp.asarray, packed), kw)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-7)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * float(np.abs(b).max() + 1e-30))
    np.testing.assert_allclose(metrics["pg_loss"], ref_metrics["pg_loss"], rtol=1e-5, atol=1e-7)
    if aggregation == "token-mean":  # the token-mean metrics are the same means
        for k in ("entropy", "approx_kl", "ratio_mean"):
            np.testing.assert_allclose(metrics[k], ref_metrics[k], rtol=1e-5)


def test_lane_layout_and_padded_fraction():
    lanes = packing.lane_layout(np.array([5, 9, 0, 4, 3, 10]), 12)
    assert sorted(r for lane in lanes for r in lane) == [0, 1, 3, 4, 5]  # row 2 (no tokens) left out
    assert all(sum([5, 9, 0, 4, 3, 10][r] for r in lane) <= 12 for lane in lanes) and len(lanes) == 3
    arrays = _arrays()
    frac = packing.padded_fraction(arrays, ROWS, lanes=2, lane_len=P + N)
    assert 0.0 <= frac < 0.5


def test_lane_plan_takes_a_half_micro_batch_when_the_rows_fit():
    rng = np.random.default_rng(3)
    lengths = rng.integers(1, 41, size=60)  # lanes of 40 tokens, 4 lanes a micro-batch
    full, half = packing.lane_plan(lengths, 40, 4)
    placed = sorted(r for lane in full + half for r in lane)
    assert placed == list(range(60))  # every row once
    assert all(lengths[lane].sum() <= 40 for lane in full) and all(lengths[lane].sum() <= 20 for lane in half)
    plain = len(packing.lane_layout(lengths, 40))
    cost = packing.micro_batch_cost(lengths, 40, 4)
    assert cost == -(-len(full) // 4) + 0.5 * bool(half) <= -(-plain // 4)
    assert half and cost == -(-plain // 4) - 0.5  # here the last micro-batch's rows fit half lanes
    # Rows too long for half lanes, or nothing left over: full micro-batches only.
    assert packing.lane_plan(np.full(8, 30), 40, 4) == (packing.lane_layout(np.full(8, 30), 40), [])


def test_packed_update_on_a_mesh_equals_the_unpacked_one_without():
    # The whole update (AdamW step included) of packed rows, lanes over an 8-device FSDP mesh (the
    # model traced under the rule table: weights gathered per layer, activations pinned), equals
    # today's unpacked update on one device; parameters keep their FSDP shardings.
    from hbpo_jax import sharding
    from hbpo_jax.spec import OptimSpec
    mesh = sharding.make_mesh((1, 8, 1))
    optimizer = trainer.make_optimizer(OptimSpec(1e-2, "constant", 0, 0.0, 0.9, 0.999, 1.0), total_updates=4)
    kw = tuple(sorted(dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0, aggregation="token-mean").items()))
    arrays = _arrays(seed=2)
    graphdef, params = nnx.split(create_model(CFG, seed=2))
    (mb,) = next(batching.minibatches(arrays, ROWS, MICRO, "token-mean"))
    plain, m1 = trainer.update(graphdef, trainer.init_state(params, optimizer), jax.tree.map(jnp.asarray, mb),
                               optimizer=optimizer, prompt_len=P, temperature=1.0, loss_kwargs=kw, chunk=4)
    model = create_model(CFG, seed=2, mesh=mesh)
    graphdef, sharded_params = nnx.split(model)
    packed = packing.pack(arrays, slice(0, ROWS), lanes=8, lane_len=24, micro_batches=2, aggregation="token-mean",
                          loss_scale_tokens=None, micro=MICRO)
    assert packed["half"].tolist() == [True, False]  # every row in the first half of the 8 lanes
    state, m2 = trainer.update(graphdef, trainer.init_state(sharded_params, optimizer),
                               batching.put(packed, mesh, sharding.DEFAULT_RULES), optimizer=optimizer, prompt_len=0,
                               temperature=1.0, loss_kwargs=kw, chunk=4,
                               rules=sharding.normalize_rules(sharding.DEFAULT_RULES))
    np.testing.assert_allclose(m2["loss"], m1["loss"], rtol=1e-5)
    np.testing.assert_allclose(m2["grad_norm"], m1["grad_norm"], rtol=1e-4)
    # One AdamW step of lr 1e-2 moves a parameter by up to 1e-2 whatever its gradient's size, so a
    # gradient element near zero can turn float32 rounding (other reduction orders on the mesh)
    # into a few 1e-5; 1e-4 is 1% of the step.
    for a, b in zip(jax.tree.leaves(plain.params), jax.tree.leaves(state.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4)
    q = state.params["layers"]["attn"]["q_proj"].get_value()  # [L, E, H, D]
    assert q.sharding.spec[1] == "fsdp"


def test_the_padding_benchmark_prints_each_layout():
    import pathlib
    import re
    import subprocess
    import sys
    root = pathlib.Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "launch/bench_packing.py", "--steps=2"], cwd=root, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    shares = {m.group(1): float(m.group(2)) for m in re.finditer(r"^\| ([^|]+?) \| [^|]+ \| ([\d.]+)%", out.stdout, re.M)}
    assert set(shares) == {"rows, one width", "rows grouped by 1024", "packed, full micro-batches only",
                           "packed (a last micro-batch of half lanes at half width)"}
    assert shares["packed (a last micro-batch of half lanes at half width)"] <= shares["packed, full micro-batches only"]
    assert shares["packed, full micro-batches only"] < shares["rows grouped by 1024"] < shares["rows, one width"]
