"""The workdir's lock and contract (hbpo_jax.workdir), and a checkpoint of another model being
refused rather than set aside as damaged (hbpo_jax.checkpoint)."""
import json
import logging
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from hbpo_jax import checkpoint, workdir
from hbpo_jax.errors import WorkdirError


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_second_lock_is_refused_naming_pid_host_and_start(tmp_path):
    (tmp_path / workdir.LOCK_FILE).write_text(json.dumps({"host": "other-host", "pid": 4242, "started": "noon"}))
    with pytest.raises(WorkdirError, match=rf"{tmp_path} is in use by pid 4242 on host other-host since noon"):
        workdir.Lock(str(tmp_path)).acquire()
    # A live process on this host holds it just as well.
    (tmp_path / workdir.LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": 1, "started": "x"}))
    with pytest.raises(WorkdirError, match="in use by pid 1"):
        workdir.Lock(str(tmp_path)).acquire()


def test_a_lock_is_released_and_a_stale_one_taken_over(tmp_path, caplog):
    with workdir.Lock(str(tmp_path / "new")) as lock:
        held = json.loads((tmp_path / "new" / workdir.LOCK_FILE).read_text())
        assert held["pid"] == os.getpid() and held["host"] == socket.gethostname() and held["started"]
    assert not (tmp_path / "new" / workdir.LOCK_FILE).exists() and not lock.held
    (tmp_path / workdir.LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": _dead_pid(),
                                                          "started": "then"}))
    caplog.set_level(logging.WARNING)
    with workdir.Lock(str(tmp_path)):
        assert json.loads((tmp_path / workdir.LOCK_FILE).read_text())["pid"] == os.getpid()
    assert "stale" in caplog.text


def test_an_unwritable_workdir_is_one_sentence(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(WorkdirError, match="cannot write .*file"):
        workdir.Lock(str(tmp_path / "file" / "run")).acquire()


def _spec(**train):
    return {"objective": {"name": "hbpo", "settings": {"beta": 4.0}}, "optim": {"learning_rate": 1e-6},
            "train": {"steps": 10, "prompts_per_step": 4, **train}, "eval": {"every": 0},
            "model": {"path": "/m", "overrides": {}}}


def test_contract_changes_are_refused_free_ones_accepted_and_recorded(tmp_path):
    _, history = workdir.check_resume(str(tmp_path), _spec())
    workdir.write_spec(str(tmp_path), _spec(), history)
    # No checkpoints yet: any change is accepted (nothing to protect) and recorded.
    (tmp_path / "checkpoints" / "5").mkdir(parents=True)
    new = _spec(prompts_per_step=8, steps=20)
    new["objective"]["name"] = "grpo"
    new["model"]["path"] = "/other"
    with pytest.raises(WorkdirError) as e:
        workdir.check_resume(str(tmp_path), new)
    message = str(e.value)
    assert "up to step 5" in message and "train.steps" not in message
    for key in ("objective.name", "train.prompts_per_step", "model.path"):
        assert key in message
    assert "--allow_spec_change=model.path,objective.name,train.prompts_per_step" in message
    allow = ("objective", "model.path", "train.prompts_per_step")
    diff, history = workdir.check_resume(str(tmp_path), new, allow=allow)
    assert diff["train.steps"] == [10, 20] and history[-1]["from_step"] == 5 and history[0]["event"] == "start"
    free = _spec(steps=30)
    free["optim"]["learning_rate"], free["eval"]["every"] = 2e-6, 5
    diff, _ = workdir.check_resume(str(tmp_path), free)
    assert set(diff) == {"train.steps", "optim.learning_rate", "eval.every"}
    # A setting the recorded spec does not know (added to the package since) is not a change.
    newer = _spec()
    newer["mesh"] = {"shape": [1]}
    newer["objective"]["settings"]["l_max"] = 4096
    assert workdir.check_resume(str(tmp_path), newer)[0] == {}
    assert not workdir.is_free("objective.name") and workdir.is_free("eval.modes") and workdir.is_free("mesh.shape")


def test_a_checkpoint_of_other_shapes_is_refused_not_set_aside(tmp_path):
    # Row 1: resuming with another model used to rename the good checkpoint damaged-<step>.
    ckpt = checkpoint.TrainCheckpointer(str(tmp_path), async_save=False)
    state = {"w": jnp.zeros((3, 4)), "b": jnp.ones(2)}
    ckpt.save(1, state, {"step": 1})
    ckpt.close()
    before = sorted(p.name for p in tmp_path.iterdir())
    for other in ({"w": jnp.zeros((2, 4)), "b": jnp.ones(2)}, {"w": jnp.zeros((3, 4))}):
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), other)
        ckpt = checkpoint.TrainCheckpointer(str(tmp_path), async_save=False)
        with pytest.raises(WorkdirError, match=r"holds a state of other shapes than this run's model"):
            ckpt.restore_latest(abstract)
        ckpt.close()
        assert sorted(p.name for p in tmp_path.iterdir()) == before
