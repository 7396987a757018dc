"""hbpo-jax: Hierarchical Budget Policy Optimization (arXiv 2507.15844) in JAX/Flax."""
__version__ = "0.1.0"
