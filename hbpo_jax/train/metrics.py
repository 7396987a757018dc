"""Training metrics: tensorboardX event files and a metrics.jsonl in the workdir, and a console
progress bar with an ETA.

A remote workdir (gs://) cannot be appended to (a GCS object is written whole), and tensorboardX
writes gs:// only through google-cloud-storage, re-uploading its whole buffer on every flush. So
for a remote workdir both files are written in a local staging folder and copied to the workdir
(files.copytree, through etils.epath) at most every `sync_secs` seconds, on `flush()` and on
`close()`; a resumed run first downloads the workdir's metrics.jsonl and appends to it. A crash
loses at most the last sync_secs of metrics (the checkpoint is unaffected). Local workdirs are
written in place, as before.

A run that starts at step `start_step` (a resume) first cuts metrics.jsonl to the rows of steps up
to it (the steps after the checkpoint are run again and logged anew), and starts its event file
with TensorBoard's purge_step = start_step + 1, so TensorBoard hides the older files' events of the
steps run again (the older event files themselves are kept).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from typing import Mapping

import jax

from hbpo_jax import files


def _summary_writer():
    """tensorboardX's SummaryWriter class. tensorboardX imports torch whenever it is installed
    (the test extra installs it), only to accept torch tensors, and that import takes ~4 s of
    every run's start; we log floats, so torch is hidden from it unless something already
    imported it."""
    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter
        return SummaryWriter
    sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX expects
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


def truncate_jsonl(path: str, start_step: int) -> int:
    """Keeps the rows of metrics.jsonl at `path` whose step is ≤ start_step (none when it is 0: a
    fresh start logs everything again); returns how many rows were dropped."""
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        lines = f.read().splitlines()
    kept = [line for line in lines if start_step and _step_of(line) <= start_step]
    if len(kept) < len(lines):
        files.write_text(path, "".join(line + "\n" for line in kept))
    return len(lines) - len(kept)


def _step_of(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf  # a torn last line (a crash mid-write): dropped


class MetricsWriter:
    """Writes scalars to `<workdir>/tensorboard` (event files) and `<workdir>/metrics.jsonl` (one
    JSON object per call: {"step": ..., name: value, ...}), and shows progress on the console.

    Only process 0 writes; the others accept calls and do nothing.
    """

    def __init__(self, workdir: str, total_steps: int, start_step: int = 0, console: bool = True,
                 console_keys: tuple[str, ...] = ("reward", "accuracy", "response_len", "loss", "time_rollout",
                                                      "time_grading", "time_update"),
                 sync_secs: float = 60.0):
        self.enabled = jax.process_index() == 0
        self.total, self.start = total_steps, start_step
        self.console_keys = console_keys
        self._console = console and self.enabled
        self._t0 = time.time()
        self._writer = self._jsonl = None
        self._workdir, self._sync_secs, self._synced = workdir, sync_secs, time.time()
        self._stage = None  # the local folder standing in for a remote workdir
        if self.enabled:
            SummaryWriter = _summary_writer()
            local = workdir
            if not files.is_local(workdir):
                self._stage = local = tempfile.mkdtemp(prefix="hbpo-jax-metrics-")
                remote_jsonl = files.join(workdir, "metrics.jsonl")
                if files.exists(remote_jsonl):  # a resumed run appends to the existing rows
                    files.copy_file(remote_jsonl, os.path.join(local, "metrics.jsonl"))
            os.makedirs(local, exist_ok=True)
            truncate_jsonl(os.path.join(local, "metrics.jsonl"), start_step)
            self._writer = SummaryWriter(os.path.join(local, "tensorboard"), flush_secs=10,
                                         purge_step=start_step + 1 if start_step else None)
            self._jsonl = open(os.path.join(local, "metrics.jsonl"), "a")

    def scalars(self, step: int, values: Mapping[str, float], console: bool = True) -> None:
        if not self.enabled:
            return
        row = {"step": int(step)}
        for key, value in values.items():
            value = float(value)
            row[key] = value if math.isfinite(value) else str(value)
            if math.isfinite(value):
                self._writer.add_scalar(key, value, step)
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        if self._stage and time.time() - self._synced > self._sync_secs:
            self.flush()
        if self._console and console:
            done = step - self.start
            rate = (time.time() - self._t0) / max(done, 1)
            eta = rate * (self.total - step)
            bar = "#" * int(20 * step / max(self.total, 1))
            shown = " ".join(f"{k}={float(values[k]):.4g}" for k in self.console_keys if k in values)
            print(f"[{bar:<20}] step {step}/{self.total} {shown} ({rate:.1f}s/step, ETA {eta / 60:.1f} min)",
                  file=sys.stderr, flush=True)

    def text(self, tag: str, text: str, step: int) -> None:
        if self.enabled:
            self._writer.add_text(tag, text, step)

    def flush(self) -> None:
        """Flushes both files (and copies them to a remote workdir)."""
        if self.enabled:
            self._writer.flush()
            self._jsonl.flush()
            self._sync()

    def close(self) -> None:
        if self.enabled:
            self._writer.close()
            self._jsonl.close()
            self._sync()
            if self._stage:
                shutil.rmtree(self._stage, ignore_errors=True)
                self._stage = None

    def _sync(self) -> None:
        """Copies the staged files to the remote workdir (event files are rewritten whole: an
        object cannot be appended to)."""
        if self._stage:
            files.copytree(self._stage, self._workdir)
            self._synced = time.time()
