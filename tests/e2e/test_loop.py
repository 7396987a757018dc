"""The training loop end to end on a shortened tiny config: finite losses, checkpoints that
restore, SIGTERM and SIGKILL recovery, exact resumption, and bounded skipping of bad steps."""
import json
import pathlib
import signal
import subprocess
import time

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def uninterrupted(tiny_run, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("straight")
    tiny_run.run(workdir, 4)
    return workdir


@pytest.mark.slow
def test_smoke_run_has_finite_losses_and_restorable_checkpoints(tiny_run, uninterrupted):
    rows = tiny_run.metrics(uninterrupted)
    assert sorted(rows) == [1, 2, 3, 4]
    for row in rows.values():
        for key in ("loss", "grad_norm", "reward", "entropy", "response_len"):
            assert np.isfinite(row[key]), (key, row)
        assert row["skipped"] == 0.0
    steps = sorted(int(p.name) for p in (uninterrupted / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[-1] == 4 and len(steps) <= 3
    # Per-budget metrics are there, and the event files exist.
    assert "response_len/budget_16" in rows[1] and "accuracy/budget_32" in rows[1]
    assert list((uninterrupted / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_sigkill_then_rerun_resumes_and_matches_an_uninterrupted_run(tiny_run, uninterrupted, tmp_path):
    proc = subprocess.Popen(tiny_run.command(tmp_path, 4), cwd=ROOT, env=tiny_run.env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 500
    while time.time() < deadline and proc.poll() is None:
        logged = metrics.exists() and sum("loss" in line for line in metrics.read_text().splitlines()) >= 2
        # Kill only once a checkpoint has been committed (saves are asynchronous).
        if logged and any(p.parent.name.isdigit() for p in tmp_path.glob("checkpoints/*/commit_success.txt")):
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 4 not in tiny_run.metrics(tmp_path)
    done = tiny_run.run(tmp_path, 4)
    assert "resumed from step" in done.stderr
    want, got = tiny_run.metrics(uninterrupted), tiny_run.metrics(tmp_path)
    assert sorted(got) == [1, 2, 3, 4]
    for step in (3, 4):
        for key, value in want[step].items():
            np.testing.assert_allclose(got[step][key], value, rtol=1e-5, atol=1e-6, err_msg=f"{key} at step {step}")


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits_cleanly(tiny_run, tmp_path):
    proc = subprocess.Popen(tiny_run.command(tmp_path, 50, "--config.train.checkpoint_every=100"), cwd=ROOT,
                            env=tiny_run.env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 500
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and any("loss" in line for line in metrics.read_text().splitlines()):
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    last = max(tiny_run.metrics(tmp_path))
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [last] and last < 50  # checkpoint_every=100: only the SIGTERM one


def test_a_cached_warm_start_built_from_other_settings_is_refused(tmp_path):
    import importlib.util

    from hbpo_jax import spec as spec_lib
    from hbpo_jax.tasks import warmstart

    spec = importlib.util.spec_from_file_location("tiny", ROOT / "configs" / "tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    model_cfg = spec_lib.resolve_model(config).config()

    def wanted():  # what the warm start of `config` is built from
        return warmstart.settings(spec_lib.resolve_task(config, tuple(config.rollout.budgets)), config.seed, model_cfg)

    (tmp_path / warmstart.SETTINGS_FILE).write_text(
        json.dumps(wanted()))
    warmstart.check_settings(str(tmp_path), wanted())
    config.task.sft_budget_scales = (0.2, 0.6, 0.8, 1.0)
    config.seed = 7
    with pytest.raises(ValueError, match=r"seed: cached 0, config 7; task.sft_budget_scales: cached \[\], "
                                         r"config \[0.2, 0.6, 0.8, 1.0\]\). Use a new --workdir"):
        warmstart.check_settings(str(tmp_path), wanted())
    # RL settings are not the warm start's: a run may change them and keep its cache.
    config.task.sft_budget_scales, config.seed = (), 0
    config.optim.learning_rate, config.train.steps = 1e-5, 99
    warmstart.check_settings(str(tmp_path), wanted())
    # A cache from before a setting existed was built at its default (False; tiny sets True).
    config.task.tokenizer_whole_budgets = False
    older = wanted()
    del older["task.tokenizer_whole_budgets"]
    (tmp_path / warmstart.SETTINGS_FILE).write_text(json.dumps(older))
    warmstart.check_settings(str(tmp_path), wanted())
    config.task.tokenizer_whole_budgets = True
    with pytest.raises(ValueError, match=r"task.tokenizer_whole_budgets: cached False, config True"):
        warmstart.check_settings(str(tmp_path), wanted())


@pytest.mark.slow
def test_packed_rows_train_with_one_update_program(tiny_run, tmp_path):
    # Rows packed by tokens: every mini-batch of every step has the same [U, k, S] shapes (empty and
    # half-lane micro-batches are branches of the one program), so the compile log holds one
    # compilation of the update for the run, whatever the rows' lengths.
    done = subprocess.run(tiny_run.command(tmp_path, 3, "--config.train.pack_rows=True"), cwd=ROOT,
                          env=tiny_run.env(JAX_LOG_COMPILES="1"), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    compiles = [line for line in done.stderr.splitlines() if "Compiling jit(update)" in line]
    assert len(compiles) == 1, compiles
    rows = tiny_run.metrics(tmp_path)
    assert sorted(rows) == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) and 0.0 <= r["update_padded_fraction"] < 1.0 for r in rows.values())
