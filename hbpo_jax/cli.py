"""What every launch script shares: the --config flag, logging, --help, and every user error
(a config key or file, a config value, a dataset, the workdir: in use, changed, read-only or full)
reported as one sentence (no traceback; --verbose or HBPO_VERBOSE=1 shows it), exit status 2.
Ctrl-C outside the training loop's stop handling exits 130 with one line.

    from hbpo_jax import cli
    cli.define_config("configs/tiny.py", "Training config file (get_config).")
    ...
    if __name__ == "__main__":
        cli.run(main)
"""
from __future__ import annotations

import difflib
import errno
import importlib.util
import os
import sys
from typing import Callable

from absl import app, flags, logging

from hbpo_jax.errors import ConfigError, DataError, WorkdirError

flags.DEFINE_bool("verbose", False, "Show the traceback of a user error (a bad config key or value, a busy "
                  "or full workdir) instead of its one sentence (also: HBPO_VERBOSE=1).")

CONFIG_KEYS_DOC = "docs/config_keys.md"
USER_ERRORS = (ConfigError, DataError, WorkdirError, FileNotFoundError, NotADirectoryError)
# OSErrors of the user's paths (a read-only or full workdir, a folder without permission).
_USER_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)

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
    try:
        config_flags.DEFINE_config_file("config", find_config(default), help_text)
    except Exception as e:  # the default config with a bad --config.<key> of the command line
        if _verbose():
            raise
        _config_error(e, sys.argv, default)


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


def _verbose() -> bool:
    return os.environ.get("HBPO_VERBOSE", "") not in ("", "0") or any(
        a in ("--verbose", "--verbose=true", "--verbose=True", "--verbose=1") for a in sys.argv[1:])


def _program() -> str:
    return os.path.basename(sys.argv[0])


def fail(message: str, status: int = 2, *, at_once: bool = False) -> None:
    """Prints `message` as the program's one line on stderr and exits with `status`.

    at_once: exit without the interpreter's shutdown (os._exit, after flushing), where background
    threads may still run (an Orbax save cut short by a full disk or a second Ctrl-C would print
    their tracebacks while Python shuts down); a one-process program only, as a jax.distributed
    one must leave through its shutdown barrier."""
    print(f"{_program()}: {message}", file=sys.stderr, flush=True)
    if at_once and not _distributed():
        sys.stdout.flush()
        os._exit(status)
    sys.exit(status)


def _without_closed_event_loops(hook):
    """sys.unraisablehook, less tensorstore's reports of a callback into the closed event loop of
    an Orbax operation that already failed (a full disk: its error is reported once, by the loop)."""
    def unraisablehook(unraisable):
        value = unraisable.exc_value
        if not (isinstance(value, RuntimeError) and str(value) == "Event loop is closed") or _verbose():
            hook(unraisable)
    return unraisablehook


def _distributed() -> bool:
    if "jax" not in sys.modules:
        return False
    from jax._src import distributed  # its state has no public accessor
    return distributed.global_state.client is not None


def run(main: Callable[[list], None], *, doc: str | None = None, tpu_probe: bool = False) -> None:
    """absl's app.run with INFO logging (Orbax's INFO lines excepted: checkpoint.quiet_orbax_logs),
    --help listing the program's own flags (`doc`: its usage text; default: main's module
    docstring), and every user error on one line with exit status 2 (USER_ERRORS, OSErrors of
    the user's paths); a Ctrl-C that reaches here exits 130 with one line.

    tpu_probe: let JAX look for a TPU even where this machine has no TPU device files (see
    host.skip_absent_tpu); the launchers that compile for TPU topologies without one set it."""
    module = sys.modules.get(main.__module__)
    doc = doc if doc is not None else (module.__doc__ if module else "") or ""

    def wrapped(argv):
        logging.set_verbosity(logging.INFO)
        from hbpo_jax.checkpoint import quiet_orbax_logs  # here: imports jax and orbax
        quiet_orbax_logs()
        try:
            main(argv)
        except USER_ERRORS as e:
            if _verbose():
                raise
            fail(f"{type(e).__name__}: {e}", at_once=isinstance(e, WorkdirError))
        except OSError as e:
            if _verbose() or e.errno not in _USER_ERRNOS:
                raise
            from hbpo_jax.workdir import os_error
            fail(f"{type(e).__name__}: {os_error(e, e.filename or '')}", at_once=True)
        except KeyboardInterrupt as e:
            if _verbose():
                raise
            fail(f"interrupted{': ' + str(e) if str(e) else ''}.", status=130, at_once=True)
    _resolve_config_argument()
    sys.unraisablehook = _without_closed_event_loops(sys.unraisablehook)
    if not tpu_probe:
        from hbpo_jax import host
        host.skip_absent_tpu()
    if any(a in ("--help", "-h", "-?", "--helpshort") for a in sys.argv[1:]):
        print(help_text(main.__module__, doc))
        sys.exit(0)
    app.run(wrapped, flags_parser=_parse_flags)


# Flags every launcher has that are absl's own; --help lists the program's flags and these names.
_ABSL_FLAGS = ("verbosity", "logtostderr", "alsologtostderr", "log_dir")


def help_text(module_name: str, doc: str) -> str:
    """The program's usage (its docstring), its own flags with their help, and where the config
    keys are documented."""
    fv = flags.FLAGS
    # absl files a __main__ module's flags under sys.argv[0] (python -m, or a launcher run as a file).
    names = [module_name] + ([sys.argv[0]] if module_name == "__main__" else [])
    own = [f for name in names if name in fv.flags_by_module_dict() for f in fv.get_flags_for_module(name)]
    shared = [f for f in fv.get_flags_for_module(__name__)] if __name__ in fv.flags_by_module_dict() else []
    names = {f.name for f in own}
    lines = [doc.strip(), "", "flags:"]
    for flag in sorted(own + [f for f in shared if f.name not in names], key=lambda f: f.name):
        default = "" if flag.default in (None, "") else f" (default: {flag.default_as_str})"
        lines.append(f"  --{flag.name}: {' '.join(flag.help.split())}{default}")
    if "config" in fv:
        lines += ["", "  --config.<key>=<value> overrides any key of the config file, e.g. "
                  "--config.train.steps=100 --config.rollout.budgets='(512,1024)'; the main keys and their "
                  f"TRL / verl names: {CONFIG_KEYS_DOC}."]
    lines += ["", f"absl's own flags (--{', --'.join(_ABSL_FLAGS)}, ...): --helpfull."]
    return "\n".join(lines)


def _config_path(argv) -> str | None:
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            return a[len("--config="):]
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    flag = flags.FLAGS["config"] if "config" in flags.FLAGS else None
    return getattr(flag, "config_filename", None) or getattr(flag, "default_as_str", "").strip("'\"") or None


def load_config_file(path: str):
    """`get_config(arg)` of config file `path` ("file.py:arg"); ConfigError naming the file when it
    is missing or does not load."""
    file, _, arg = path.partition(":")
    if not os.path.isfile(file):
        raise ConfigError(f"--config={path}: no such config file {file!r} (looked from {os.getcwd()}, "
                          f"{REPO_ROOT}/configs and the packaged configs).")
    try:
        spec = importlib.util.spec_from_file_location("_hbpo_config_file", file)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.get_config(arg) if arg else module.get_config()
    except Exception as e:  # the user's file: any error is its own
        where = f" (line {e.lineno})" if isinstance(e, SyntaxError) else ""
        raise ConfigError(f"--config={path}: the config file does not load{where}: "
                          f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e


def config_keys(config, prefix: str = "") -> list[str]:
    """Every dotted key of a ConfigDict, sections included."""
    keys = []
    for k in config.keys():
        v = config[k]
        keys.append(prefix + k)
        if hasattr(v, "keys") and hasattr(v, "to_dict"):
            keys += config_keys(v, prefix + k + ".")
    return keys


def unknown_key_message(config, argv) -> str | None:
    """One sentence for the first --config.<key> override that names no key of `config`, with
    the nearest keys; None when every override names a key."""
    keys = config_keys(config)
    for a in argv[1:]:
        if not a.startswith("--config."):
            continue
        key = a[len("--config."):].split("=", 1)[0]
        if key in keys:
            continue
        near = difflib.get_close_matches(key, keys, n=2, cutoff=0.75)
        hint = f"; did you mean {' or '.join(near)}?" if near else f"; the keys are listed in {CONFIG_KEYS_DOC}."
        return f"--config.{key}: no config key {key!r}{hint}"
    return None


def _parse_flags(argv):
    """absl's flag parsing, with a config file or key error as one sentence (exit 2)."""
    if "config" in flags.FLAGS and not _verbose():
        path = _config_path(argv)
        if path:  # config_flags reports a missing or broken file only when the config is first read
            try:
                load_config_file(find_config(path))
            except ConfigError as err:
                fail(str(err))
    try:
        return flags.FLAGS(argv)
    except Exception as e:  # absl wraps nothing: config_flags raises the loader's own errors
        if _verbose():
            raise
        _config_error(e, argv, _config_path(argv) if "config" in flags.FLAGS else None)


def _config_error(e: Exception, argv, path: str | None) -> None:
    """Exits with one sentence for a flag error `e`: the unknown config key it is about (with the
    nearest keys), the config file's own error, or e's first line."""
    message = None
    if path:
        try:
            message = unknown_key_message(load_config_file(find_config(path)), argv)
        except ConfigError as err:
            message = str(err)
    if message is None:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        message = f"{first} (--help lists the flags)"
    fail(message)


def _resolve_config_argument() -> None:
    """Rewrites --config=PATH in sys.argv to find_config(PATH), so configs resolve from anywhere."""
    for i, a in enumerate(sys.argv):
        if a.startswith("--config="):
            sys.argv[i] = "--config=" + find_config(a[len("--config="):])
        elif a == "--config" and i + 1 < len(sys.argv):
            sys.argv[i + 1] = find_config(sys.argv[i + 1])


__all__ = ["CACHE_FOLDER", "CONFIG_KEYS_DOC", "PACKAGED_CONFIGS", "REPO_ROOT", "USER_ERRORS", "config_keys",
           "define_compilation_cache", "define_config", "fail", "find_config", "flags", "help_text",
           "load_config_file", "run", "unknown_key_message", "use_compilation_cache"]
