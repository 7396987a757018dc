"""Training and evaluation problems.

  readers.py         local jsonl / json / parquet (or hub) rows normalised to {problem, answer}
  reasoning_gym.py   reasoning-gym's procedural problems ("rg:<task>,...")
  sources.py         the data path of a config resolved into a `DataSpec`; `training_records`
  loader.py          `prompt_batches`: the grain pipeline of prompt batches, checkpointable
"""
