"""What every launch script shares: the --config flag, logging, and configuration errors
reported as their one sentence (no traceback), exit status 2.

    from hbpo_jax import cli
    cli.define_config("configs/tiny.py", "Training config file (get_config).")
    ...
    if __name__ == "__main__":
        cli.run(main)
"""
from __future__ import annotations

import os
import sys
from typing import Callable

from absl import app, flags, logging

from hbpo_jax.errors import ConfigError

# Config files (configs/*.py) are looked up, when the given path does not exist from the working
# directory, in the checkout this package runs from (an editable install) and then in the copy a
# wheel ships as package data (hbpo_jax/configs/, setup.py), so "configs/tiny.py" works from any
# directory and after `pip install .` too.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGED_CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def find_config(path: str) -> str:
    """`path` itself when it exists, else the same path under the repository root, else the file
    of that name in the checkout's configs/ or among the packaged configs ("file:arg" kept);
    `path` unchanged when none exists."""
    file, sep, arg = path.partition(":")
    if os.path.exists(file) or os.path.isabs(file):
        return path
    name = os.path.basename(file)
    for candidate in (os.path.join(REPO_ROOT, file), os.path.join(REPO_ROOT, "configs", name),
                      os.path.join(PACKAGED_CONFIGS, name)):
        if os.path.isfile(candidate):
            return candidate + sep + arg
    return path


def define_config(default: str, help_text: str) -> None:
    """--config (an ml_collections config file with `get_config(arg)`, `file.py:arg` for an arg)."""
    from ml_collections import config_flags  # here: the bench scripts use cli without configs
    config_flags.DEFINE_config_file("config", find_config(default), help_text)


# JAX's persistent compilation cache (see use_compilation_cache).
CACHE_FOLDER = "jax_cache"
DEFAULT_MIN_COMPILE_SECS = 1.0  # JAX's own default: quicker programs are not worth a file


def define_compilation_cache(default_text: str) -> None:
    """--compilation_cache: a folder for JAX's persistent compilation cache ("" = the launcher's
    default, `default_text`; "off" = none)."""
    flags.DEFINE_string("compilation_cache", "", "JAX's persistent compilation cache: compiled programs "
                        f"are kept here and a rerun loads them instead of compiling (default: {default_text}; "
                        "'off': none). JAX_COMPILATION_CACHE_DIR, when set, wins.")


def use_compilation_cache(directory: str | None, *, keep_all: bool = False) -> str | None:
    """Points JAX's persistent compilation cache at `directory` (local or gs://), so a resumed or
    repeated run loads its compiled programs (minutes each for a large model on a TPU) instead of
    compiling them again. A cache the user has already chosen wins: JAX_COMPILATION_CACHE_DIR, or
    jax_compilation_cache_dir set before this call (e.g. by tests/conftest.py). Programs that
    compile in under DEFAULT_MIN_COMPILE_SECS are not stored, unless
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS says otherwise, or `keep_all` (runs that compile the
    same small programs again and again, like an ablation's variants). Call it before the first
    compile (JAX reads the setting once). directory None, "" or "off": nothing is set.
    Returns the cache folder in use, or None."""
    import jax
    chosen = jax.config.jax_compilation_cache_dir
    if chosen:
        return chosen
    if not directory or directory == "off":
        return None
    if keep_all:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    elif "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", DEFAULT_MIN_COMPILE_SECS)
    jax.config.update("jax_compilation_cache_dir", directory)
    logging.info("JAX compilation cache: %s", directory)
    return directory


def run(main: Callable[[list], None]) -> None:
    """absl's app.run with INFO logging (Orbax's INFO lines excepted: checkpoint.quiet_orbax_logs);
    a ConfigError, a DataError (a malformed dataset) or a missing file ends the program with its
    message on one line and exit status 2."""
    from hbpo_jax.errors import DataError

    def wrapped(argv):
        logging.set_verbosity(logging.INFO)
        from hbpo_jax.checkpoint import quiet_orbax_logs  # here: imports jax and orbax
        quiet_orbax_logs()
        try:
            main(argv)
        except (ConfigError, DataError, FileNotFoundError) as e:
            print(f"{os.path.basename(sys.argv[0])}: {type(e).__name__}: {e}", file=sys.stderr)
            sys.exit(2)
    _resolve_config_argument()
    app.run(wrapped)


def _resolve_config_argument() -> None:
    """Rewrites --config=PATH in sys.argv to find_config(PATH), so configs resolve from anywhere."""
    for i, a in enumerate(sys.argv):
        if a.startswith("--config="):
            sys.argv[i] = "--config=" + find_config(a[len("--config="):])
        elif a == "--config" and i + 1 < len(sys.argv):
            sys.argv[i + 1] = find_config(sys.argv[i + 1])


__all__ = ["CACHE_FOLDER", "PACKAGED_CONFIGS", "REPO_ROOT", "define_compilation_cache", "define_config", "find_config",
           "flags", "run", "use_compilation_cache"]
