"""The projection's model of the packed update and of pages on demand (hbpo_jax.plan.paper_step),
checked against the packer the update runs (train/packing.py) and by hand."""
import pathlib
import sys

import numpy as np

from hbpo_jax import spec
from hbpo_jax.plan import lengths, paper_step
from hbpo_jax.rollout import static as sampler
from hbpo_jax.train import packing

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
from configs import qwen1_5b  # noqa: E402


def _paper_run(**overrides):
    config = qwen1_5b.get_config()
    for key, value in overrides.items():
        section, name = key.split(".")
        config[section][name] = value
    return spec.resolve(config, num_devices=8)


def _arrays(responses, fill, prompt_width, response_width):
    """update_arrays' fields for rows of `fill` prompt tokens and `responses` response tokens."""
    attn = np.zeros((len(responses), prompt_width + response_width), np.int32)
    for r, (f, n) in enumerate(zip(fill, responses)):
        attn[r, prompt_width - f:prompt_width + n] = 1
    resp = attn[:, prompt_width:].astype(bool)
    return dict(tokens=np.ones_like(attn), attention_mask=attn, response_mask=resp,
                old_logp=np.zeros(resp.shape, np.float32), advantages=np.zeros(len(fill), np.float32),
                prompt_len=prompt_width)


def test_packed_micro_batches_are_those_the_packer_fills():
    run = _paper_run()
    assert run.train.pack_rows
    mix = lengths.LengthMix(cap=run.sampling.rollout.max_response_len)
    responses, prompts, row_prompt, _ = paper_step.rows_of(run, mix)
    fill = prompts[row_prompt] + mix.prefix
    counted = paper_step.packed_micro_batches(run, responses, fill)
    lanes, lane_len, u = packing.layout_for(run)
    arrays = _arrays(responses, fill, sampler.bucket_length(int(fill.max())), run.sampling.rollout.max_response_len)
    t = run.train
    packed = [packing.pack(arrays, slice(s, s + t.rows_per_minibatch), lanes=lanes, lane_len=lane_len,
                           micro_batches=u, aggregation="token-mean", loss_scale_tokens=None,
                           micro=t.micro_batch_size) for s in range(0, len(fill), t.rows_per_minibatch)]
    assert counted == [float((mb["weight"] > 0).sum() - 0.5 * mb["half"].sum()) for mb in packed]
    assert any(mb["half"].any() for mb in packed)  # at this mix some mini-batches end in half lanes
    # Each mini-batch's real tokens fill all but its last micro-batch, but for the lanes' ends.
    tokens = (fill + responses).reshape(t.mini_batches, -1).sum(1)
    assert all(0.95 * (c - 1) * lanes * lane_len < n <= c * lanes * lane_len for c, n in zip(counted, tokens))


def test_page_top_ups_by_hand():
    # 1,024 slots on 8 chips, a pool of 2^21 tokens: 16,384 pages of 16 per chip, against 128 slots x
    # the longest row's 282 pages (400 prompt tokens + 12 of prefix + 4,095) for whole limits: pages
    # on demand, rows topped up 4,096 / 16 = 256 tokens ahead, so the longest row is topped up 16 times.
    fill = np.array([150, 412])
    assert paper_step.page_top_ups(_paper_run(), slots=1024, chips=8, fill=fill) == 16
    # The default pool holds every slot's whole limit: rows take it at admission, no top-ups.
    assert paper_step.page_top_ups(_paper_run(**{"rollout.kv_tokens": 0}), slots=1024, chips=8, fill=fill) == 0
