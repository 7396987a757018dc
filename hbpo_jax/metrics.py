"""Training metrics: tensorboardX event files and a metrics.jsonl in the workdir, and a console
progress bar with an ETA."""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Mapping

import jax


class MetricsWriter:
    """Writes scalars to `<workdir>/tensorboard` (event files) and `<workdir>/metrics.jsonl` (one
    JSON object per call: {"step": ..., name: value, ...}), and shows progress on the console.

    Only process 0 writes; the others accept calls and do nothing.
    """

    def __init__(self, workdir: str, total_steps: int, start_step: int = 0, console: bool = True,
                 console_keys: tuple[str, ...] = ("reward", "accuracy", "response_len", "loss", "time_rollout",
                                                      "time_grading", "time_update")):
        self.enabled = jax.process_index() == 0
        self.total, self.start = total_steps, start_step
        self.console_keys = console_keys
        self._console = console and self.enabled
        self._t0 = time.time()
        self._writer = self._jsonl = None
        if self.enabled:
            from tensorboardX import SummaryWriter
            self._writer = SummaryWriter(os.path.join(workdir, "tensorboard"), flush_secs=10)
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")

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
        if self.enabled:
            self._writer.flush()
            self._jsonl.flush()

    def close(self) -> None:
        if self.enabled:
            self._writer.close()
            self._jsonl.close()
