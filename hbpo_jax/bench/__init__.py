"""Timed benchmarks (they print tables; plans that time nothing are in hbpo_jax.plan): the quick
sampler benchmark and the GPU benchmark's sections (sampler, training step, transformers'
baseline, HBPO step), run in worker processes by a time-budgeted runner."""
