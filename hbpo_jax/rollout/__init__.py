"""Rollouts: a batch of problems in, budget-stratified responses with their log-probs out.

  prompting.py   how a prompt is written: the modes (budget, natural, efficiency, fixed, l1,
                 l1_max), chat formats, the [prompts, budgets, samples] layout
  batch.py       `budget_rollouts`: the layout's rows sampled by an engine into a `RolloutBatch`
  static.py      rollout.engine="static": the `Sampler` (prefill + decode loop over a KV cache),
                 and `generate`, the plain entry point
  refill.py      rollout.engine="refill": decode slots refilled from a queue as rows end
  slots.py       the refill engine's hand-over types (slot state, admit batches, outputs, stats)
  pages.py       the host's book of KV pages: grants on demand, preemption
  next_token.py  next-token selection: temperature, top-k, top-p draws; per-row keys
"""
