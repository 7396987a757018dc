"""A loop-aware count of a compiled program's matmul flops and memory traffic from its HLO (hlo).

Why: XLA's `cost_analysis()` counts a while loop's body once, whatever its trip count (checked
for XLA:TPU: a `lax.scan` of 1, 4 or 16 matmuls reports the same flops). The train step scans
over its micro-batches and layers and the log-prob passes map over vocabulary chunks, so their
flops and bytes would be a fraction of the real ones. `loop_cost` walks the HLO counting each loop
body once (as XLA does), and again with each body times its trip count, keeping apart one
iteration of a loop whose exit depends on data (the sampler's decode loop); the ratios scale
XLA's figures (LoopCost.scale). XLA counts nothing for a Pallas kernel (a custom call); the walk
counts those by what they are (kernel_cost) and adds them to XLA's figures.

The cost model of the walk: flops = 2 x multiply-adds of every dot and convolution (XLA:TPU
writes batched matmuls as convolutions; within 0.5% of XLA's flops on the 1.5B programs, without
the kernels); bytes = HBM traffic: operands + outputs of every unfused instruction and fusion,
arrays padded to their layout's tile, where a fusion operand read only through (dynamic-)slices
(looking through bitcasts and nested fusions) counts the slices, an in-place dynamic-update-slice
or scatter counts its update, and arrays that memory-space assignment placed on chip (hlo.on_chip:
VMEM) count nothing but the copy-start that brings them from or takes them to HBM. XLA's own
"bytes accessed" counts the on-chip operands too (the 1.5B update on v5p:2x2x4, remat "dots": the
walk finds 3.18 TB counting them and its AllocateBuffer reservations, which write nothing; 2.43 TB
in HBM), so the plan's bytes are the walk's, not XLA's scaled.
"""
from __future__ import annotations

import dataclasses
import math
import re

import numpy as np

from hbpo_jax.plan.hlo import Instr, Module, array_shapes, array_texts, shape_bytes


def _hbm(shape: str) -> float:
    """Bytes of a shape's arrays that live in HBM (hlo.on_chip ones move no HBM bytes)."""
    return shape_bytes(shape, hbm_only=True)


_NO_TRAFFIC = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "while", "call",
               "conditional", "after-all", "partition-id", "replica-id", "iota", "async-update",
               "opt-barrier", "add-dependency"}
_SLICES = {"dynamic-slice", "slice", "gather"}


def _dims(shape: str) -> tuple[int, ...]:
    arrays = array_shapes(shape)
    return arrays[0][1] if arrays else ()


def dot_flops(module: Module, instr: Instr) -> float:
    """2 x multiply-adds of a dot or convolution (0 for anything else)."""
    if instr.opcode == "dot":
        lhs = _dims(module.by_name[instr.operands[0]].shape)
        m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", instr.attrs)
        contract = math.prod(lhs[int(d)] for d in m.group(1).split(",") if d) if m else 1
        return 2.0 * math.prod(_dims(instr.shape)) * contract
    if instr.opcode == "convolution":
        return 2.0 * _conv_fmas(_dims(module.by_name[instr.operands[0]].shape),
                                _dims(module.by_name[instr.operands[1]].shape), _dims(instr.shape), instr.attrs)
    return 0.0


def _window_field(window: str, key: str, n: int, default: str) -> list[str]:
    m = re.search(rf"\b{key}=(\S+)", window)
    return m.group(1).split("x") if m else [default] * n


def _conv_fmas(lhs, rhs, out, attrs: str) -> float:
    """Multiply-adds of a convolution as XLA counts them: batch x input features (per group) x
    output features x, per spatial dimension, the (output, kernel) position pairs that land on a
    real input element (not padding, not a dilation hole). XLA:TPU writes batched matmuls as
    convolutions whose windows, strides and dilations encode batch dimensions, so every term
    matters."""
    m = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", attrs)
    if not m:
        return 0.0
    lhs_l, rhs_l, out_l = m.groups()
    digits = sorted((c for c in rhs_l if c.isdigit()), key=int)
    window = (re.search(r"window=\{([^}]*)\}", attrs) or re.match("()", "")).group(1)
    n = len(digits)
    stride = _window_field(window, "stride", n, "1")
    pad = _window_field(window, "pad", n, "0_0")
    lhs_dil = _window_field(window, "lhs_dilate", n, "1")
    rhs_dil = _window_field(window, "rhs_dilate", n, "1")
    fmas = out[out_l.index("b")] * rhs[rhs_l.index("i")] * rhs[rhs_l.index("o")]
    for j, d in enumerate(digits):
        fmas *= _valid_pairs(lhs[lhs_l.index(d)], rhs[rhs_l.index(d)], out[out_l.index(d)], int(stride[j]),
                             int(pad[j].split("_")[0]), int(lhs_dil[j]), int(rhs_dil[j]))
    return float(fmas)


def _valid_pairs(size: int, window: int, out: int, stride: int, pad_low: int, lhs_dilate: int,
                 rhs_dilate: int) -> int:
    """(output position, kernel position) pairs of one spatial dimension whose input index
    o * stride - pad_low + k * rhs_dilate falls on an input element of the lhs-dilated input."""
    dilated = (size - 1) * lhs_dilate + 1
    o = np.arange(out)
    total = 0
    for k in range(window):
        idx = o * stride - pad_low + k * rhs_dilate
        total += int(np.count_nonzero((idx >= 0) & (idx < dilated) & (idx % lhs_dilate == 0)))
    return total


_IN_PLACE = {"dynamic-update-slice": 1, "scatter": 2}  # in-place update ops: their update operand


def _users(comp: list) -> dict[str, list[Instr]]:
    users: dict[str, list[Instr]] = {}
    for i in comp:
        for o in i.operands:
            users.setdefault(o, []).append(i)
    return users


def _value_reads(module: Module, comp: list, users: dict, name: str) -> float | None:
    """Bytes a fused computation reads of its value `name` when that is less than all of it:
    the slices taken where every use is a (dynamic-)slice, looking through bitcasts and into
    nested fusions; nothing for the operand that an in-place update writes into. None: all of it."""
    if any(i.root and i.name == name for i in comp):  # passed on whole to the fusion's user
        return None
    total = 0.0
    for u in users.get(name, []):
        if u.opcode == "bitcast":
            part = _value_reads(module, comp, users, u.name)
        elif u.opcode in _SLICES and u.operands[0] == name:
            part = _hbm(u.shape)
        elif u.opcode in _IN_PLACE and u.operands[0] == name and name not in u.operands[1:]:
            part = 0.0
        elif u.opcode == "fusion":
            inner = module.comps.get(u.attr("calls"), [])
            params = {i.number: i.name for i in inner if i.opcode == "parameter"}
            inner_users = _users(inner)
            parts = [_value_reads(module, inner, inner_users, params[k]) if k in params else None
                     for k, o in enumerate(u.operands) if o == name]
            part = None if None in parts else sum(parts)
        else:
            part = None
        if part is None:
            return None
        total += part
    return total


def _fusion_bytes(module: Module, instr: Instr) -> float:
    """Memory traffic of one fusion: operands (only the slices read, where a parameter is read
    only through slices, nested fusions included) plus the output (only the update of an in-place
    dynamic-update-slice or scatter)."""
    comp = module.comps.get(instr.attr("calls"), [])
    params = {i.number: i for i in comp if i.opcode == "parameter"}
    users = _users(comp)
    root = next((i for i in comp if i.root), None)
    outs = [module.by_name.get(o) for o in root.operands] if root is not None and root.opcode == "tuple" else [root]
    total = 0.0
    for o in outs:
        if o is None:
            continue
        written = _IN_PLACE.get(o.opcode)
        total += _hbm(module.by_name[o.operands[written]].shape) if written else _hbm(o.shape)
    for idx, name in enumerate(instr.operands):
        p = params.get(idx)
        part = _value_reads(module, comp, users, p.name) if p is not None and users.get(p.name) else None
        if part is None:
            part = _hbm(module.by_name[name].shape) if name in module.by_name else 0.0
        total += part
    return total


def is_kernel(instr: Instr) -> bool:
    """A Pallas TPU kernel: a custom call XLA cannot see into (its cost_analysis counts nothing)."""
    return instr.opcode == "custom-call" and 'custom_call_target="tpu_custom_call"' in instr.attrs


# Matmuls per (query, key) pair of splash attention's kernels: forward s = qk, o = pv; dkv
# recomputes s and forms dp, dv, dk (+ dq when fused, its outputs then (dq, dk, dv)); dq: s, dp, dq.
_SPLASH_MATMULS = {"fwd": 2, "dkv": 4, "dq": 3}


def causal_block_fraction(rows: int, cols: int) -> float:
    """The share of a [rows, cols] block grid over a square causal mask that a kernel computes: the
    blocks holding any query-key pair on or below the diagonal (query block i of T / rows
    positions, key block j of T / cols). Square grids: (n + 1) / 2n."""
    # In units of 1 / (rows x cols) of T: query block i ends at (i + 1) cols - 1, key block j
    # starts at j rows.
    hit = sum(min(cols, ((i + 1) * cols - 1) // rows + 1) for i in range(rows))
    return hit / (rows * cols)


def kernel_cost(module: Module, instr: Instr) -> tuple[float, float]:
    """(flops, bytes) of a Pallas kernel (is_kernel), by what the kernel is.

    jax's paged attention (operands: lengths [S], page table [S x W], ..., q [S, H, 1, D],
    k_pages, v_pages [K, P, page, D]): the pool is an operand whole (every layer's pages), but the
    kernel reads only the pages its table lists up to each slot's length; counted at the most it
    can read (every slot's table full, as at the length cap): table entries x a page of every kv
    head, keys and values. Splash attention (q [B, H, T, D], k [B, K, S, D], and an [1, nq, nk]
    block grid): operands and outputs, and the matmuls of the causal blocks it computes, those on
    and below the diagonal (hbpo_jax.models.splash builds only causal masks). Any other kernel:
    operands and outputs, no flops."""
    shapes = [module.by_name[o].shape for o in instr.operands if o in module.by_name]
    out = _hbm(instr.shape)
    if instr.name.startswith("paged_attention"):
        (_, table), (_, q), (_, pool) = (array_shapes(shapes[i])[0] for i in (1, -3, -1))
        page = shape_bytes(shapes[-1], tiled=False) / pool[1]  # one page index, every kv head
        tokens = math.prod(table) * pool[2]  # every slot's table full
        flops = 2 * 2 * q[1] * tokens * q[-1]  # each slot's heads over its own tokens: q.k and p.v
        return flops, out + sum(map(_hbm, shapes[:-2])) + 2 * math.prod(table) * page
    nbytes = out + sum(map(_hbm, shapes))
    phase = re.match(r"splash_\w+?_(fwd|dkv|dq)", instr.name)
    if not phase:
        return 0.0, nbytes
    arrays = [a for sh in shapes for a in array_shapes(sh)[:1]]
    floats = [dims for dtype, dims in arrays if dtype in ("bf16", "f16", "f32") and len(dims) >= 3]
    grid = next((dims[-2:] for dtype, dims in arrays if dtype == "s8" and len(dims) >= 2), None)
    if len(floats) < 2:  # not the layout this count knows: its bytes only
        return 0.0, nbytes
    q, k = floats[:2]  # q [(B,) H, T, D], k [(B,) K, S, D]: the batch is vmapped, absent when 1
    causal = causal_block_fraction(*grid) if grid else 0.5
    matmuls = _SPLASH_MATMULS[phase.group(1)] + (phase.group(1) == "dkv" and len(array_shapes(instr.shape)) >= 3)
    return 2.0 * matmuls * math.prod(q[:-1]) * k[-2] * q[-1] * causal, nbytes


def _comp_flops(module: Module, comp: str, memo: dict) -> float:
    """Dot flops of a fused computation and the fusions inside it (no loops inside fusions)."""
    if comp not in memo:
        memo[comp] = sum(dot_flops(module, i) + sum(_comp_flops(module, c, memo) for c in i.called
                                                    if i.opcode == "fusion")
                         for i in module.comps.get(comp, []))
    return memo[comp]


def _traffic(module: Module, instr: Instr) -> float:
    """Bytes one unfused instruction moves: operands + output, except an in-place
    dynamic-update-slice (its update, read and written) and an async '-start' (the buffer it
    fills, read and written: its result tuple repeats the operands); '-done' moves nothing."""
    operands = sum(_hbm(module.by_name[o].shape) for o in instr.operands if o in module.by_name)
    written = _IN_PLACE.get(instr.opcode)
    if written and len(instr.operands) > written:
        return 2 * _hbm(module.by_name[instr.operands[written]].shape)
    if instr.opcode == "copy-start":  # (destination, source, context): the HBM side(s) of the copy
        return _hbm(array_texts(instr.shape)[0]) + operands
    if instr.opcode.endswith("-start"):
        return 2 * max(_hbm(instr.shape) - operands, 0.0)
    if instr.opcode == "custom-call" and 'custom_call_target="AllocateBuffer"' in instr.attrs:
        return 0.0  # a buffer reserved, nothing written
    if instr.opcode.endswith("-done"):
        return 0.0
    return _hbm(instr.shape) + operands


@dataclasses.dataclass(frozen=True)
class Mover:
    """One instruction's share of a program's traffic: its flops and HBM bytes per call of the
    program (times the trip counts of the loops around it: `calls`), what it is, and the JAX
    operation it came from (the op_name of its metadata, where XLA kept one)."""

    flops: float
    bytes: float
    calls: int
    opcode: str
    shape: str
    source: str


def _movers(module: Module, comp: str, mult: int, trips: bool, kernels_only: bool, skip_data_loops: bool,
            memo: dict):
    """Yields a Mover for every instruction of `comp` that computes or moves bytes, looking
    into loops (times their trip count when `trips`; a data-dependent exit once, or left out of
    `comp` itself with skip_data_loops), calls and a conditional's costliest branch."""
    for i in module.comps.get(comp, []):
        if i.opcode == "while":
            known = module.trip_count(i)
            if known is None and skip_data_loops:
                continue
            n = (known or 1) if trips else 1
            yield from _movers(module, i.attr("body"), mult * n, trips, kernels_only, False, memo)
        elif is_kernel(i):
            f, b = kernel_cost(module, i)
            yield Mover(mult * f, mult * b, mult, "kernel", i.shape, _source(i))
        elif i.opcode == "conditional":  # one branch runs: the costliest (the update's full micro-batch)
            branches = [list(_movers(module, c, mult, trips, kernels_only, False, memo)) for c in i.called]
            yield from max(branches, key=lambda ms: (sum(m.flops for m in ms), sum(m.bytes for m in ms)), default=[])
        elif i.opcode in ("call", "async-start") or (i.opcode == "custom-call" and i.called):
            for c in i.called:
                yield from _movers(module, c, mult, trips, kernels_only, False, memo)
        elif kernels_only:
            continue
        elif i.opcode == "fusion":
            yield Mover(mult * _comp_flops(module, i.attr("calls"), memo), mult * _fusion_bytes(module, i), mult,
                        _fusion_kind(module, i), i.shape, _source(i))
        elif i.opcode not in _NO_TRAFFIC:
            yield Mover(mult * dot_flops(module, i), mult * _traffic(module, i), mult, i.opcode, i.shape, _source(i))


def walk_cost(module: Module, comp: str | None = None, *, trips: bool = True,
              skip_data_loops: bool = False, kernels_only: bool = False) -> tuple[float, float]:
    """(flops, bytes) of a computation (default: the entry), a conditional by its costliest
    branch, each loop body counted times its trip count (trips=True; a data-dependent exit
    counts once) or once (trips=False: how XLA's cost_analysis counts). skip_data_loops: leave
    out the data-dependent loops of `comp` itself; kernels_only: count only the Pallas kernels
    (kernel_cost)."""
    movers = list(_movers(module, comp or module.entry, 1, trips, kernels_only, skip_data_loops, {}))
    return sum(m.flops for m in movers), sum(m.bytes for m in movers)


def serial_seconds(module: Module, peak_flops: float, hbm_bandwidth: float, comp: str | None = None) -> float:
    """Seconds of one call of `comp` (default: the entry) with each instruction at its own
    roofline, max(flops / peak, bytes / bandwidth), one after another: the program's roofline
    without the overlap of one instruction's memory traffic with another's matmuls that the
    whole-program roofline assumes. A memory-bound fusion (an elementwise pass, a reduce) costs
    its bytes here even when the program as a whole is compute bound. Collectives count their HBM
    bytes, not their ICI time."""
    movers = _movers(module, comp or module.entry, 1, True, False, False, {})
    return sum(max(m.flops / peak_flops, m.bytes / hbm_bandwidth) for m in movers)


def top_movers(module: Module, n: int = 20, comp: str | None = None) -> list[Mover]:
    """The `n` instructions that move the most HBM bytes in one call of `comp` (default: the
    entry), each times the trip counts of the loops around it: where the roofline's bytes come
    from."""
    moving = (m for m in _movers(module, comp or module.entry, 1, True, False, False, {}) if m.bytes > 0)
    return sorted(moving, key=lambda m: -m.bytes)[:n]


def _source(instr: Instr) -> str:
    m = re.search(r'op_name="([^"]*)"', instr.attrs)
    return m.group(1) if m else ""


def _fusion_kind(module: Module, instr: Instr) -> str:
    """'fusion(dot)' / 'fusion(convolution)' for a fusion around a matmul, else 'fusion'."""
    ops = {i.opcode for i in module.comps.get(instr.attr("calls"), [])}
    core = next((k for k in ("convolution", "dot", "reduce", "scatter", "gather", "dynamic-update-slice")
                 if k in ops), "")
    return f"fusion({core})" if core else "fusion"


@dataclasses.dataclass(frozen=True)
class LoopCost:
    """A program's (flops, bytes) split by its loops, in the walk's units: `once`: everything a
    call runs once, loops of known trip count times that count; `per_iteration`: one iteration
    of the entry's data-dependent loops (the decode loop); `as_xla`: each loop body once, as
    cost_analysis counts. `kernels` holds the Pallas kernels' share of each (same order), which
    XLA's count leaves out. `scale(xla)` converts the parts into XLA's units."""

    once: tuple[float, float]
    per_iteration: tuple[float, float]
    as_xla: tuple[float, float]
    kernels: tuple[tuple[float, float], ...] = ((0.0, 0.0),) * 3

    def scale(self, xla: tuple[float, float]) -> tuple[tuple[float, float], tuple[float, float]]:
        """(once, per_iteration) in XLA's units: what XLA sees (the walk's part without kernels)
        times XLA's (flops, bytes) / the walk's as_xla without kernels, plus the kernels as the
        walk counts them. Where the walk finds nothing to compare (no dot: flops 0), all of XLA's
        figure is `once`."""
        (k_once, k_iter, k_xla) = self.kernels
        ratio = [x / (a - k) if a - k > 0 else None for x, a, k in zip(xla, self.as_xla, k_xla)]
        once = tuple((o - k) * r + k if r is not None else x + k
                     for o, k, r, x in zip(self.once, k_once, ratio, xla))
        return once, tuple((i - k) * r + k if r is not None else k
                           for i, k, r in zip(self.per_iteration, k_iter, ratio))


def loop_cost(module: Module) -> LoopCost:
    """The LoopCost of a parsed module (hlo.Module)."""
    def parts(kernels_only: bool):
        per_iteration = [walk_cost(module, loop.attr("body"), kernels_only=kernels_only)
                         for loop, n in module.loops() if n is None]
        return (walk_cost(module, skip_data_loops=True, kernels_only=kernels_only),
                tuple(map(sum, zip(*per_iteration))) if per_iteration else (0.0, 0.0),
                walk_cost(module, trips=False, kernels_only=kernels_only))
    return LoopCost(*parts(False), kernels=parts(True))

