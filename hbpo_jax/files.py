"""Workdir file I/O, local or remote (`gs://bucket/run`), all through `etils.epath` (what Orbax
itself uses): JSON and text files, folder copies, and local staging for writers that only take
local paths (tensorboardX, sentencepiece, transformers' save_pretrained).

Nothing here renames a directory: gcsfuse refuses directory renames on ordinary buckets and GCS
has no such operation. A file is written whole: locally a temporary file renamed over the target
(a file rename, which every filesystem has), on GCS one object upload (an object appears only
when its upload completes). So every result file is the old one or the new one, never half.

Remote paths need a filesystem for epath: `gcsfs` (the `gcs` and `tpu` extras) or TensorFlow.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from typing import Any, Iterator

from etils import epath

_CHUNK = 16 << 20  # bytes per read when streaming a file between filesystems


def path(p) -> epath.Path:
    """`p` (str, os.PathLike or epath.Path) as an epath.Path; "gs://..." stays remote."""
    return epath.Path(p)


def is_local(p) -> bool:
    """True for a path of the local filesystem (no "scheme://" prefix)."""
    return "://" not in os.fspath(p)


def join(p, *parts) -> str:
    """os.path.join that keeps "gs://" intact: a str, as the rest of the package passes paths."""
    return os.fspath(path(p).joinpath(*parts))


def exists(p) -> bool:
    return path(p).exists()


def isdir(p) -> bool:
    return path(p).is_dir()


def makedirs(p) -> str:
    """Creates `p` and its parents (GCS has no folders: a no-op there besides a marker-less check)."""
    path(p).mkdir(parents=True, exist_ok=True)
    return os.fspath(p)


def write_text(p, text: str) -> str:
    """Writes `text` to `p` whole (see the module docstring); returns p."""
    if is_local(p):
        tmp = f"{os.fspath(p)}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, p)  # a file rename: atomic on POSIX, supported by gcsfuse
    else:
        path(p).write_text(text)
    return os.fspath(p)


def read_text(p) -> str:
    return path(p).read_text()


def write_json(p, obj: Any, *, indent: int | None = 2) -> str:
    """Writes `obj` as JSON to `p` whole; returns p. Values JSON cannot hold (numpy scalars,
    tuples of them, paths) are written as str."""
    return write_text(p, json.dumps(obj, indent=indent, default=_plain))


def read_json(p) -> Any:
    return json.loads(read_text(p))


def copy_file(src, dst) -> None:
    """Copies one file between any two filesystems (streamed: a multi-GB safetensors file never
    sits in memory)."""
    with path(src).open("rb") as fin, path(dst).open("wb") as fout:
        shutil.copyfileobj(fin, fout, _CHUNK)


def copytree(src, dst) -> list[str]:
    """Copies the files under folder `src` to `dst` (same relative paths), across filesystems;
    returns the relative paths copied. Existing files in dst are overwritten."""
    copied, top = [], None
    for root, _, names in path(src).walk():
        root = path(root)
        top = top or root  # walk's own spelling of src (relative paths are taken from it)
        rel = os.path.relpath(os.fspath(root), os.fspath(top)) if names else ""
        target = path(dst) / rel if rel not in ("", ".") else path(dst)
        if names:
            target.mkdir(parents=True, exist_ok=True)
        for name in names:
            copy_file(root / name, target / name)
            copied.append(os.path.normpath(os.path.join(rel, name)))
    return copied


def rmtree(p) -> None:
    """Deletes folder `p` and everything under it; nothing when it does not exist."""
    if path(p).exists():
        path(p).rmtree()


@contextlib.contextmanager
def staged_dir(dst) -> Iterator[str]:
    """A local folder for writers that only take local paths; its files end up in `dst`.

    Local dst: dst itself (created). Remote dst: a temporary folder, uploaded to dst when the
    block ends without an exception, then deleted."""
    if is_local(dst):
        os.makedirs(dst, exist_ok=True)
        yield os.fspath(dst)
        return
    local = tempfile.mkdtemp(prefix="hbpo-jax-stage-")
    try:
        yield local
        copytree(local, dst)
    finally:
        shutil.rmtree(local, ignore_errors=True)


def local_dir(src) -> str:
    """A local folder with the files of folder `src`: src itself when local, else a download
    into a per-source cache folder (reused within the machine; refreshed on every call, so a
    changed remote folder is seen)."""
    if is_local(src):
        return os.fspath(src)
    digest = hashlib.sha256(os.fspath(src).encode()).hexdigest()[:16]
    local = os.path.join(tempfile.gettempdir(), "hbpo-jax-remote", digest)
    if path(src).is_dir():
        copytree(src, local)
    return local


def _plain(x):
    if hasattr(x, "item"):  # numpy / jax scalars
        return x.item()
    if hasattr(x, "tolist"):
        return x.tolist()
    return str(x)
