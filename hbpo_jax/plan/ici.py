"""The inter-chip (ICI) traffic of a compiled program, from its optimised HLO (hlo): every
collective's bytes moved per chip by its own formula, loops counted times their trip counts, the
time that takes at the chip's ICI bandwidth, and the plan's table of it.

Bytes sent per chip, for a group of n chips (the formulas of ring / pairwise algorithms; XLA's
own algorithm may differ, none sends less):
  all-gather          (n - 1) / n x the gathered result
  reduce-scatter      (n - 1) / n x the operand (the unscattered input)
  all-reduce          2 (n - 1) / n x the operand (a reduce-scatter, then an all-gather)
  all-to-all          (n - 1) / n x the operand (each chip keeps its own 1 / n)
  collective-permute  the operand (each chip sends its buffer to one peer)
"""
from __future__ import annotations

import dataclasses
import math
import re

from hbpo_jax.plan import hlo


def group_size(groups: str, devices: int) -> int:
    """Chips per replica group of a collective's `replica_groups` text (hlo.Collective.groups):
    '{{0,1,2,3},{4,5,6,7}}' -> 4; iota '[2,4]<=[8]' -> 4; "mesh['x'=2,'y'=4] {'y'}" -> 4;
    '' or '{}' (every chip) -> `devices`."""
    groups = groups.strip()
    if groups.startswith("mesh["):
        sizes = {k: int(v) for k, v in re.findall(r"'([^']+)'=(\d+)", groups.split("]", 1)[0])}
        chosen = re.findall(r"'([^']+)'", groups.split("]", 1)[1])
        return math.prod(sizes.get(k, 1) for k in chosen) if chosen else devices
    m = re.match(r"\[([\d,]+)\]<=", groups)
    if m:
        return int(m.group(1).split(",")[-1])
    m = re.match(r"\{\{([\d,\s]*)\}", groups)
    if m and m.group(1).strip():
        return len(m.group(1).split(","))
    return devices


def bytes_moved(opcode: str, operand_bytes: float, result_bytes: float, n: int) -> float:
    """Bytes one chip sends for one collective (module docstring); n: chips in its group."""
    if n <= 1 and opcode != "collective-permute":
        return 0.0
    share = (n - 1) / n
    if opcode == "all-gather":
        return share * result_bytes
    if opcode == "reduce-scatter":
        return share * operand_bytes
    if opcode == "all-reduce":  # operand and result alike (the result's bytes, where a fused operand reads wider)
        return 2 * share * (result_bytes or operand_bytes)
    if opcode in ("all-to-all", "ragged-all-to-all"):
        return share * operand_bytes
    if opcode == "collective-permute":
        return operand_bytes
    raise ValueError(f"not a collective: {opcode!r}")


@dataclasses.dataclass(frozen=True)
class Traffic:
    """One kind of collective of a program (same opcode, shapes, group size and sync-ness): count
    per call (loop trips applied), group size n, bytes sent per chip by one, and by all `count`;
    asynchronous: started and awaited apart (other work runs meanwhile), else the chip waits."""

    opcode: str
    shapes: str
    n: int
    count: int
    each: float
    asynchronous: bool = False

    @property
    def total(self) -> float:
        return self.count * self.each


def _add(module: hlo.Module, instr: hlo.Instr, mult: int, out: dict, devices: int) -> None:
    c = hlo.collective(module, instr)
    if c is None:
        return
    n = 2 if c.opcode == "collective-permute" else group_size(c.groups, devices)  # a permute: source and target
    key = (c.opcode, f"{c.operand_shape} -> {c.result_shape}", n, c.asynchronous)
    count, each = out.get(key, (0, bytes_moved(c.opcode, c.operand_bytes, c.result_bytes, n)))
    out[key] = (count + mult, each)


def _collect(module: hlo.Module, comp: str, mult: int, out: dict, devices: int, seen: tuple = ()) -> None:
    """Adds the collectives of `comp` and what it calls, each times `mult` (nested loops' trip
    counts; a loop whose exit depends on data counts once), into out[(opcode, shapes, n)]."""
    if comp in seen:
        return
    for i in module.comps.get(comp, []):
        _instr(module, i, mult, out, devices, seen + (comp,))


def _instr(module: hlo.Module, i: hlo.Instr, mult: int, out: dict, devices: int, seen: tuple = ()) -> None:
    """Adds one instruction's collectives and those of what it calls (of a conditional's
    branches, only one runs: the one that sends the most) into `out`."""
    _add(module, i, mult, out, devices)
    inner = mult * ((module.trip_count(i) or 1) if i.opcode == "while" else 1)
    if i.opcode == "conditional":
        branches = []
        for name in i.called:
            branches.append({})
            _collect(module, name, inner, branches[-1], devices, seen)
        most = max(branches, key=lambda b: sum(c * e for c, e in b.values()), default={})
        for key, (count, each) in most.items():
            out[key] = (out.get(key, (0, each))[0] + count, each)
        return
    for name in i.called:
        _collect(module, name, inner, out, devices, seen)


def traffic(text: str, devices: int) -> tuple[list[Traffic], list[Traffic]]:
    """(per call, per iteration of the entry's data-dependent loops) collectives of HLO text,
    largest total first: per call counts everything a call runs once (loops of known trip count
    times it), per iteration one step of a loop whose exit depends on data (the decode loop).
    devices: chips of the program (a group of '{}' is all of them)."""
    module = hlo.Module(text)
    once, per_step = {}, {}
    for i in module.comps.get(module.entry, []):
        data_loop = i.opcode == "while" and module.trip_count(i) is None
        target = per_step if data_loop else once
        _instr(module, i, 1, target, devices)
    def as_list(d):
        items = (Traffic(op, shapes, n, count, each, a) for (op, shapes, n, a), (count, each) in d.items())
        return sorted(items, key=lambda t: -t.total)
    return as_list(once), as_list(per_step)


def total_bytes(items: list[Traffic], asynchronous: bool | None = None) -> float:
    """Bytes sent per chip by `items` (only the asynchronous ones, or only the others)."""
    return sum(t.total for t in items if asynchronous is None or t.asynchronous == asynchronous)


# A synchronous collective's fixed cost on the ICI whatever its bytes (launch, the hops of a small
# all-reduce across a slice): a stated figure, not a measurement. It matters where collectives are
# many and small: tensor-parallel decode all-reduces each layer's attention and MLP outputs at
# every decode step (2 x 28 per step for the 1.5B).
COLLECTIVE_LATENCY_S = 10e-6


def sync_count(items: list[Traffic]) -> int:
    """The synchronous collectives among `items`, each counted per its count."""
    return sum(t.count for t in items if not t.asynchronous)


def ici_seconds(nbytes: float, bidirectional: float) -> float:
    """Seconds to send `nbytes` from one chip at half its bidirectional ICI bandwidth (what a chip
    sends it also receives; every link of the chip busy: a lower bound, a ring over one torus
    axis uses only some of them)."""
    return nbytes / (bidirectional / 2) if bidirectional else 0.0


GiB = 2**30


def tables(programs: dict, chips: int, chip,
                      calls: dict[str, float] | None = None, top: int = 6) -> list[str]:
    """Markdown: per program (tpu_plan.ProgramPlan, keyed by name) its `top` collectives ranked by
    bytes sent per chip per call (ici: each collective by its own formula, loops times their trip
    counts; the decode loop's per decode step), with calls: their bytes per HBPO step ({program:
    calls per step; "decode": decode calls and steps, as (calls, steps)}) and the time at the chip's ICI bandwidth."""
    bw = chip.ici_bandwidth
    head = ("ICI per chip, bytes sent (ici: all-gather (n-1)/n x result, reduce-scatter and all-to-all "
            "(n-1)/n x operand, all-reduce 2(n-1)/n x operand, collective-permute its operand; n the group), "
            "every loop's collectives times its trip count; ms at "
            + (f"{bw / 1e9:,.0f} GB/s bidirectional per chip, half each way ({chip.source}): a lower bound, "
               "every link of the chip busy." if bw else "no ICI figure for this chip: times left out."))
    lines = [head, "| program | collective | operand -> result | n | count per call | MiB each | MiB per call "
             "| per step: count | GiB | ms |", "|---" * 10 + "|"]
    for k, p in programs.items():
        if p.error:
            continue
        if calls is not None and not calls.get(k):
            lines.append(f"| {k}: not run in a step of this config | | | | | | | 0 | 0.00 | 0.0 |")
            continue
        once, per_iter = traffic(p.text, chips)
        n_calls, n_steps = 1.0, 0.0
        if calls is not None:
            n_calls, n_steps = calls.get(k, (0.0, 0.0)) if k == "decode" else (calls.get(k, 0.0), 0.0)
        rows = [(c, "call", n_calls) for c in once] + [(c, "decode step", n_steps) for c in per_iter]
        rows.sort(key=lambda r: -r[0].total * (r[2] if calls is not None else 1.0))
        for c, per, n in rows[:top]:
            step = f"{c.count * n:,.0f} | {c.total * n / GiB:.2f} | {ici_seconds(c.total * n, bw) * 1e3:.1f}" \
                if calls is not None else "| |"
            lines.append(f"| {k} | {c.opcode}{' (async)' if c.asynchronous else ''} | {c.shapes} | {c.n} "
                         f"| {c.count:,} per {per} | {c.each / 2**20:.2f} "
                         f"| {c.total / 2**20:,.1f} | {step} |")
        total = n_calls * total_bytes(once) + n_steps * total_bytes(per_iter)
        more = f" ({len(rows) - top} more kinds)" if len(rows) > top else ""
        lines.append(f"| {k}: all{more} | | | | {sum(c.count for c in once):,} per call"
                     + (f" + {sum(c.count for c in per_iter):,} per decode step" if per_iter else "")
                     + f" | | {total_bytes(once) / 2**20:,.1f} | "
                     + (f"| {total / GiB:.2f} | {ici_seconds(total, bw) * 1e3:.1f} |"
                        if calls is not None else "| | |"))
    return lines
