"""Ctrl-C as a stop request (hbpo_jax.train.preemption.StopSignal): checkpoint after the step, a
second Ctrl-C aborts; with JAX's preemption service it goes through the same SIGTERM every host
agrees on. (End to end: tests/e2e/test_workdir_contract.py; SIGTERM on one host of two: test_multiprocess.py.)"""
import signal

import pytest

from hbpo_jax.train import preemption


def test_ctrl_c_stops_after_the_step_and_a_second_one_aborts():
    before = signal.getsignal(signal.SIGINT)
    with preemption.StopSignal() as stop:
        assert not stop.should_stop(1)
        signal.raise_signal(signal.SIGINT)
        assert stop.should_stop(2)
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) == before


def test_with_the_preemption_service_ctrl_c_becomes_the_sigterm_jax_reports(monkeypatch):
    got = []
    previous = signal.signal(signal.SIGTERM, lambda *_: got.append("SIGTERM"))  # stands in for JAX's
    try:
        monkeypatch.setattr(preemption, "_preemption_service", lambda: object())
        with preemption.StopSignal() as stop:
            signal.raise_signal(signal.SIGINT)
            assert got == ["SIGTERM"] and not stop.local  # the service decides, collectively
    finally:
        signal.signal(signal.SIGTERM, previous)
