"""The launchers' own user errors, each one sentence with exit status 2 and no traceback, and a
--help that lists each program's flags (issue 31, rows 8, 9, 11; the run-time ones are in
tests/e2e/test_workdir_contract.py)."""
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _launch(*args, env=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _one_sentence(done) -> str:
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize("config", [(), ("--config=configs/tiny.py",)])
def test_a_config_key_typo_is_one_sentence_with_the_nearest_key(config):
    line = _one_sentence(_launch("launch/train.py", *config, "--config.optim.learnin_rate=1e-5"))
    assert line == "train.py: --config.optim.learnin_rate: no config key 'optim.learnin_rate'; did you mean " \
                   "optim.learning_rate?"


def test_a_missing_or_broken_config_file_is_named(tmp_path):
    line = _one_sentence(_launch("launch/train.py", "--config=configs/tiny2.py"))
    assert "--config=configs/tiny2.py: no such config file 'configs/tiny2.py'" in line
    bad = tmp_path / "bad.py"
    bad.write_text("def get_config(:\n")
    line = _one_sentence(_launch("launch/eval.py", f"--config={bad}", "--checkpoint=x"))
    assert f"--config={bad}: the config file does not load (line 1): SyntaxError" in line
    # --verbose shows the traceback.
    done = _launch("launch/train.py", "--config=configs/tiny2.py", "--verbose")
    assert done.returncode != 0 and "Traceback" in done.stderr


@pytest.mark.parametrize("program, flags", [
    (("launch/train.py",), ("--workdir", "--allow_spec_change", "--compilation_cache", "--config", "--verbose")),
    (("-m", "hbpo_jax.scripts.train"), ("--workdir", "--allow_spec_change")),
    (("launch/eval.py",), ("--checkpoint", "--out", "--workdir")),
    (("launch/convert.py",), ("--to", "--src", "--dst", "--overwrite")),
    (("-m", "hbpo_jax.scripts.convert"), ("--to", "--overwrite")),
    (("launch/memory.py",), ("--topology", "--slices", "--programs")),
])
def test_help_lists_the_programs_flags_and_the_config_keys(program, flags):
    done = _launch(*program, "--help")
    assert done.returncode == 0, done.stderr[-3000:]
    for flag in flags:
        assert f"  {flag}: " in done.stdout, (flag, done.stdout)
    if "convert" not in program[-1]:
        assert "docs/config_keys.md" in done.stdout


def test_no_tpu_initialization_errors_where_there_is_no_tpu():
    # libtpu (the test extra) is installed here, but this machine has no TPU.
    import glob
    import importlib.util

    from hbpo_jax import host
    if importlib.util.find_spec("libtpu") is None or any(glob.glob(p) for p in host.TPU_DEVICE_FILES):
        pytest.skip("needs libtpu installed on a machine without a TPU")
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    script = "from hbpo_jax import host; host.skip_absent_tpu(); import jax; print(jax.devices()[0].platform)"
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=dict(env, PYTHONPATH=str(ROOT)),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "cpu", done.stderr
    assert "Unable to initialize backend 'tpu'" not in done.stderr and "E0000" not in done.stderr, done.stderr
