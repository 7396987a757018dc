"""The parent side of launch/bench.py: the whole benchmark within a time budget, one table.

`run` starts the worker processes (hbpo_jax.bench.runner) in turn, the jax group then the torch
group, and reads the JSON lines they print into a `report.Report`. A section that raises, runs
out of memory, hangs past its time limit or kills its worker is recorded as "failed: <reason>" and
the rest still run (in a fresh worker when the old one died); sections that would overrun the
budget are recorded as "skipped: time". The table is rewritten after every section.
"""
from __future__ import annotations

import collections
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time

from hbpo_jax.bench.report import Report
from hbpo_jax.bench.runner import TAG
from hbpo_jax.bench.settings import PLAN, SECTIONS, bench_settings

# The repository root (hbpo_jax/bench/harness.py is three levels down): the workers run from it.
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _reader(stream, q: queue.Queue, kind: str, tail: collections.deque | None = None, echo=None) -> None:
    for line in stream:
        line = line.rstrip("\n")
        if tail is not None:
            tail.append(line)
        if echo is not None:
            print(line, file=echo, flush=True)
        else:
            q.put((kind, line))
    q.put((kind + "_eof", None))


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: the worker and nothing else
        except (ProcessLookupError, PermissionError):
            proc.kill()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass


def _run_worker(group: str, names: list[str], s: dict, report: Report, deadline: float, hard: float,
                external, log) -> set[str]:
    """Starts one worker for `names`; returns the names that got a final status."""
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    if group == "jax":
        env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.90")
    else:
        env["JAX_PLATFORMS"] = "cpu"  # the torch worker must not touch the GPU through jax
    cmd = [sys.executable, "-m", "hbpo_jax.bench.runner", f"--worker={group}", f"--sections={','.join(names)}",
           f"--settings={json.dumps(s)}", f"--deadline={deadline!r}", f"--external={json.dumps(list(external))}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1, env=env,
                            cwd=ROOT, start_new_session=True)
    q: queue.Queue = queue.Queue()
    tail: collections.deque = collections.deque(maxlen=40)
    threading.Thread(target=_reader, args=(proc.stdout, q, "out"), daemon=True).start()
    threading.Thread(target=_reader, args=(proc.stderr, q, "err", tail, sys.stderr), daemon=True).start()
    finished: set[str] = set()
    current, started_any = None, False
    scale = s["est_scale"]

    def limit_for(name):
        if s.get("section_timeout_s"):
            return float(s["section_timeout_s"])
        e = SECTIONS[name].est_s * scale
        return max(3 * e, e + 90)

    until = min(time.time() + 60 + 4 * s["startup_est"][group], hard)
    eof = False
    while True:
        left = until - time.time()
        if left <= 0:
            _kill(proc)
            at_hard = until >= hard - 1e-6
            why = ("failed: killed at the time budget" if at_hard else
                   f"failed: timeout after {limit_for(current) if current else 0:.0f} s")
            if current is not None:
                report.set_status(current, why)
                finished.add(current)
                log(f"{current}: {why}")
            elif not started_any:
                for name in names:
                    report.set_status(name, "failed: worker did not start in time" if not at_hard else
                                      "skipped: time")
                    finished.add(name)
            report.write()
            break
        try:
            kind, line = q.get(timeout=min(left, 5.0))
        except queue.Empty:
            continue
        if kind == "out_eof":
            eof = True
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                _kill(proc)
            time.sleep(0.2)
            errs = [x for x in tail if x.strip()]
            why = f"worker exited with code {proc.returncode}" + (f": {errs[-1][-200:]}" if errs else "")
            if current is not None:
                report.set_status(current, "failed: " + why)
                finished.add(current)
                log(f"{current}: failed: {why}")
            elif not started_any and not finished:
                for name in names:
                    report.set_status(name, "failed: " + why)
                    finished.add(name)
                log(f"{group} worker failed before its first section: {why}")
            report.write()
            break
        if kind != "out":
            continue
        if not line.startswith(TAG):
            log("  | " + line)
            continue
        try:
            msg = json.loads(line[len(TAG):])
        except json.JSONDecodeError:
            log("  | " + line)
            continue
        t = msg.pop("type")
        elapsed = time.time() - report.t0
        if t == "info":
            report.meta.update(msg)
        elif t == "ceiling":
            report.ceilings[msg["name"]] = msg["value"]
            report.ceilings[msg["name"] + "_note"] = msg.get("note", "")
            report.write()
        elif t == "start":
            current, started_any = msg["section"], True
            until = min(time.time() + limit_for(current), hard)
            log(f"[bench +{elapsed:5.0f}s] {current}: start (estimate {msg.get('est_s', 0):.0f} s)")
        elif t == "row":
            report.add_row(msg["row"])
            r = msg["row"]
            log(f"[bench +{elapsed:5.0f}s] {r['section']}: {r.get('job')} {r.get('impl')} {r.get('shape')}: "
                f"{r.get('tokens_per_s', 0):,.0f} tokens/s")
            report.write()
        elif t == "end":
            name = msg["section"]
            report.set_status(name, msg["status"], msg.get("seconds"))
            finished.add(name)
            current = None
            until = min(time.time() + 120, hard)
            log(f"[bench +{elapsed:5.0f}s] {name}: {msg['status']}"
                + (f" ({msg['seconds']:.1f} s)" if msg.get("seconds") is not None else "")
                + (f" [{msg['detail']}]" if msg.get("detail") else ""))
            report.write()
    if not eof:
        _kill(proc)
    return finished


def run(smoke: bool = False, out_dir: str | None = "bench_out", budget_s: float | None = None,
        only: list[str] | None = None, overrides: dict | None = None, log=None) -> Report:
    """The whole benchmark (launch/bench.py): workers in turn, the table in out_dir/bench.{md,json}."""
    log = log or (lambda msg: print(msg, flush=True))
    s = bench_settings(smoke)
    s.update(overrides or {})
    budget = float(budget_s if budget_s is not None else s["budget_s"])
    report = Report(s, out_dir, budget)
    deadline = report.t0 + budget
    hard = deadline + s["grace_s"]
    if only:
        unknown = sorted(set(only) - set(SECTIONS))
        if unknown:
            raise ValueError(f"unknown sections {unknown}; known: {sorted(SECTIONS)}")
    plan = [(g, [n for n in names if not only or n in only]) for g, names in PLAN]
    plan = [(g, names) for g, names in plan if names]
    log(f"[bench] {s['mode']} run, budget {budget:.0f} s (hard stop at {budget + s['grace_s']:.0f} s), "
        f"out {out_dir}; plan: " + " | ".join(f"{g}: {', '.join(n)}" for g, n in plan))
    report.write()
    for gi, (group, names) in enumerate(plan):
        pending = list(names)
        while pending:
            # Time kept for the more important sections of later workers (and their start-up).
            external = []
            for g2, names2 in plan[gi + 1:]:
                left2 = [n for n in names2 if n not in report.status]
                if left2:
                    prios = [SECTIONS[n].priority for n in left2]
                    external += [(SECTIONS[n].priority, SECTIONS[n].est_s * s["est_scale"]) for n in left2]
                    external.append((min(prios), s["startup_est"][g2]))
            if time.time() + s["startup_est"][group] > deadline:
                for name in pending:
                    report.set_status(name, "skipped: time")
                    log(f"[bench] {name}: skipped: time")
                report.write()
                break
            log(f"[bench +{time.time() - report.t0:5.0f}s] starting the {group} worker: {', '.join(pending)}")
            done = _run_worker(group, pending, s, report, deadline, hard, external, log)
            pending = [n for n in pending if n not in done]
            if time.time() >= hard:
                for name in pending:
                    report.set_status(name, "skipped: time")
                pending = []
    for name in [n for _, names in plan for n in names]:
        if name not in report.status:
            report.set_status(name, "skipped: time")
    report.meta["wall_s"] = time.time() - report.t0
    report.write()
    return report
