"""The worker side of launch/bench.py: a process that runs a list of sections, each guarded.

The parent (hbpo_jax.bench.harness) runs each group of sections in its own worker process,

    python -m hbpo_jax.bench.runner --worker=jax|torch --sections=a,b --settings=JSON --deadline=T

JAX sections in one, torch sections in another, so the two never hold GPU memory at once. A worker
reports on its stdout, one JSON message a line after `TAG`: info (versions, device), ceiling,
start, row, end. `run_sections` guards every section: one that raises is reported
"failed: <reason>", one that would overrun the deadline "skipped: time", and the next one runs.
"""
from __future__ import annotations

import gc
import json
import os
import time

from hbpo_jax.bench.common import SectionSkipped, failure_reason, progress
from hbpo_jax.bench.settings import SECTIONS

TAG = "@@BENCH "  # starts each message line a worker prints; JSON follows
FAULT_ENV = "HBPO_BENCH_FAULT"  # "section:raise|crash|hang", for the tests of the failure paths
__all__ = ["FAULT_ENV", "TAG", "SectionSkipped", "emit", "run_sections", "worker_main"]


def emit(kind: str, **payload) -> None:
    """One message line for the parent."""
    print(TAG + json.dumps(dict(payload, type=kind), default=str), flush=True)


def _fault(name: str) -> None:
    for item in filter(None, os.environ.get(FAULT_ENV, "").split(",")):
        sec, _, mode = item.partition(":")
        if sec != name:
            continue
        if mode == "crash":
            os._exit(3)
        if mode == "hang":
            time.sleep(3600)
        raise RuntimeError(f"injected fault in {name}")


def run_sections(names, fns, *, deadline: float, external=(), est=None, emit=emit, scale_jax=True) -> None:
    """Runs sections in order, each guarded: an exception is reported as "failed: <reason>" and the
    next section runs. A section whose estimate, plus the estimates of more important sections
    still to run elsewhere (`external`: (priority, seconds) pairs), would pass `deadline` (a
    time.time() value) is reported "skipped: time". Estimates are scaled by how long this worker's
    sections took against theirs so far (clamped to [0.5, 2]). fns: name -> fn(emit_row)."""
    est = est or (lambda name: SECTIONS[name].est_s)
    spent, planned = 0.0, 0.0
    for name in names:
        sec = SECTIONS.get(name)
        factor = min(max(spent / planned, 0.5), 2.0) if (planned and scale_jax) else 1.0
        cost = est(name) * factor
        reserve = sum(e for p, e in external if sec is None or p < sec.priority)
        left = deadline - time.time()
        if cost + reserve > left:
            emit("end", section=name, status="skipped: time",
                 detail=f"estimate {cost:.0f}s + reserved {reserve:.0f}s > {max(left, 0):.0f}s left")
            continue
        emit("start", section=name, est_s=cost)
        t0 = time.time()
        status = "ok"
        try:
            _fault(name)
            fns[name](lambda **row: emit("row", row=dict(row, section=name)))
        except SectionSkipped as e:
            status = f"skipped: {e}"
        except Exception as e:  # noqa: BLE001 - every failure is a table entry, never the end of the run
            status = "failed: " + failure_reason(e)
        gc.collect()
        spent += time.time() - t0
        planned += est(name)
        emit("end", section=name, status=status, seconds=time.time() - t0)


def _section_fns(group: str, s: dict) -> dict:
    """name -> fn(emit_row) for one worker group, after its info message."""
    if group == "jax":
        from hbpo_jax.bench import hbpo_section, sampler_sections, train_sections
        from hbpo_jax.bench.jax_context import JaxContext, ceilings, jax_info

        emit("info", **jax_info())
        ctx = JaxContext(s, emit)
        return dict(ceilings=lambda row: ceilings(ctx),
                    sampler_large=lambda row: sampler_sections.sampler(ctx, row, "sampler_large"),
                    sampler_small=lambda row: sampler_sections.sampler(ctx, row, "sampler_small"),
                    train_small=lambda row: train_sections.train_small(ctx, row),
                    train_xla=lambda row: train_sections.train_xla(ctx, row),
                    train_large=lambda row: train_sections.train_large(ctx, row),
                    hbpo_fraction=lambda row: hbpo_section.hbpo_step(ctx, row))
    from hbpo_jax.bench import hf_sections

    ctx = hf_sections.TorchContext(s)
    emit("info", **ctx.info())
    return dict(hf_sampler_large=lambda row: hf_sections.hf_sampler(ctx, row, "hf_sampler_large"),
                hf_sampler_small=lambda row: hf_sections.hf_sampler(ctx, row, "hf_sampler_small"),
                hf_train=lambda row: hf_sections.hf_train(ctx, row))


def worker_main(group: str, names: list[str], s: dict, deadline: float, external) -> None:
    """A worker process: runs `names` (all of one group) and reports on stdout."""
    t = time.time()
    fns = _section_fns(group, s)
    progress(f"{group} worker ready in {time.time() - t:.1f} s")
    run_sections(names, fns, deadline=deadline, external=[tuple(x) for x in external],
                 est=lambda name: SECTIONS[name].est_s * s["est_scale"], scale_jax=(group == "jax"))


def _main() -> None:
    # Flags are defined here, not at import: the parent imports this module for its constants.
    from absl import app, flags

    flags.DEFINE_enum("worker", None, ["jax", "torch"], "The worker group.", required=True)
    flags.DEFINE_list("sections", None, "Section names, in order.", required=True)
    flags.DEFINE_string("settings", None, "settings.bench_settings() as JSON.", required=True)
    flags.DEFINE_float("deadline", None, "time.time() by which the sections must end.", required=True)
    flags.DEFINE_string("external", "[]", "JSON (priority, seconds) pairs kept for later workers.")
    f = flags.FLAGS
    app.run(lambda argv: worker_main(f.worker, f.sections, json.loads(f.settings), f.deadline,
                                     json.loads(f.external)))


if __name__ == "__main__":
    _main()
