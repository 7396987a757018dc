"""Synthetic tasks for tests, demos and the tiny end-to-end run."""
from hbpo_jax.tasks import arithmetic

__all__ = ["arithmetic"]
