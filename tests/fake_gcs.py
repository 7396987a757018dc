"""A stand-in for a pod's storage, for tests: `gs://` paths served from a local folder, and a
local filesystem that refuses directory renames (as gcsfuse does on an ordinary bucket).

    python tests/fake_gcs.py ROOT -- launch/train.py ARGS...

runs the script in this process with every `gs://X` path of etils.epath mapped to `ROOT/X`
(etils.epath.testing.mock_epath) and every directory rename refused. Orbax's arrays go through
tensorstore's own GCS driver, which no Python mock reaches, so the checkpoints alone are given
their local stand-in path (hbpo_jax.checkpoint._orbax_path); everything else the loop writes
(spec.json, metrics.jsonl, TensorBoard events, the tokenizer and warm-start caches, results)
goes through the mocked gs:// path.
"""
from __future__ import annotations

import contextlib
import errno
import os
import pathlib
import runpy
import sys

REFUSED_LOG = "refused_renames.txt"  # under ROOT: one line per refused directory rename


def to_local(root: str, p) -> str:
    """gs://X -> ROOT/X; other paths unchanged."""
    s = os.fspath(p)
    return os.path.join(root, s[len("gs://"):]) if s.startswith("gs://") else s


def to_remote(root: str, p) -> str:
    """ROOT/X -> gs://X (paths the mock hands back, e.g. from walk and glob)."""
    s = os.fspath(p)
    return "gs://" + s[len(root) + 1:] if s.startswith(root + os.sep) else s


@contextlib.contextmanager
def mock_gcs(root: str):
    """etils.epath with gs:// served from `root` (a local folder)."""
    from etils.epath import testing

    def one(fn):
        return lambda original, p, *a, **k: fn(original, to_local(root, p), *a, **k)

    def two(original, src, dst, *a, **k):
        return original(to_local(root, src), to_local(root, dst), *a, **k)

    # Paths handed back are spelled as asked: gs:// for a gs:// query, local for a local one
    # (Orbax globs its local stand-in folders and hands the results to tensorstore).
    def walk(original, top, **k):
        back = (lambda d: to_remote(root, d)) if os.fspath(top).startswith("gs://") else (lambda d: d)
        for d, dirs, names in original(to_local(root, top), **k):
            yield back(d), dirs, names

    def glob(original, pattern):
        found = original(to_local(root, pattern))
        return [to_remote(root, p) for p in found] if os.fspath(pattern).startswith("gs://") else found

    def open_(original, p, mode="r", *a, **k):
        if any(c in mode for c in "wax"):  # GCS objects need no parent folder
            os.makedirs(os.path.dirname(p), exist_ok=True)
        return original(p, mode, *a, **k)

    plain = lambda original, p, *a, **k: original(p, *a, **k)  # noqa: E731
    fns = {name: one(plain) for name in ("exists", "isdir", "listdir", "makedirs", "mkdir",
                                         "remove", "rmtree", "stat")}
    with testing.mock_epath(**fns, open=one(open_), rename=two, replace=two, copy=two, walk=walk,
                            glob=glob):
        yield


@contextlib.contextmanager
def refuse_directory_renames(log_path: str | None = None):
    """os.rename / os.replace / pathlib rename and replace raise OSError(ENOTSUP) for a directory
    (file renames still work, as on gcsfuse)."""
    real = {"rename": os.rename, "replace": os.replace}

    def guard(name):
        def renamed(src, dst, *a, **k):
            if os.path.isdir(src):
                if log_path:
                    with open(log_path, "a") as f:
                        f.write(f"{name} {src} -> {dst}\n")
                raise OSError(errno.ENOTSUP, "directory rename refused (gcsfuse)", os.fspath(src))
            return real[name](src, dst, *a, **k)
        return renamed

    patched = {"rename": guard("rename"), "replace": guard("replace")}
    path_methods = {m: getattr(pathlib.Path, m) for m in ("rename", "replace")}
    os.rename, os.replace = patched["rename"], patched["replace"]
    pathlib.Path.rename = lambda self, target: (patched["rename"](self, target), type(self)(target))[1]
    pathlib.Path.replace = lambda self, target: (patched["replace"](self, target), type(self)(target))[1]
    try:
        yield
    finally:
        os.rename, os.replace = real["rename"], real["replace"]
        for m, fn in path_methods.items():
            setattr(pathlib.Path, m, fn)


def main(argv: list[str]) -> None:
    root = os.path.abspath(argv[1])
    script, args = argv[3], argv[4:]
    os.makedirs(root, exist_ok=True)
    from hbpo_jax import checkpoint
    checkpoint._orbax_path = lambda directory: checkpoint.files.path(to_local(root, directory))
    with mock_gcs(root), refuse_directory_renames(os.path.join(root, REFUSED_LOG)):
        probe = os.path.join(root, "probe-dir")
        os.makedirs(probe, exist_ok=True)
        try:  # the test is only meaningful if a directory rename really fails here
            os.rename(probe, probe + "-renamed")
            raise AssertionError("directory renames are not refused")
        except OSError:
            os.rmdir(probe)
        sys.argv = [script, *args]
        runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main(sys.argv)
