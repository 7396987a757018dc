"""What one HBPO step must cost on a slice, from the model and the workload alone (not from XLA's
counts): the floor the plan's projection is measured against.

  update   = (2 matmul parameters + causal attention) flops per trained token x the training
             multiplier (forward 1 + backward 2, + 1 forward again under full remat), over every
             real (unpadded) prompt and response token, on every chip at peak;
  rollout  = every row decoding at once (the step's KV fits), one decode step per token of the
             longest row; each step reads the bfloat16 matmul weights once per chip and the
             filled KV of the chip's rows (max with the step's flops at peak); plus the prompts'
             prefill and the prefixes' forward at peak.
No communication, no host work, no padding, 100% of peak: nothing runs faster than this.
"""
from __future__ import annotations

import dataclasses

import numpy as np

# Forward passes' worth of flops per trained token: forward 1, backward 2, remat's recompute 1.
TRAIN_PASSES = {"none": 3.0, "dots": 3.0, "full": 4.0}


@dataclasses.dataclass(frozen=True)
class Workload:
    """The model's per-token costs. matmul_params: parameters in matmuls (layers' projections and
    the LM head; not the embedding lookup); attn_width: query heads x head_dim; layers;
    kv_bytes: KV bytes per token (all layers, keys and values, the cache dtype); weight_bytes:
    what one decode step reads of weights per chip (bfloat16 matmul weights, whole on every
    chip); passes: TRAIN_PASSES of the config's remat."""

    matmul_params: float
    attn_width: int
    layers: int
    kv_bytes: float
    weight_bytes: float
    passes: float

    @classmethod
    def of(cls, cfg, cache_itemsize: int = 2, weight_itemsize: int = 2) -> Workload:
        """The Workload of a ModelConfig (hbpo_jax.models.config)."""
        e, m, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
        q, kv = cfg.num_heads * d, cfg.num_kv_heads * d
        per_layer = e * (q + 2 * kv) + q * e + 3 * e * m
        params = cfg.num_layers * per_layer + e * cfg.vocab_size  # the LM head is a matmul, tied or not
        return cls(float(params), q, cfg.num_layers, float(cfg.num_layers * 2 * kv * cache_itemsize),
                   float(params * weight_itemsize), TRAIN_PASSES.get(cfg.remat, 3.0))

    def forward_flops(self, tokens: np.ndarray) -> float:
        """Forward flops of whole sequences of `tokens` tokens each (int [R]): 2 x matmul
        parameters per token, and causal attention, q.k and p.v, 2 x 2 x width x layers per
        (query, earlier key) pair: T (T + 1) / 2 pairs per sequence."""
        t = np.asarray(tokens, np.float64)
        return float(2.0 * self.matmul_params * t.sum() + 4.0 * self.attn_width * self.layers * (t * (t + 1) / 2).sum())


@dataclasses.dataclass(frozen=True)
class Floor:
    """Seconds of one step at the floor: update, rollout (decode + prefill), step; decode_steps
    (the longest row's); trained_tokens; update_flops (all chips); decode_bytes (per chip)."""

    update_s: float
    rollout_s: float
    decode_steps: int
    trained_tokens: int
    update_flops: float
    decode_bytes: float

    @property
    def step_s(self) -> float:
        return self.update_s + self.rollout_s


def floor(work: Workload, responses: np.ndarray, prompts: np.ndarray, row_prompt: np.ndarray, chips: int,
          peak_flops: float, hbm_bandwidth: float, prefix: int = 0, decode_group: int = 1) -> Floor:
    """The Floor of one step on `chips` chips. responses: int [R] response tokens per row;
    prompts: int [G] tokens of each distinct prompt; row_prompt: int [R], each row's prompt;
    prefix: budget-prefix tokens per row (forwarded in the admit, trained as response tokens
    when counted in `responses`); decode_group: chips that split each decode weight
    (rollout.decode_tensor_parallel): each chip reads 1 / decode_group of them a step."""
    responses = np.asarray(responses, np.int64)
    context = np.asarray(prompts, np.int64)[np.asarray(row_prompt)]
    trained = context + responses
    update_flops = work.passes * work.forward_flops(trained)
    update_s = update_flops / (chips * peak_flops)
    # The prompt store's prefill (each distinct prompt once) and each row's prefix forward.
    prefill_flops = work.forward_flops(prompts) + 2.0 * work.matmul_params * prefix * len(responses)
    prefill_s = prefill_flops / (chips * peak_flops)
    # Decode: step t runs every row with more than t tokens still to draw (its first token came
    # from the admit); the rows' KV split evenly over the chips.
    steps = int(responses.max()) - 1 if len(responses) else 0
    t = np.arange(steps)[:, None]
    draws = responses[None, :] - 1
    alive = t < draws
    running = alive.sum(1)
    filled = np.where(alive, (context + prefix + 1)[None, :] + t, 0).sum(1).astype(np.float64)
    step_bytes = work.weight_bytes / decode_group + work.kv_bytes * filled / chips
    step_flops = (2.0 * work.matmul_params * running + 4.0 * work.attn_width * work.layers * filled) / chips
    decode_s = float(np.maximum(step_bytes / hbm_bandwidth, step_flops / peak_flops).sum())
    return Floor(update_s, decode_s + prefill_s, steps, int(trained.sum()), update_flops, float(step_bytes.sum()))
