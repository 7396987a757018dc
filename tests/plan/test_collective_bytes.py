"""Bytes each collective moves per chip (hbpo_jax.plan.ici), on hand-written HLO: each opcode's
formula, replica-group spellings, loop trip counts, async starts, a decode loop's per-step part."""
import pytest

from hbpo_jax.plan import hlo, ici

HLO = """HloModule c

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%body (p: (s32[], bf16[32,128], bf16[4,128])) -> (s32[], bf16[32,128], bf16[4,128]) {
  %p = (s32[], bf16[32,128]{1,0}, bf16[4,128]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  %w = bf16[32,128]{1,0} get-tuple-element(%p), index=1
  %x = bf16[4,128]{1,0} get-tuple-element(%p), index=2
  %ag = bf16[128,128]{1,0} all-gather(%w), channel_id=1, replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={0}
  %cp = (bf16[4,128]{1,0}, bf16[4,128]{1,0}, u32[], u32[]) collective-permute-start(%x), channel_id=2, source_target_pairs={{0,1},{1,2},{2,3},{3,0}}
  %cpd = bf16[4,128]{1,0} collective-permute-done(%cp)
  ROOT %t = (s32[], bf16[32,128]{1,0}, bf16[4,128]{1,0}) tuple(%next, %w, %cpd)
}

%cond (q: (s32[], bf16[32,128], bf16[4,128])) -> pred[] {
  %q = (s32[], bf16[32,128]{1,0}, bf16[4,128]{1,0}) parameter(0)
  %j = s32[] get-tuple-element(%q), index=0
  %n = s32[] constant(16)
  ROOT %lt = pred[] compare(%j, %n), direction=LT
}

%dbody (r: (s32[], f32[8,128])) -> (s32[], f32[8,128]) {
  %r = (s32[], f32[8,128]{1,0}) parameter(0)
  %k = s32[] get-tuple-element(%r), index=0
  %y = f32[8,128]{1,0} get-tuple-element(%r), index=1
  %ar2 = f32[8,128]{1,0} all-reduce(%y), channel_id=3, replica_groups=[2,4]<=[8], to_apply=%add
  ROOT %u = (s32[], f32[8,128]{1,0}) tuple(%k, %ar2)
}

%dcond (v: (s32[], f32[8,128])) -> pred[] {
  %v = (s32[], f32[8,128]{1,0}) parameter(0)
  %flag = pred[] constant(true)
  ROOT %go = pred[] and(%flag, %flag)
}

ENTRY %main (w0: bf16[32,128], x0: bf16[4,128], g: bf16[64,128], y0: f32[8,128], z: f32[8,16]) -> f32[8,128] {
  %w0 = bf16[32,128]{1,0} parameter(0)
  %x0 = bf16[4,128]{1,0} parameter(1)
  %g = bf16[64,128]{1,0} parameter(2)
  %y0 = f32[8,128]{1,0} parameter(3)
  %z = f32[8,16]{1,0} parameter(4)
  %zero = s32[] constant(0)
  %init = (s32[], bf16[32,128]{1,0}, bf16[4,128]{1,0}) tuple(%zero, %w0, %x0)
  %loop = (s32[], bf16[32,128]{1,0}, bf16[4,128]{1,0}) while(%init), condition=%cond, body=%body
  %rs = bf16[16,128]{1,0} reduce-scatter(%g), channel_id=4, replica_groups=mesh['x'=2,'y'=4] {'y'}, dimensions={0}, to_apply=%add
  %a2a = f32[8,16]{1,0} all-to-all(%z), channel_id=5, replica_groups={{0,1},{2,3},{4,5},{6,7}}, dimensions={0}
  %ar = f32[8,128]{1,0} all-reduce(%y0), channel_id=6, replica_groups={}, to_apply=%add
  %dinit = (s32[], f32[8,128]{1,0}) tuple(%zero, %ar)
  %decode = (s32[], f32[8,128]{1,0}) while(%dinit), condition=%dcond, body=%dbody
  ROOT %out = f32[8,128]{1,0} get-tuple-element(%decode), index=1
}
"""


def test_group_sizes():
    assert ici.group_size("{{0,1,2,3},{4,5,6,7}}", 8) == 4
    assert ici.group_size("[2,4]<=[8]", 8) == 4
    assert ici.group_size("[4,2]<=[2,4]T(1,0)", 8) == 2
    assert ici.group_size("mesh['axis_0'=8,'axis_1'=1] {'axis_0'}", 8) == 8
    assert ici.group_size("mesh['x'=2,'y'=4] {'x','y'}", 8) == 8
    assert ici.group_size("", 16) == 16 and ici.group_size("{}", 16) == 16


def test_formulas():
    assert ici.bytes_moved("all-gather", 100, 400, 4) == 300       # (n-1)/n x the result
    assert ici.bytes_moved("reduce-scatter", 400, 100, 4) == 300   # (n-1)/n x the operand
    assert ici.bytes_moved("all-reduce", 400, 400, 4) == 600       # 2 (n-1)/n: reduce-scatter + all-gather
    assert ici.bytes_moved("all-to-all", 400, 400, 4) == 300
    assert ici.bytes_moved("collective-permute", 400, 400, 4) == 400
    assert ici.bytes_moved("all-reduce", 400, 400, 1) == 0          # a group of one moves nothing
    with pytest.raises(ValueError):
        ici.bytes_moved("add", 1, 1, 2)
    assert ici.ici_seconds(600e9, 1200e9) == pytest.approx(1.0)    # half the bidirectional figure each way


def test_traffic_of_a_program():
    once, per_step = ici.traffic(HLO, devices=8)
    got = {(t.opcode, t.n, t.count, t.asynchronous): t.each for t in once}
    assert got == {
        ("all-gather", 4, 16, False): 0.75 * 128 * 128 * 2,        # in a 16-trip loop: 16 per call
        ("collective-permute", 2, 16, True): 4 * 128 * 2,          # async start, its operand, to one peer
        ("reduce-scatter", 4, 1, False): 0.75 * 64 * 128 * 2,      # the mesh axis y of 4
        ("all-to-all", 2, 1, False): 0.5 * 8 * 16 * 4,
        ("all-reduce", 8, 1, False): 2 * 7 / 8 * 8 * 128 * 4,     # {}: every chip
    }
    # The decode loop's exit depends on data: its all-reduce is per iteration, groups of 4.
    assert [(t.opcode, t.n, t.count, t.each) for t in per_step] == [("all-reduce", 4, 1, 2 * 0.75 * 8 * 128 * 4)]
    assert once[0].opcode == "all-gather" and once[0].total == 16 * 0.75 * 128 * 128 * 2  # largest first
    assert ici.total_bytes(once, asynchronous=True) == 16 * 4 * 128 * 2
    assert ici.total_bytes(once) == sum(t.total for t in once)
    # The async start's result is the array after its operand, not a context scalar.
    module = hlo.Module(HLO)
    start = hlo.collective(module, module.by_name["cp"])
    assert start.result_shape == "bf16[4,128]" and start.asynchronous


# The packed update's switch: a micro-batch runs one branch (skip, half or full width), so a
# conditional costs its costliest branch, not the sum of them.
SWITCH = """HloModule s

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%skip (x: f32[64,128]) -> f32[64,128] {
  ROOT %x = f32[64,128]{1,0} parameter(0)
}

%half (x: f32[64,128]) -> f32[64,128] {
  %x = f32[64,128]{1,0} parameter(0)
  %h = f32[32,128]{1,0} slice(%x), slice={[0:32], [0:128]}
  %r = f32[32,128]{1,0} all-reduce(%h), replica_groups={{0,1,2,3}}, to_apply=%add
  ROOT %p = f32[64,128]{1,0} pad(%r, %z), padding=0_32x0_0
}

%full (x: f32[64,128]) -> f32[64,128] {
  %x = f32[64,128]{1,0} parameter(0)
  ROOT %r = f32[64,128]{1,0} all-reduce(%x), replica_groups={{0,1,2,3}}, to_apply=%add
}

ENTRY %main (i: s32[], x: f32[64,128]) -> f32[64,128] {
  %i = s32[] parameter(0)
  %x = f32[64,128]{1,0} parameter(1)
  ROOT %c = f32[64,128]{1,0} conditional(%i, %x, %x, %x), branch_computations={%skip, %half, %full}
}
""".replace("pad(%r, %z)", "pad(%r, %r)")


def test_a_conditional_costs_its_costliest_branch():
    from hbpo_jax.plan import hlo_cost
    once, _ = ici.traffic(SWITCH, devices=4)
    assert [(t.opcode, t.count) for t in once] == [("all-reduce", 1)]  # the full branch's, not the half's too
    assert once[0].each == pytest.approx(2 * 3 / 4 * 64 * 128 * 4)
    module = hlo.Module(SWITCH)
    branches = [hlo_cost.walk_cost(module, b)[1] for b in ("skip", "half", "full")]
    assert hlo_cost.walk_cost(module)[1] == max(branches) < sum(branches)
