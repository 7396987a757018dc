"""A run's workdir is its contract: one run at a time (`Lock`, `<workdir>/lock.json`), and a
resume that keeps what the checkpoints mean (`check_resume`), with `<workdir>/spec.json` keeping
each accepted change. The contract works on the spec as a JSON dict flattened to dotted keys: a
key in `FREE` may change, every other key (a new spec section included) is the contract.
"""
from __future__ import annotations

import datetime
import errno
import json
import logging
import os
import shutil
import socket
import time

from hbpo_jax import files
from hbpo_jax.errors import WorkdirError

log = logging.getLogger(__name__)

LOCK_FILE = "lock.json"
SPEC_FILE = "spec.json"
HISTORY_KEY = "history"  # spec.json's list of the run's starts and accepted changes

# Dotted spec keys (or prefixes: a whole section) whose change does not alter what the checkpoints
# mean. Everything else is the contract.
FREE = (
    "name", "train.steps", "train.total_updates", "train.log_every", "train.checkpoint_every",
    "train.keep_checkpoints", "train.export_hf", "train.max_consecutive_skips", "train.micro_batch_size",
    "train.update_width_step", "train.pack_rows", "optim.learning_rate", "optim.schedule", "optim.warmup_steps",
    "eval", "grading_workers", "grading_timeout_s", "sampling.rollout.max_batch", "sampling.rollout.engine",
    "sampling.rollout.kv_tokens", "sampling.rollout.page_size", "sampling.rollout.decode_tensor_parallel", "mesh",
    "distributed",
    # How the model computes, not what it is: attention kernel, rematerialisation, layer loop, compute dtype.
    "model.fields.attention_impl", "model.fields.remat", "model.fields.scan_layers", "model.fields.dtype",
)


def _matches(key: str, prefixes) -> bool:
    return any(p == "*" or key == p or key.startswith(p + ".") for p in prefixes)


def is_free(key: str) -> bool:
    """True when changing spec key `key` (dotted) leaves the checkpoints' meaning alone."""
    return _matches(key, FREE)


# ----------------------------------------------------------------------------- the lock

def free_bytes(p) -> int | None:
    """Free bytes on the filesystem of local path `p` (its nearest existing parent); None remote."""
    if not files.is_local(p):
        return None
    p = os.path.abspath(os.fspath(p))
    while not os.path.exists(p) and os.path.dirname(p) != p:
        p = os.path.dirname(p)
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def os_error(e: OSError, what: str) -> WorkdirError:
    """`e` as one sentence naming the path (and the free bytes when the disk is full)."""
    where = e.filename or what
    text = f"cannot write {where}: {e.strerror or e}"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        text += f" ({free_bytes(where)} bytes free)"
    elif e.errno == errno.EROFS:
        text += " (a read-only filesystem)"
    return WorkdirError(text + "; choose another --workdir or free it.")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Lock:
    """`<workdir>/lock.json` for the life of a run (context manager). `acquire` raises
    WorkdirError when another live run holds it, or when the workdir cannot be written."""

    def __init__(self, workdir: str):
        self.workdir = os.fspath(workdir)
        self.path = files.join(self.workdir, LOCK_FILE)
        self.mine = {"host": socket.gethostname(), "pid": os.getpid(),
                     "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
        self.held = False

    def acquire(self) -> "Lock":
        try:
            files.makedirs(self.workdir)
            self._take()
        except OSError as e:
            raise os_error(e, self.path) from None
        self.held = True
        return self

    def _take(self) -> None:
        # Locally O_EXCL makes taking the lock atomic. On gs:// it is check-then-write (epath does
        # not reach GCS's generation-matched writes): two runs started within the same second may
        # both start; a stale lock of another host cannot be told from a live one (delete it).
        text = json.dumps(self.mine)
        if files.is_local(self.path):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                return
            with os.fdopen(fd, "w") as f:
                f.write(text)
            return
        if files.exists(self.path):
            self._take_over_if_stale()
            return
        files.write_text(self.path, text)

    def _take_over_if_stale(self) -> None:
        try:
            holder = json.loads(files.read_text(self.path))
        except (OSError, ValueError):
            holder = {}
        host, pid = holder.get("host", "?"), holder.get("pid", -1)
        ours = host == self.mine["host"]
        if ours and pid == os.getpid():
            pass  # this very process (a second run() in one process)
        elif ours and isinstance(pid, int) and not _pid_alive(pid):
            log.warning("%s: the lock of pid %s (started %s) is stale, that process is gone; taking it over.",
                        self.workdir, pid, holder.get("started", "?"))
        elif holder:
            raise WorkdirError(f"{self.workdir} is in use by pid {pid} on host {host} since "
                               f"{holder.get('started', '?')}; stop that run or choose another --workdir "
                               f"(delete {self.path} if that run is gone).")
        files.write_text(self.path, json.dumps(self.mine))

    def release(self) -> None:
        """Deletes the lock file if it is still this run's."""
        if not self.held:
            return
        self.held = False
        try:
            if json.loads(files.read_text(self.path)) == self.mine:
                files.path(self.path).unlink()
        except (OSError, ValueError):
            pass

    def __enter__(self) -> "Lock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ----------------------------------------------------------------------------- the contract

def flatten(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1} (lists are values)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def changes(old: dict, new: dict) -> dict:
    """{dotted key: [old, new]} of the keys that differ. A key the old spec did not record (a
    setting added to the package since) is not a change."""
    a, b = flatten(old), flatten(new)
    return {k: [a[k], b.get(k)] for k in sorted(a) if a[k] != b.get(k)}


def _short(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def read_spec(workdir: str) -> tuple[dict | None, list]:
    """(the spec spec.json records, without its history, or None; its history list)."""
    path = files.join(workdir, SPEC_FILE)
    if not files.exists(path):
        return None, []
    try:
        recorded = files.read_json(path)
    except ValueError:
        log.warning("%s is not valid JSON; treating the workdir as having no recorded spec.", path)
        return None, []
    history = recorded.pop(HISTORY_KEY, [])
    return recorded, history


def checkpoint_steps(workdir: str) -> list[int]:
    """The step folders under <workdir>/checkpoints (committed or not)."""
    folder = files.path(files.join(workdir, "checkpoints"))
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


def check_resume(workdir: str, new: dict, allow: tuple[str, ...] = ()) -> tuple[dict, list]:
    """Compares `new` (a spec dict) with the spec recorded in `workdir`.

    Refuses (WorkdirError, one sentence naming each key) a contract change when the workdir has
    checkpoints, unless `allow` names the key or a prefix of it ("*": all). Returns (the accepted
    changes {key: [old, new]}, the history to write: the recorded one plus this start)."""
    recorded, history = read_spec(workdir)
    steps = checkpoint_steps(workdir)
    diff = changes(recorded, new) if recorded is not None else {}
    refused = {k: v for k, v in diff.items() if steps and not is_free(k) and not _matches(k, allow)}
    if refused:
        listed = "; ".join(f"{k}: {_short(o)} -> {_short(n)}" for k, (o, n) in refused.items())
        raise WorkdirError(
            f"{workdir} holds checkpoints (up to step {steps[-1]}) of a run with another spec, and these "
            f"changes would alter what they mean: {listed}; use a new --workdir, or pass "
            f"--allow_spec_change={','.join(refused)} to resume anyway.")
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "event": "resume" if steps else "start"}
    if steps:
        entry["from_step"] = steps[-1]
    if diff:
        entry["changes"] = diff
        log.warning("resuming %s with changed settings: %s", workdir,
                    "; ".join(f"{k}: {_short(o)} -> {_short(n)}" for k, (o, n) in diff.items()))
    if recorded is not None and not history:  # a spec.json from before the history was kept
        history = [{"event": "start", "note": "spec.json written before its history was kept"}]
    return diff, history + [entry]


def write_spec(workdir: str, spec: dict, history: list) -> str:
    """spec.json: the spec in effect, with the history of starts and accepted changes (each
    change holds [old, new], so the original spec is the current one with the old values)."""
    return files.write_json(files.join(workdir, SPEC_FILE), {**spec, HISTORY_KEY: history})


__all__ = ["FREE", "LOCK_FILE", "Lock", "SPEC_FILE", "changes", "check_resume", "checkpoint_steps",
           "flatten", "free_bytes", "is_free", "os_error", "read_spec", "write_spec"]
