"""Reading a compiled program's optimised HLO text (`compiled.as_text()`): its computations and
instructions, array shapes and their bytes as stored, while loops with their trip counts, and the
collectives inside a loop body (hlo_cost counts flops and bytes on top of this).

Trip counts are read from the loop's condition (`counter < constant`, the counter starting at a
constant, stepping by a constant: how `lax.scan` / `fori_loop` lower); a loop whose exit depends
on data (the sampler's decode loop) has none.
"""
from __future__ import annotations

import dataclasses
import math
import re

DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "s32": 4,
               "u32": 4, "s64": 8, "u64": 8, "bf16": 2, "f16": 2, "f32": 4, "f64": 8, "c64": 8,
               "c128": 16}
_ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16|c64|c128|f8e\w+)\[([\d,]*)\](\{[^}]*\})?")
_INSTR = re.compile(r"^\s*(ROOT\s+)?%([\w.\-]+)\s*=\s*(.*)$")
_CALLED = re.compile(r"\b(calls|to_apply|body|condition)=%([\w.\-]+)")
_CALLED_LIST = re.compile(r"\b(branch_computations|called_computations)=\{([^}]*)\}")
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute",
               "ragged-all-to-all")


@dataclasses.dataclass
class Instr:
    """One HLO instruction: name, result shape text, opcode, operand names, the text between
    the operand parentheses (a constant's value, a parameter's number), attribute text."""

    name: str
    shape: str
    opcode: str
    operands: list
    args: str
    attrs: str
    root: bool = False

    @property
    def number(self) -> int | None:
        """The integer in the parentheses (constant(16) -> 16, parameter(0) -> 0), else None."""
        m = re.fullmatch(r"\s*(-?\d+)\s*", self.args)
        return int(m.group(1)) if m else None

    @property
    def called(self) -> list:
        """Names of the computations this instruction calls (fusion, loop, reducer, branches)."""
        names = [m.group(2) for m in _CALLED.finditer(self.attrs)]
        for m in _CALLED_LIST.finditer(self.attrs):
            names += [n.strip().lstrip("%") for n in m.group(2).split(",") if n.strip()]
        return names

    def attr(self, key: str) -> str | None:
        m = re.search(rf"\b{key}=%([\w.\-]+)", self.attrs)
        return m.group(1) if m else None


def array_shapes(shape: str) -> list[tuple[str, tuple[int, ...]]]:
    """The arrays of a shape text, tuples flattened: 'bf16[2,3]{1,0}' -> [('bf16', (2, 3))]."""
    return [(t, tuple(int(d) for d in dims.split(",") if d)) for t, dims, _ in _ARRAY.findall(shape)]


def array_texts(shape: str) -> list[str]:
    """Each array of a shape text as its own text, tuples flattened: '(f32[2]{0}, s32[])' ->
    ['f32[2]{0}', 's32[]']."""
    return [m.group(0) for m in _ARRAY.finditer(shape)]


def _tiled(dims: tuple[int, ...], layout: str) -> tuple[int, ...]:
    """dims padded to the layout's first tile: '{1,0:T(8,128)(2,1)}' pads the minor dimension to
    a multiple of 128 and the next to a multiple of 8 (how XLA:TPU stores an array)."""
    minor_to_major, _, rest = layout.strip("{}").partition(":")
    tile = re.match(r"T\(([\d,]+)\)", rest)
    order = [int(x) for x in minor_to_major.split(",") if x]
    if not tile or not order:
        return dims
    out = list(dims)
    for axis, size in zip(order, reversed([int(x) for x in tile.group(1).split(",")])):
        out[axis] = -(-out[axis] // size) * size
    return tuple(out)


def on_chip(layout: str) -> bool:
    """Whether an array's layout puts it outside HBM: a memory space S(n), n > 0, in the layout
    ('{1,0:T(8,128)(2,1)S(1)}'). XLA's memory-space assignment moves buffers into the TPU's
    on-chip alternate memory (S(1), VMEM) with asynchronous copy-start / copy-done pairs; scalars
    live in S(2) and up (SMEM, flags). Reading or writing those costs no HBM bandwidth."""
    m = re.search(r"S\((\d+)\)", layout or "")
    return bool(m and int(m.group(1)) > 0)


def shape_bytes(shape: str, tiled: bool = True, hbm_only: bool = False) -> float:
    """Bytes of a shape text, tuples summed; tiled: as stored, each array padded to its layout's
    tile (T(8,128) on TPU); else the logical size; hbm_only: the arrays in HBM only (on_chip ones
    left out). float8 types count 1 byte."""
    return sum(math.prod(_tiled(tuple(int(x) for x in dims.split(",") if x), layout) if tiled and layout
                         else [int(x) for x in dims.split(",") if x]) * DTYPE_BYTES.get(t, 1)
               for t, dims, layout in _ARRAY.findall(shape) if not (hbm_only and on_chip(layout)))


def _matching(text: str, start: int) -> int:
    """Index just past the parenthesis group opening at text[start]."""
    depth = 0
    for i in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return i + 1
    return len(text)


def parse_instr(line: str) -> Instr | None:
    """One instruction line of HLO text, or None for anything else."""
    m = _INSTR.match(line)
    if not m:
        return None
    rest = m.group(3)
    if rest.startswith("("):
        end = _matching(rest, 0)
    else:
        end = rest.index(" ") if " " in rest else len(rest)
    shape, tail = rest[:end], rest[end:].lstrip()
    paren = tail.find("(")
    if paren < 0:
        return None
    close = _matching(tail, paren)
    operands = re.findall(r"%([\w.\-]+)", tail[paren:close])
    return Instr(m.group(2), shape, tail[:paren], operands, tail[paren + 1:close - 1], tail[close:],
                 bool(m.group(1)))


def parse_module(text: str) -> tuple[dict[str, list[Instr]], str]:
    """({computation name: its instructions}, the entry computation's name) of HLO text."""
    comps, entry, current = {}, None, None
    for line in text.splitlines():
        if current is None:
            if line.endswith("{") and " -> " in line and not line.startswith(" "):
                head = line.split("(", 1)[0].split()
                name = head[-1].lstrip("%")
                current = comps.setdefault(name, [])
                if head[0] == "ENTRY":
                    entry = name
        elif line.strip() == "}":
            current = None
        else:
            instr = parse_instr(line)
            if instr is not None:
                current.append(instr)
    return comps, entry


class Module:
    """A parsed HLO module: computations, the entry, and instruction lookup by name."""

    def __init__(self, text: str):
        self.comps, self.entry = parse_module(text)
        self.by_name = {i.name: i for instrs in self.comps.values() for i in instrs}

    def reachable(self, comp: str) -> list[str]:
        """`comp` and every computation it calls, transitively (each once)."""
        seen, stack = {}, [comp]
        while stack:
            c = stack.pop()
            if c in seen or c not in self.comps:
                continue
            seen[c] = None
            stack += [n for i in self.comps[c] for n in i.called]
        return list(seen)

    def _through_copies(self, name: str) -> Instr | None:
        instr = self.by_name.get(name)
        while instr is not None and instr.opcode in ("copy", "bitcast", "convert") and instr.operands:
            instr = self.by_name.get(instr.operands[0])
        return instr

    def _constant(self, name: str) -> int | None:
        instr = self._through_copies(name)
        return instr.number if instr is not None and instr.opcode == "constant" else None

    def _counter_index(self, name: str) -> int | None:
        instr = self._through_copies(name)
        if instr is None or instr.opcode != "get-tuple-element":
            return None
        m = re.search(r"index=(\d+)", instr.attrs)
        return int(m.group(1)) if m else None

    def trip_count(self, loop: Instr) -> int | None:
        """Iterations of a while loop `counter < C` (or `C > counter`) whose counter starts at a
        constant and steps by a constant; None when the exit depends on data."""
        cond, body = loop.attr("condition"), loop.attr("body")
        root = next((i for i in self.comps.get(cond, []) if i.root), None)
        if root is None or root.opcode != "compare" or len(root.operands) != 2:
            return None
        direction = re.search(r"direction=(\w+)", root.attrs)
        a, b = root.operands
        if direction and direction.group(1) == "GT":
            a, b = b, a
        elif not direction or direction.group(1) != "LT":
            return None
        k, limit = self._counter_index(a), self._constant(b)
        init = self.by_name.get(loop.operands[0]) if loop.operands else None
        if k is None or limit is None or init is None or init.opcode != "tuple" or k >= len(init.operands):
            return None
        start = self._constant(init.operands[k])
        body_root = next((i for i in self.comps.get(body, []) if i.root), None)
        step = None
        if body_root is not None and body_root.opcode == "tuple" and k < len(body_root.operands):
            inc = self._through_copies(body_root.operands[k])
            if inc is not None and inc.opcode == "add" and len(inc.operands) == 2:
                step = next((s for s in map(self._constant, inc.operands) if s is not None), None)
        if start is None or not step or step < 0:
            return None
        return max(0, -(-(limit - start) // step))

    def loops(self, comp: str | None = None) -> list[tuple[Instr, int | None]]:
        """(while instruction, trip count or None) of the loops directly in `comp` (the entry)."""
        return [(i, self.trip_count(i)) for i in self.comps.get(comp or self.entry, []) if i.opcode == "while"]


# ----------------------------------------------------------------------------- collectives

@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective instruction: opcode ('all-gather', ...; an async '-start' folded in),
    operand and result shapes as HLO text, bytes of each (per chip), its replica groups;
    asynchronous: a '-start' (it runs while other instructions do)."""

    opcode: str
    operand_shape: str
    result_shape: str
    operand_bytes: float
    result_bytes: float
    groups: str
    asynchronous: bool = False


def collective(module: Module, instr: Instr) -> Collective | None:
    """The Collective of one instruction (an async '-start' read as its collective), or None."""
    op = instr.opcode.removesuffix("-start")
    if op not in COLLECTIVES:
        return None
    operands = [module.by_name[o].shape for o in instr.operands if o in module.by_name]
    result = instr.shape
    if instr.opcode.endswith("-start") and array_shapes(result):
        # async start: (operand(s), result(s)[, context scalars]) tuple; the result follows the
        # operands (a collective-permute-start's tuple ends in two u32[] contexts)
        arrays = array_shapes(result)
        n_ops = sum(len(array_shapes(o)) for o in operands) or len(arrays) // 2
        result = " ".join(f"{t}[{','.join(map(str, d))}]" for t, d in arrays[n_ops:2 * n_ops])
    groups = re.search(r"replica_groups=(mesh\[[^\]]*\] \{[^}]*\}|\{\{.*?\}\}|\[[\d,]+\]<=\[[\d,]+\]\S*?)(?:,|$)",
                       instr.attrs)
    short = lambda s: " ".join(f"{t}[{','.join(map(str, d))}]" for t, d in array_shapes(s))  # noqa: E731
    return Collective(op, short(" ".join(operands)), short(result),
                      sum(shape_bytes(o, tiled=False) for o in operands), shape_bytes(result, tiled=False),
                      groups.group(1) if groups else "", instr.opcode.endswith("-start"))


def collectives_in(module: Module, comp: str, *, trips: bool = False) -> list[Collective]:
    """The collectives in `comp` and every computation it calls (fusions, nested loops): each
    instruction once, or (trips) a nested loop's times its known trip count (the layer scan
    inside a decode step runs its body once per decoder layer)."""
    if not trips:
        return [x for c in module.reachable(comp) for x in map(lambda i: collective(module, i), module.comps[c]) if x]
    out = []
    for i in module.comps.get(comp, []):
        out += [x for x in [collective(module, i)] if x is not None]
        inner = [x for n in i.called for x in collectives_in(module, n, trips=True)]
        out += inner * ((module.trip_count(i) or 1) if i.opcode == "while" else 1)
    return out


def loop_collectives(text: str) -> dict[str, list[Collective]]:
    """{while loop name: the collectives of its body and condition, run once per iteration (a
    nested loop's times its trips)} for every while loop of the entry of HLO text (the decode loop)."""
    module = Module(text)
    return {loop.name: [x for n in loop.called for x in collectives_in(module, n, trips=True)]
            for loop, _ in module.loops()}


def group_collectives(items: list[Collective]) -> list[tuple[Collective, int]]:
    """(collective, how many) per distinct (opcode, operand shape, result shape), largest first."""
    counts: dict = {}
    for c in items:
        key = (c.opcode, c.operand_shape, c.result_shape)
        counts[key] = (counts.get(key, (c, 0))[0], counts.get(key, (c, 0))[1] + 1)
    return sorted(counts.values(), key=lambda cn: -max(cn[0].operand_bytes, cn[0].result_bytes) * cn[1])
