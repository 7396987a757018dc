"""Plans: the programs of a config compiled for any mesh (a TPU topology included, on a CPU)
and read for memory, flops, bytes and collectives; nothing runs.

  programs.py  `lower_train_step`, `lower_logprobs`, `lower_sampler`, `lower_engine`,
               `memory_table`, `topology_mesh`
  tpu.py       the TPU plan of a config: per chip memory, roofline times, a run's projection
  hlo.py       reading optimised HLO: computations, loops, trip counts, collectives
  hlo_cost.py  flops and HBM traffic by walking the HLO, Pallas kernels included
"""
