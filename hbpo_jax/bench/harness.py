"""The parent side of launch/bench.py: the whole benchmark within a time budget, one table.

`run` starts the worker processes of hbpo_jax.bench.sections in turn (the jax group, then the
torch group) and reads the JSON lines they print into a `Report`. A section that raises, runs out
of memory, hangs past its time limit or kills its worker is recorded as "failed: <reason>" and the
rest still run (in a fresh worker when the old one died); sections that would overrun the budget
are recorded as "skipped: time". The table (OUT/bench.md + bench.json) is rewritten after every
section, so a run cut short still leaves one behind.
"""
from __future__ import annotations

import collections
import datetime
import json
import os
import platform
import queue
import signal
import subprocess
import sys
import threading
import time

from hbpo_jax.bench.sections import DISPLAY, PAPER, PLAN, SECTIONS, TAG, bench_settings, section_shape
from hbpo_jax.bench.common import BANDWIDTH, bench_model_config, failure_reason, format_rate

PEAK_FLOPS = {"H100": 989e12, "H200": 989e12}  # dense bf16 tensor-core peak (SXM)


class Report:
    """Everything the workers reported, rendered as markdown and json after every change."""

    def __init__(self, s: dict, out_dir: str | None, budget_s: float):
        self.s, self.out_dir, self.budget_s = s, out_dir, budget_s
        self.t0 = time.time()
        self.meta = dict(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
                         mode=s["mode"], model=s["model"], dtype=s["dtype"], python=platform.python_version(),
                         host=platform.node(), budget_s=budget_s)
        self.ceilings: dict = {}
        self.rows: list[dict] = []
        self.status: dict[str, str] = {}
        self.seconds: dict[str, float] = {}

    # -- collection
    def add_row(self, row: dict) -> None:
        self.rows.append(dict(row, status="ok"))

    def set_status(self, name: str, status: str, seconds: float | None = None) -> None:
        self.status[name] = status
        if seconds is not None:
            self.seconds[name] = seconds

    # -- derived numbers
    def _ref_bandwidth(self):
        kind = self.meta.get("jax_device", "") + " " + self.meta.get("torch_device", "")
        return next(((n, bw) for n, bw in BANDWIDTH.items() if n in kind), (None, None))

    def _peak_flops(self):
        kind = self.meta.get("jax_device", "") + " " + self.meta.get("torch_device", "")
        return next((f for n, f in PEAK_FLOPS.items() if n in kind), None)

    def all_rows(self) -> list[dict]:
        """Rows in plan order, with a row per failed or skipped section."""
        out = []
        for name in DISPLAY:
            mine = [r for r in self.rows if r.get("section") == name]
            out.extend(mine)
            st = self.status.get(name)
            if st is not None and st != "ok":
                sec = SECTIONS[name]
                out.append(dict(section=name, kind="status", job=sec.job, impl=sec.impl,
                                shape=section_shape(name, self.s), tokens_per_s=None, status=st))
        return out

    def ratios(self) -> list[dict]:
        def find(section):
            return next((r for r in self.rows if r.get("section") == section and r.get("tokens_per_s")), None)

        out = []
        for label, ours, theirs in (
                (f"sampler, batch {self.s['sampler_batches'][0]}", "sampler_large", "hf_sampler_large"),
                (f"sampler, batch {self.s['sampler_batches'][1]}", "sampler_small", "hf_sampler_small"),
                (f"training step, {self.s['train_batch']} x {self.s['train_seq']}", "train_small", "hf_train")):
            a, b = find(ours), find(theirs)
            out.append(dict(what=label, ours=a and a["tokens_per_s"], transformers=b and b["tokens_per_s"],
                            ratio=(a["tokens_per_s"] / b["tokens_per_s"]) if a and b else None,
                            ours_impl=a and a.get("impl")))
        return out

    def _cells(self, r: dict) -> list[str]:
        if r.get("kind") == "status":
            return [r["job"], r["impl"], r["shape"], r["status"], "", "", "", "", ""]
        bw = self.ceilings.get("copy_bandwidth")
        ref_name, ref_bw = self._ref_bandwidth()
        peak, mm = self._peak_flops(), self.ceilings.get("matmul_flops")
        step = r.get("step_s")
        step_cell = "" if step is None else (f"{step * 1e3:.2f} ms" if step < 1 else f"{step:.2f} s")
        if step is not None and r.get("step_label"):
            step_cell += f" / {r['step_label']}"
        compile_cell = "" if r.get("compile_s") is None else f"{r['compile_s']:.1f}"
        ceiling, frac = "", ""
        if "weight_bytes" in r and step:
            step_time = r.get("decode_step_s") or step
            needed = (r["weight_bytes"] + r["kv_needed"]) / step_time
            read = (r["weight_bytes"] + r["kv_read"]) / step_time if r.get("kv_read") else None
            parts = []
            if bw:
                parts.append(f"copy {format_rate(bw, 'B')} measured")
            if ref_bw:
                parts.append(f"{ref_name} {ref_bw / 1e12:.1f} TB/s ref")
            ceiling = "HBM: " + ("; ".join(parts) or "n/a")
            fr = []
            for label, rate in (("needed", needed), ("read", read)):
                if rate is None:
                    continue
                vals = ([f"{rate / bw:.0%}"] if bw else []) + ([f"{rate / ref_bw:.0%} of ref"] if ref_bw else [])
                fr.append(f"{label} {format_rate(rate, 'B')}" + (f" = {' / '.join(vals)}" if vals else ""))
            frac = "; ".join(fr)
        elif r.get("flops_per_s"):
            f = r["flops_per_s"]
            ceiling = (f"{peak / 1e12:.0f} TFLOP/s bf16 peak" if peak else "no peak (not H100/H200)") + (
                f"; matmul {format_rate(mm, 'FLOP')} measured" if mm else "")
            frac = (f"MFU {f / peak:.1%}" if peak else format_rate(f, "FLOP")) + (
                f" ({f / mm:.0%} of measured matmul)" if mm else "") + f" [{r.get('flops_rule', '6N')}]"
        elif r.get("kind") == "projection":
            ceiling, frac = "", f"{r['total_hours']:.1f} h for {PAPER['steps']} steps"
        tps = r.get("tokens_per_s")
        return [r.get("job", ""), r.get("impl", ""), r.get("shape", ""), "" if tps is None else f"{tps:,.0f}",
                step_cell, compile_cell, ceiling, frac, r.get("notes", "")]

    def markdown(self) -> str:
        m = self.meta
        dev = m.get("jax_device") or m.get("torch_device") or "?"
        cfg = bench_model_config(m["model"], m["dtype"], **self.s.get("model_changes", {}))
        changes = f" ({self.s['model_changes']})" if self.s.get("model_changes") else ""
        lines = [f"# hbpo-jax benchmark ({m['mode']})", "",
                 f"- date: {m['date']}; host {m['host']}; wall {time.time() - self.t0:.0f} s "
                 f"(budget {self.budget_s:.0f} s)",
                 f"- device: {dev} (jax platform {m.get('jax_platform', '?')}; torch device "
                 f"{m.get('torch_device', '?')})",
                 f"- versions: python {m['python']}, jax {m.get('jax', '?')} (jaxlib {m.get('jaxlib', '?')}), flax "
                 f"{m.get('flax', '?')}, optax {m.get('optax', '?')}, plugin {m.get('jax_plugin')}, torch "
                 f"{m.get('torch', '?')} (cuda "
                 f"{m.get('torch_cuda', '?')}), transformers {m.get('transformers', '?')}",
                 f"- model: {m['model']} shape{changes}, {cfg.num_params():,} parameters, random weights, "
                 f"{m['dtype']} parameters and compute, no EOS",
                 "- MFU = 6 x parameters x tokens/s / peak (989 TFLOP/s dense bf16 on H100/H200); attention "
                 "FLOPs and rematerialisation not counted; old log-probs use 2 x parameters (forward only)"]
        for name, label in (("copy_bandwidth", "copy bandwidth"), ("matmul_flops", "matmul")):
            if name in self.ceilings:
                v = self.ceilings[name]
                val = format_rate(v, "B") if name == "copy_bandwidth" else format_rate(v, "FLOP")
                lines.append(f"- ceiling, {label}: {val} ({self.ceilings.get(name + '_note', '')})")
        st = self.status.get("ceilings")
        if st and st != "ok":
            lines.append(f"- ceilings: {st}")
        head = ["job", "implementation", "shape", "tokens/s", "ms/step (or step s)", "compile s", "ceiling",
                "fraction of ceiling (or MFU)", "notes"]
        lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in self.all_rows():
            if r.get("section") == "ceilings":
                continue
            try:
                cells = self._cells(r)
            except Exception as e:  # noqa: BLE001 - one odd row must not hide the others
                cells = [r.get("job", r.get("section", "?")), r.get("impl", ""), r.get("shape", ""),
                         str(r.get("tokens_per_s")), "", "", "", "", f"(cannot render: {failure_reason(e)[:80]})"]
            lines.append("| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |")
        lines += ["", "| ours / transformers | hbpo_jax tokens/s | transformers tokens/s | ratio |",
                  "|---|---|---|---|"]
        for q in self.ratios():
            fmt = lambda v: "n/a" if v is None else f"{v:,.0f}"  # noqa: E731
            ratio = "n/a" if q["ratio"] is None else f"{q['ratio']:.2f}x"
            lines.append(f"| {q['what']} | {fmt(q['ours'])} | {fmt(q['transformers'])} | {ratio} |")
        return "\n".join(lines) + "\n"

    def to_json(self) -> dict:
        return dict(meta=dict(self.meta, wall_s=time.time() - self.t0), settings=self.s, ceilings=self.ceilings,
                    rows=self.all_rows(), ratios=self.ratios(), sections=self.status, section_seconds=self.seconds)

    def safe_markdown(self) -> str:
        """markdown(), or the raw rows if rendering fails: the table must never stop the run."""
        try:
            return self.markdown()
        except Exception as e:  # noqa: BLE001
            return (f"# hbpo-jax benchmark (table rendering failed: {failure_reason(e)})\n\n```\n"
                    + json.dumps(dict(meta=self.meta, ceilings=self.ceilings, rows=self.rows, sections=self.status),
                                 indent=1, default=str) + "\n```\n")

    def write(self) -> None:
        if not self.out_dir:
            return
        os.makedirs(self.out_dir, exist_ok=True)
        try:
            data = json.dumps(self.to_json(), indent=1, default=str)
        except Exception as e:  # noqa: BLE001
            data = json.dumps(dict(error=failure_reason(e), meta=self.meta, rows=self.rows, sections=self.status),
                              indent=1, default=str)
        for fname, text in (("bench.md", self.safe_markdown()), ("bench.json", data)):
            tmp = os.path.join(self.out_dir, fname + ".tmp")
            with open(tmp, "w") as f:
                f.write(text)
            os.replace(tmp, os.path.join(self.out_dir, fname))


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
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    if group == "jax":
        env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.90")
    else:
        env["JAX_PLATFORMS"] = "cpu"  # the torch worker must not touch the GPU through jax
    cmd = [sys.executable, "-m", "hbpo_jax.bench.sections", "--worker", group, "--sections", ",".join(names),
           "--settings", json.dumps(s), "--deadline", repr(deadline), "--external", json.dumps(list(external))]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1, env=env,
                            cwd=root, start_new_session=True)
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
