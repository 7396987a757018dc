"""Training: a run on the resolved spec.

  loop.py         `run(config, workdir)`: checkpoints, resume, metrics, evaluations, export
  step.py         one step: rollouts -> grading -> advantages -> updates
  update.py       the jitted update: chunked log-probs, gradient accumulation, AdamW
  minibatches.py  the update batch: arrays, mini-batches, length-grouped micro-batches
  metrics.py      TensorBoard and metrics.jsonl
  preemption.py   the stop after SIGTERM, decided by every host together
  ablation.py     several training runs side by side (the notebooks' ablations)
"""
