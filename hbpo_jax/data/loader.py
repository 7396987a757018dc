"""Prompt batches for training (hbpo_jax.train.minibatches lays out update batches): a grain
`MapDataset` over global steps, prefetched in one background thread, with a checkpointable
iterator (`PromptBatchIterator`) whose state resumes a run at the batch it stopped at, under
any process count.
"""

from __future__ import annotations

import collections
import hashlib
import sys
import threading
from typing import Any, Mapping, Sequence

import grain
import numpy as np

from hbpo_jax.errors import DataError

__all__ = ["prompt_batches", "PromptBatchIterator"]

_STATE_VERSION = 1


def _fingerprint(records: Sequence[Mapping]) -> str:
    h = hashlib.sha256()
    for r in records:
        h.update(str(r.get("problem", "")).encode("utf-8", "replace") + b"\0")
        h.update(str(r.get("answer", "")).encode("utf-8", "replace") + b"\1")
    return h.hexdigest()[:16]


class _HostBatches(grain.MapDataset):
    """Element `step` = this process's slice of global batch `step`.

    Global batch `step` holds positions [step * B, (step + 1) * B) of the endless stream
    epoch 0, epoch 1, ...; epoch e is permutation(e) of the records. Batches straddle epoch
    boundaries, so no record is dropped between epochs.
    """

    def __init__(self, source: grain.MapDataset, *, global_batch: int, lo: int, hi: int,
                 seed: int, shuffle: bool, num_steps: int):
        super().__init__(source)
        self._n = len(source)
        self._global_batch, self._lo, self._hi = global_batch, lo, hi
        self._seed, self._shuffle, self._num_steps = seed, shuffle, num_steps
        self._perms: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._num_steps

    def __str__(self) -> str:
        return (f"_HostBatches(global_batch={self._global_batch}, slice=[{self._lo}:{self._hi}], "
                f"seed={self._seed}, shuffle={self._shuffle})")

    def _perm(self, epoch: int) -> np.ndarray | None:
        if not self._shuffle:
            return None
        with self._lock:
            perm = self._perms.get(epoch)
            if perm is None:
                perm = np.random.default_rng([self._seed, epoch]).permutation(self._n)
                self._perms[epoch] = perm
                while len(self._perms) > 2:
                    self._perms.popitem(last=False)
            return perm

    def __getitem__(self, step):
        if isinstance(step, slice):
            return self.slice(step)
        if not 0 <= step < self._num_steps:
            raise IndexError(f"step {step} out of range [0, {self._num_steps}).")
        batch = []
        base = step * self._global_batch
        for g in range(base + self._lo, base + self._hi):
            epoch, pos = divmod(g, self._n)
            perm = self._perm(epoch)
            idx = pos if perm is None else int(perm[pos])
            batch.append(dict(self._parent[idx]))
        return batch


class PromptBatchIterator(grain.DatasetIterator):
    """Iterator over host-local prompt batches (lists of record dicts).

    `get_state()` is a JSON-serialisable dict: the number of global steps taken, grain's own
    iterator state, and the pipeline settings it belongs to. `set_state` refuses a state from a
    pipeline with different records / seed / global batch size / shuffle / epochs, but accepts
    one saved under another process count: the global batch order does not depend on it.
    Orbax can save it with `grain.checkpoint.CheckpointHandler` (one file per process).
    """

    def __init__(self, parent: grain.DatasetIterator, settings: dict):
        super().__init__(parent)
        self._settings = settings
        self._step = 0

    def __next__(self) -> list[dict]:
        batch = next(self._parent)
        self._step += 1
        return batch

    @property
    def step(self) -> int:
        """Global batches taken so far (the next batch is global batch `step`)."""
        return self._step

    def get_state(self) -> dict[str, Any]:
        return {"version": _STATE_VERSION, "step": self._step, **self._settings,
                "grain": self._parent.get_state()}

    def set_state(self, state: Mapping[str, Any]) -> None:
        if not isinstance(state, Mapping) or state.get("version") != _STATE_VERSION:
            raise DataError("Prompt iterator state is not a version "
                            f"{_STATE_VERSION} prompt_batches state: {state!r:.200}.")
        diff = {k: (state.get(k), v) for k, v in self._settings.items() if state.get(k) != v}
        if diff:
            raise DataError("Prompt iterator state belongs to another pipeline (saved vs now): "
                            + ", ".join(f"{k}: {a!r} vs {b!r}" for k, (a, b) in diff.items())
                            + ".")
        self._parent.set_state(dict(state["grain"]))
        self._step = int(state["step"])


def prompt_batches(records: Sequence[Mapping], *, batch_size: int, seed: int,
                   shuffle: bool = True, num_epochs: int | None = None,
                   process_index: int | None = None, process_count: int | None = None,
                   prefetch: int = 2) -> PromptBatchIterator:
    """A grain pipeline of host-local prompt batches.

    Args:
      records: the records (`load_records` output, or any sequence of dicts; a
        `datasets.Dataset` works too).
      batch_size: the GLOBAL batch size (prompts per training step over all processes); it must
        be divisible by `process_count`. Each process gets a contiguous slice of
        ``batch_size // process_count`` prompts: process p gets rows [p * b, (p + 1) * b) of
        every global batch, so the processes' batches are disjoint and together form the global
        batch, in order (ready for `jax.make_array_from_process_local_data`).
      seed: shuffle seed (non-negative int). Epoch e is the numpy PCG64 permutation seeded
        with (seed, e): reproducible, and reshuffled every epoch.
      shuffle: False keeps source order in every epoch.
      num_epochs: None for an endless stream; else the stream ends after
        ``num_epochs * len(records) // batch_size`` global batches (the partial last batch is
        dropped so every process yields the same number of batches). Batches straddle epoch
        boundaries.
      process_index / process_count: this process and how many there are;
        `jax.process_index()` / `jax.process_count()` when None.
      prefetch: batches prepared ahead in one background thread (0: synchronous).

    Returns:
      A `PromptBatchIterator`; each element is a list of ``batch_size // process_count``
      record dicts (fresh shallow copies).
    """
    if process_index is None or process_count is None:
        import jax
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    for name, v, lo in (("batch_size", batch_size, 1), ("seed", seed, 0),
                        ("process_count", process_count, 1), ("prefetch", prefetch, 0),
                        ("process_index", process_index, 0)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
            raise DataError(f"{name} must be an int >= {lo}, got {v!r}.")
    if process_index >= process_count:
        raise DataError(f"process_index {process_index} must be < process_count {process_count}.")
    if batch_size % process_count:
        raise DataError(f"batch_size {batch_size} (global) is not divisible by process_count "
                        f"{process_count}.")
    if num_epochs is not None and (isinstance(num_epochs, bool) or not isinstance(num_epochs, int)
                                   or num_epochs < 1):
        raise DataError(f"num_epochs must be a positive int or None, got {num_epochs!r}.")
    n = len(records)
    if n == 0:
        raise DataError("prompt_batches got no records.")
    if num_epochs is None:
        num_steps = sys.maxsize // batch_size - 1
    else:
        num_steps = num_epochs * n // batch_size
        if num_steps == 0:
            raise DataError(f"batch_size {batch_size} exceeds the {num_epochs * n} prompts of "
                            f"{num_epochs} epoch(s); no full batch.")
    local = batch_size // process_count
    ds = _HostBatches(grain.MapDataset.source(records), global_batch=batch_size,
                      lo=process_index * local, hi=(process_index + 1) * local,
                      seed=int(seed), shuffle=bool(shuffle), num_steps=num_steps)
    read = grain.ReadOptions(num_threads=1 if prefetch else 0, prefetch_buffer_size=prefetch)
    settings = {"num_records": n, "fingerprint": _fingerprint(records), "seed": int(seed),
                "batch_size": int(batch_size), "shuffle": bool(shuffle), "num_epochs": num_epochs}
    return PromptBatchIterator(iter(ds.to_iter_dataset(read)), settings)
