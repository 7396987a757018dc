"""The table of launch/bench.py: every worker message collected into a `Report`, rendered as
markdown (OUT/bench.md) and JSON (OUT/bench.json) after every change, so a run cut short still
leaves one behind. Failed and skipped sections get a row of their own."""
from __future__ import annotations

import datetime
import json
import os
import platform
import time

from hbpo_jax.bench.common import BANDWIDTH, bench_model_config, failure_reason, format_rate
from hbpo_jax.bench.settings import DISPLAY, PAPER, SECTIONS, section_shape

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
