"""Evaluation: accuracy and response tokens per benchmark, prompting mode and difficulty.

  run.py          `evaluate` on the spec's eval section (before/after, periodic, launch/eval.py,
                  ablations); `run` evaluates a checkpoint or a model folder
  scoring.py      generate -> score -> `BenchmarkResult` statistics
  sets.py         benchmark readers (files, champ, reasoning-gym, the tiny task's eval set)
  checkpoints.py  loading what is evaluated: a run's checkpoint or a Hugging Face folder
  report.py       tables, results.json, plots
"""
