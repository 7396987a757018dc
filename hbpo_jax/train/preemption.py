"""The stop after a preemption notice, decided by every process of a run together.

A SIGTERM (a TPU VM's maintenance notice) reaches some hosts, maybe only one. A host that stopped
alone would enter the checkpoint's collectives while the others start the next rollout's, and the
run would abort or hang. The stop is decided collectively at the end of every step, so every host
checkpoints the same step and exits. With one process it is a plain local flag.

Ctrl-C (SIGINT) is the same stop request: the step in flight finishes, every host checkpoints it
and the run exits 0. A second Ctrl-C aborts at once (KeyboardInterrupt: the launchers exit 130
without a checkpoint of the step in flight).
"""
from __future__ import annotations

import logging
import os
import signal

import jax
import numpy as np

log = logging.getLogger(__name__)

def _preemption_service():
    """JAX's preemption sync manager when jax.distributed runs with it (the default on every
    platform since it is a coordination-service feature), else None."""
    from jax._src import distributed  # its state has no public accessor
    if distributed.global_state.client is None:
        return None
    return distributed.global_state.preemption_sync_manager


def any_process(flag: bool) -> bool:
    """True on every process when `flag` is True on any (an allgather of one bool per host)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils
    return bool(np.asarray(multihost_utils.process_allgather(np.array([flag], np.int32))).any())


class StopSignal:
    """Context manager; `should_stop(step)` after each step says, identically on every process,
    whether to checkpoint that step and exit.

    Under jax.distributed with JAX's preemption service (the default), JAX's own SIGTERM handler
    stays in place and `multihost_utils.reached_preemption_sync_point(step)` decides: every host
    agrees on the first step after the notice. Otherwise (one process, or the service off) a
    SIGTERM handler sets a local flag, combined across processes by `any_process` each step.
    SIGINT goes the same way: with JAX's service, the handler sends this process a SIGTERM, which
    JAX's handler reports to the service; otherwise it sets the local flag.
    """

    def __init__(self):
        self.local = False  # this process saw SIGTERM (own-handler mode)
        self._previous = None
        self._installed = False
        self._service = None
        self._interrupts = 0
        self._previous_int = None

    def __enter__(self):
        self._service = _preemption_service()
        try:
            self._previous_int = signal.signal(signal.SIGINT, self._handle_interrupt)
            if self._service is None:  # with it, JAX's handler notifies the coordination service
                self._previous = signal.signal(signal.SIGTERM, self._handle)
            self._installed = True
        except ValueError:  # not the main thread: leave signals alone
            pass
        return self

    def _handle(self, signum, frame):
        log.warning("SIGTERM received: checkpointing and stopping after this step.")
        self.local = True

    def _handle_interrupt(self, signum, frame):
        self._interrupts += 1
        if self._interrupts > 1:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt("a second Ctrl-C: aborted without a checkpoint of the step in flight")
        log.warning("Ctrl-C: checkpointing and stopping after this step (Ctrl-C again to abort at once).")
        if self._service is not None:
            os.kill(os.getpid(), signal.SIGTERM)  # JAX's handler tells every host
        else:
            self.local = True

    def should_stop(self, step: int) -> bool:
        """Collective when there are several processes: every process must call it every step,
        with the same step numbers."""
        if self._service is not None:
            from jax.experimental import multihost_utils
            stop = multihost_utils.reached_preemption_sync_point(step)
            if stop:
                log.warning("preemption notice: every host checkpoints step %d and stops.", step)
            return stop
        return any_process(self.local)

    def __exit__(self, *exc):
        if self._installed:
            signal.signal(signal.SIGINT, self._previous_int)
            if self._previous is not None:
                signal.signal(signal.SIGTERM, self._previous)


__all__ = ["StopSignal", "any_process"]
