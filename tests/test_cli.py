"""The launchers' persistent compilation cache (cli.use_compilation_cache)."""
import json
import os
import subprocess
import sys

import jax

from hbpo_jax import cli
from tests.conftest import ROOT, xla_flags

_SCRIPT = """
import json, os, sys
import jax
from hbpo_jax import cli
off = cli.use_compilation_cache("off")
folder = cli.use_compilation_cache(sys.argv[1])
jax.jit(lambda x: x * 2 + 1)(1.0).block_until_ready()
print(json.dumps({"off": off, "folder": folder, "files": os.listdir(sys.argv[1]) if os.path.isdir(sys.argv[1]) else [],
                  "min_secs": jax.config.jax_persistent_cache_min_compile_time_secs}))
"""


def _run(folder, **env):
    base = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT"))}
    out = subprocess.run([sys.executable, "-c", _SCRIPT, str(folder)], capture_output=True, text=True, check=True,
                         cwd=ROOT, env=base | {"XLA_FLAGS": xla_flags(), "PYTHONPATH": str(ROOT)} | env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_launch_fills_its_compilation_cache(tmp_path):
    """A process with no cache of its own set: the folder given is used and fills with the program
    it compiles; the min-compile-time setting from the environment is kept."""
    got = _run(tmp_path / "jax_cache", JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    assert got["off"] is None and got["folder"] == str(tmp_path / "jax_cache")
    assert any(f.endswith("-cache") for f in got["files"]), f"no program in the compilation cache: {got['files']}"
    assert got["min_secs"] == 0.0


def test_without_a_min_time_setting_quick_programs_are_not_stored(tmp_path):
    got = _run(tmp_path / "jax_cache")
    assert got["min_secs"] == cli.DEFAULT_MIN_COMPILE_SECS
    assert not any(f.endswith("-cache") for f in got["files"])


def test_a_cache_the_user_chose_wins(tmp_path):
    """The test session's cache (JAX_COMPILATION_CACHE_DIR, tests/conftest.py) stays in use."""
    chosen = jax.config.jax_compilation_cache_dir
    assert chosen, "tests/conftest.py sets a session cache"
    assert cli.use_compilation_cache(str(tmp_path / "mine")) == chosen
    assert jax.config.jax_compilation_cache_dir == chosen and not (tmp_path / "mine").exists()
