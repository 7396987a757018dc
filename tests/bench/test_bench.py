"""launch/bench.py and launch/bench_sampler.py: the smoke run end to end, every failure path
leaving a table behind, the quick sampler table, and the bench modules' size."""
import json
import os
import re
import subprocess
import sys
import time

import pytest
from conftest import xla_flags

from hbpo_jax.bench import common, harness, quick, report, runner, settings

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FORBIDDEN = ("ml_collections", "grain", "tensorboardX", "math_verify", "datasets")


def _env(**extra):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", XLA_FLAGS=xla_flags(1))  # one device, as on a GPU machine
    env.pop(runner.FAULT_ENV, None)
    env.update(extra)
    return env


def _collect():
    messages = []
    return messages, lambda kind, **kw: messages.append(dict(kw, type=kind))


def test_run_sections_records_a_failure_and_runs_the_rest():
    messages, emit = _collect()

    def boom(row):
        row(job="partial", tokens_per_s=1.0)
        raise MemoryError("RESOURCE_EXHAUSTED: out of memory while allocating 3 GiB")

    def nothing(row):
        raise runner.SectionSkipped("nothing to compare")

    fns = dict(ceilings=boom, sampler_large=lambda row: row(job="ok", tokens_per_s=2.0),
               sampler_small=lambda row: pytest.fail("must be skipped"), train_xla=nothing)
    est = {"ceilings": 1.0, "sampler_large": 1.0, "sampler_small": 10_000.0, "train_xla": 1.0}
    runner.run_sections(list(fns), fns, deadline=time.time() + 600, est=est.get, emit=emit)
    ends = {m["section"]: m["status"] for m in messages if m["type"] == "end"}
    assert ends["ceilings"].startswith("failed: OOM: MemoryError: RESOURCE_EXHAUSTED")
    assert ends["sampler_large"] == "ok"
    assert ends["sampler_small"] == "skipped: time"
    assert ends["train_xla"] == "skipped: nothing to compare"
    rows = [m["row"] for m in messages if m["type"] == "row"]
    assert [(r["section"], r["tokens_per_s"]) for r in rows] == [("ceilings", 1.0), ("sampler_large", 2.0)]


def test_run_sections_keeps_time_for_more_important_sections_elsewhere():
    messages, emit = _collect()
    fns = {"hbpo_fraction": lambda row: pytest.fail("must be skipped"), "train_large": lambda row: None}
    # 100 s left; hbpo_fraction (priority 7) needs 30 s but hf_train (priority 6) reserves 80 s;
    # train_large (priority 9) has only itself and the same reserve: 10 + 80 <= 100.
    runner.run_sections(list(fns), fns, deadline=time.time() + 100, external=[(6, 80.0)],
                                est={"hbpo_fraction": 30.0, "train_large": 10.0}.get, emit=emit)
    ends = {m["section"]: m["status"] for m in messages if m["type"] == "end"}
    assert ends == {"hbpo_fraction": "skipped: time", "train_large": "ok"}


def test_report_renders_failed_and_skipped_sections(tmp_path):
    s = settings.bench_settings(smoke=True)
    rep = report.Report(s, str(tmp_path), budget_s=60)
    rep.meta.update(jax_device="NVIDIA H100 80GB HBM3", jax_platform="gpu")
    rep.ceilings.update(copy_bandwidth=2.9e12, matmul_flops=780e12)
    cfg = common.bench_model_config("qwen1_5b", "bfloat16")
    rep.add_row(dict(section="sampler_large", kind="sampler", job="sampler (generate)", impl="hbpo_jax",
                        shape="B=256", tokens_per_s=40_000.0, step_s=0.012, step_label="decode step",
                        compile_s=20.0, **common.decode_bytes(cfg, 256, 256, 512)))
    rep.add_row(dict(section="hf_sampler_large", kind="sampler", job="sampler (generate)", impl="transformers",
                        shape="B=256", tokens_per_s=5_000.0, step_s=0.05, step_label="token", kv_read=None,
                        **{k: v for k, v in common.decode_bytes(cfg, 256, 256, 512).items() if k != "kv_read"}))
    rep.set_status("sampler_large", "ok")
    rep.set_status("train_small", "failed: OOM: RESOURCE_EXHAUSTED")
    rep.set_status("hbpo_fraction", "skipped: time")
    rep.write()
    md = (tmp_path / "bench.md").read_text()
    data = json.loads((tmp_path / "bench.json").read_text())
    assert "| training step | hbpo_jax | 2 x 32 tokens | failed: OOM: RESOURCE_EXHAUSTED |" in md
    assert "skipped: time" in md
    # weights 3.08 GB + KV 2.64 GB (needed) in 12 ms: 477 TB/s... of a 2.9 TB/s copy ceiling.
    b = common.decode_bytes(cfg, 256, 256, 512)
    assert b["weight_bytes"] == pytest.approx((cfg.num_params() - 151936 * 1536) * 2)
    assert b["kv_read"] == pytest.approx(2 * 28 * 2 * 128 * 2 * 256 * 768)
    assert b["kv_needed"] == pytest.approx(2 * 28 * 2 * 128 * 2 * 256 * 512)
    needed = (b["weight_bytes"] + b["kv_needed"]) / 0.012
    assert f"= {needed / 2.9e12:.0%} / {needed / 3.0e12:.0%} of ref" in md
    assert "| sampler, batch 2 | 40,000 | 5,000 | 8.00x |" in md
    statuses = {r["section"]: r["status"] for r in data["rows"] if r["kind"] == "status"}
    assert statuses == {"train_small": "failed: OOM: RESOURCE_EXHAUSTED", "hbpo_fraction": "skipped: time"}


def test_bench_import_chain_has_no_training_only_packages():
    code = ("import sys, runpy; sys.argv = ['bench.py', '--help']\n"
            "try:\n    runpy.run_path('launch/bench.py', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            f"print([m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r}])")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.slow
def test_smoke_run_end_to_end(tmp_path):
    out_dir = tmp_path / "bench"
    proc = subprocess.run([sys.executable, "launch/bench.py", "--smoke", f"--out={out_dir}"], cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((out_dir / "bench.json").read_text())
    md = (out_dir / "bench.md").read_text()
    assert data["sections"] == {name: "ok" for name in settings.SECTIONS}, data["sections"]
    rows = data["rows"]
    measured = [r for r in rows if r["section"] != "ceilings"]
    assert {r["section"] for r in measured} == set(settings.SECTIONS) - {"ceilings"}
    for r in measured:
        assert r["status"] == "ok" and isinstance(r["tokens_per_s"], float) and r["tokens_per_s"] > 0, r
    assert data["ceilings"]["copy_bandwidth"] > 0 and data["ceilings"]["matmul_flops"] > 0
    assert all(q["ratio"] and q["ratio"] > 0 for q in data["ratios"]), data["ratios"]
    assert "failed" not in md and "skipped" not in md
    table = [line for line in md.splitlines() if line.startswith("| ") and "tokens/s" not in line]
    assert len(table) >= len(measured)
    assert md in proc.stdout  # the table is printed at the end too
    assert data["meta"]["jax"] and data["meta"]["torch"] and data["meta"]["transformers"]


@pytest.mark.slow
def test_hung_and_crashed_workers_are_table_entries(tmp_path, monkeypatch):
    """ceilings hangs (killed at its time limit), sampler_small kills its worker; a fresh worker
    runs each remaining section and the torch section still runs."""
    for k, v in _env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv(runner.FAULT_ENV, "ceilings:hang,sampler_small:crash")
    logs = []
    result = harness.run(smoke=True, out_dir=str(tmp_path), only=["ceilings", "sampler_small", "hf_train"],
                               overrides={"section_timeout_s": 25}, log=logs.append)
    assert result.status["ceilings"] == "failed: timeout after 25 s", logs
    assert result.status["sampler_small"].startswith("failed: worker exited with code 3"), logs
    assert result.status["hf_train"] == "ok", logs
    md = (tmp_path / "bench.md").read_text()
    assert "failed: worker exited with code 3" in md and "| training step | transformers" in md


@pytest.mark.slow
def test_quick_sampler_benchmark_table(monkeypatch):
    """launch/bench_sampler.py's table: a row of measured rates, and bytes per step as decode_bytes
    counts them (weights once, the whole preallocated cache)."""
    cfg = common.bench_model_config("tiny", "float32")
    row = quick.bench_sampler(cfg, batch=2, prompt_len=8, new_tokens=4, repeats=1)
    moved = common.decode_bytes(cfg, 2, 8, 4, cache_prompt=16)  # prompts bucket to 16 slots
    assert row["tokens_per_s"] > 0 and row["ms_per_step"] > 0 and row["prefill_ms"] > 0
    assert row["bytes_per_step"] == moved["weight_bytes"] + moved["kv_read"]
    assert moved["kv_read"] == 2 * cfg.num_layers * 2 * (16 + 4) * cfg.num_kv_heads * cfg.head_dim * 4
    monkeypatch.setattr(quick, "device_bandwidth", lambda: (1e10, "test"))
    table = quick.run_sampler_benchmark("tiny", batch=2, prompt_len=8, new_tokens=4)
    assert "hbpo_jax" in table.splitlines()[3] and "bytes/step = weights" in table


@pytest.mark.slow
def test_rollout_benchmark_smoke():
    """launch/bench_rollout.py --smoke: both rollout paths draw the same tokens, the engine's
    utilization is reported, and the last line has the issue's format."""
    proc = subprocess.run([sys.executable, "launch/bench_rollout.py", "--smoke"], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert "the same tokens on every path: yes" in proc.stdout
    assert re.search(r"KV bytes: engine page pool [\d.]+ MiB \(\d+ pages of 16 tokens\)", proc.stdout)
    # The default pool holds every slot's whole limit: nothing granted later, nothing preempted.
    assert re.search(r"\nwhole limits +\| +\d+ \| +\d+ = +\d+% \| +0 \| +0 \| +0\n", proc.stdout), proc.stdout
    assert re.fullmatch(r"rollout: engine \d+ tokens/s, static \d+ tokens/s, speed-up [\d.]+x, utilization \d+%",
                        lines[-1]), lines[-1]
    table = {line.split("|")[0].strip(): line for line in lines
             if line.startswith(("static ", "refill ")) and line.rstrip().endswith("%")}  # the rollout table
    util = {k: float(v.split("|")[-1].strip().rstrip("%")) for k, v in table.items()}
    assert util["refill"] > util["static"]
