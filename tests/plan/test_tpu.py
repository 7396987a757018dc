"""The TPU plan instrument (hbpo_jax.plan.tpu, hlo): the pure parts (chip table, HLO
parsing, loop trip counts, convolution flops, the projection) everywhere; a compile of a small
model for a TPU topology only where libtpu is installed (`pip install -e ".[tpu]"`), skipped
otherwise."""
import math
import pathlib
import sys

import pytest

from hbpo_jax import spec
from hbpo_jax.plan import hlo, hlo_cost
from hbpo_jax.plan import programs as plan
from hbpo_jax.plan import tpu as tpu_plan

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from configs import qwen1_5b, tiny  # noqa: E402

# A while loop of 16 iterations: all-gather of a [32, 128] shard, a [8,128] x [128,128] dot and an
# all-reduce per iteration; then a loop whose exit depends on data (a decode loop).
HLO = """HloModule test, entry_computation_layout={(bf16[8,128]{1,0}, bf16[32,128]{1,0})->bf16[8,128]{1,0}}

%add (a: bf16[], b: bf16[]) -> bf16[] {
  %a = bf16[] parameter(0)
  %b = bf16[] parameter(1)
  ROOT %sum = bf16[] add(%a, %b)
}

%body (p: (s32[], bf16[8,128], bf16[32,128])) -> (s32[], bf16[8,128], bf16[32,128]) {
  %p = (s32[], bf16[8,128]{1,0}, bf16[32,128]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  %x = bf16[8,128]{1,0} get-tuple-element(%p), index=1
  %w = bf16[32,128]{1,0} get-tuple-element(%p), index=2
  %ag = bf16[128,128]{1,0} all-gather(%w), channel_id=1, replica_groups={{0,1,2,3}}, dimensions={0}
  %y = bf16[8,128]{1,0} dot(%x, %ag), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %ar = bf16[8,128]{1,0} all-reduce(%y), channel_id=2, replica_groups={{0,1,2,3}}, to_apply=%add
  ROOT %t = (s32[], bf16[8,128]{1,0}, bf16[32,128]{1,0}) tuple(%next, %ar, %w)
}

%cond (q: (s32[], bf16[8,128], bf16[32,128])) -> pred[] {
  %q = (s32[], bf16[8,128]{1,0}, bf16[32,128]{1,0}) parameter(0)
  %j = s32[] get-tuple-element(%q), index=0
  %n = s32[] constant(16)
  ROOT %lt = pred[] compare(%j, %n), direction=LT
}

%cond2 (r: (s32[], bf16[8,128], bf16[32,128])) -> pred[] {
  %r = (s32[], bf16[8,128]{1,0}, bf16[32,128]{1,0}) parameter(0)
  %k = s32[] get-tuple-element(%r), index=0
  %m = s32[] constant(16)
  %below = pred[] compare(%k, %m), direction=LT
  %flag = pred[] constant(true)
  ROOT %both = pred[] and(%below, %flag)
}

ENTRY %main (x0: bf16[8,128], w0: bf16[32,128]) -> bf16[8,128] {
  %x0 = bf16[8,128]{1,0} parameter(0)
  %w0 = bf16[32,128]{1,0} parameter(1)
  %zero = s32[] constant(0)
  %copy = s32[] copy(%zero)
  %init = (s32[], bf16[8,128]{1,0}, bf16[32,128]{1,0}) tuple(%copy, %x0, %w0)
  %loop = (s32[], bf16[8,128]{1,0}, bf16[32,128]{1,0}) while(%init), condition=%cond, body=%body
  %loop2 = (s32[], bf16[8,128]{1,0}, bf16[32,128]{1,0}) while(%init), condition=%cond2, body=%body
  ROOT %out = bf16[8,128]{1,0} get-tuple-element(%loop), index=1
}
"""


def test_chip_table():
    assert tpu_plan.chip_for("v5p:2x2x4").peak_flops == 459e12
    assert tpu_plan.chip_for("v5e:4x4").hbm_bandwidth == 819e9
    assert tpu_plan.chip_for("TPU v5 lite").name == "v5e"  # jax's device_kind
    assert tpu_plan.chip_for("v6e:2x4").hbm_bytes == 32 * 2**30
    assert tpu_plan.chip_for("v4:2x2x4").source.endswith("/v4")
    with pytest.raises(ValueError, match="known: v4, v5e, v5p, v6e"):
        tpu_plan.chip_for("v9z:2x2")


def test_hlo_loops_collectives_and_cost():
    module = hlo.Module(HLO)
    assert module.entry == "main"
    assert [(loop.name, n) for loop, n in module.loops()] == [("loop", 16), ("loop2", None)]
    per_loop = hlo.loop_collectives(HLO)
    gather, reduce = per_loop["loop"]
    assert (gather.opcode, gather.operand_shape, gather.result_shape) == ("all-gather", "bf16[32,128]", "bf16[128,128]")
    assert (gather.operand_bytes, gather.result_bytes) == (32 * 128 * 2, 128 * 128 * 2)
    assert gather.groups == "{{0,1,2,3}}"
    assert reduce.opcode == "all-reduce" and reduce.result_bytes == 8 * 128 * 2
    dot = 2 * 8 * 128 * 128
    flops_once, _ = hlo_cost.walk_cost(module, trips=False)
    flops, _ = hlo_cost.walk_cost(module)
    assert (flops_once, flops) == (2 * dot, 17 * dot)  # the data-dependent loop counts once
    cost = hlo_cost.loop_cost(module)
    assert (cost.once[0], cost.per_iteration[0], cost.as_xla[0]) == (16 * dot, dot, 2 * dot)
    # XLA's figures (here 10% above the walk's) split in the same proportions.
    (once_flops, _), (step_flops, _) = cost.scale((2.2 * dot, 0.0))
    assert (once_flops, step_flops) == (pytest.approx(17.6 * dot), pytest.approx(1.1 * dot))
    assert hlo.group_collectives(per_loop["loop"] + per_loop["loop2"])[0][1] == 2


def test_collectives_of_a_loop_nested_in_a_decode_loop_count_per_iteration():
    """A decode loop (data-dependent exit) whose body runs the 16-iteration loop (as the layer scan
    runs inside a decode step): its per-step collectives hold that loop's 16 times."""
    nested = HLO.replace("ENTRY %main", """%outer (o: (s32[], bf16[8,128], bf16[32,128])) -> (s32[], bf16[8,128], bf16[32,128]) {
  %o = (s32[], bf16[8,128]{1,0}, bf16[32,128]{1,0}) parameter(0)
  %xo = bf16[8,128]{1,0} get-tuple-element(%o), index=1
  %wo = bf16[32,128]{1,0} get-tuple-element(%o), index=2
  %start = s32[] constant(0)
  %init_inner = (s32[], bf16[8,128]{1,0}, bf16[32,128]{1,0}) tuple(%start, %xo, %wo)
  %inner = (s32[], bf16[8,128]{1,0}, bf16[32,128]{1,0}) while(%init_inner), condition=%cond, body=%body
  %once = bf16[8,128]{1,0} all-reduce(%xo), channel_id=3, replica_groups={{0,1,2,3}}, to_apply=%add
  ROOT %ot = (s32[], bf16[8,128]{1,0}, bf16[32,128]{1,0}) tuple(%start, %once, %wo)
}

ENTRY %main""").replace("condition=%cond2, body=%body", "condition=%cond2, body=%outer")
    items = hlo.loop_collectives(nested)["loop2"]
    counts = {(c.opcode, c.result_shape): n for c, n in hlo.group_collectives(items)}
    assert counts == {("all-gather", "bf16[128,128]"): 16, ("all-reduce", "bf16[8,128]"): 17}
    module = hlo.Module(nested)
    assert len(hlo.collectives_in(module, "outer")) == 3  # each instruction once


def test_hlo_shapes_and_convolution_flops():
    assert hlo.shape_bytes("bf16[3,100]{1,0:T(8,128)(2,1)}") == 8 * 128 * 2  # padded to its tile
    assert hlo.shape_bytes("bf16[3,100]{1,0:T(8,128)(2,1)}", tiled=False) == 600
    assert hlo.shape_bytes("(f32[7]{0}, s32[])") == 32
    # XLA:TPU's batched matmul [4 x 2 x 2 batches] of [64, 16] x [16, 16], written as a convolution
    # whose window, stride and lhs dilation encode the batch dimensions (from a compiled prefill).
    text = ("HloModule c\n"
            "ENTRY %e (l: f32[4,64,2,16,1], r: bf16[4,16,2,2,16]) -> f32[4,2,64,16,2] {\n"
            "  %l = f32[4,64,2,16,1]{4,3,2,1,0} parameter(0)\n"
            "  %r = bf16[4,16,2,2,16]{4,3,2,1,0} parameter(1)\n"
            "  ROOT %c = f32[4,2,64,16,2]{4,3,2,1,0} convolution(%l, %r), window={size=4x2x2 stride=3x1x1 "
            "pad=0_0x0_0x1_1 lhs_dilate=4x2x1 rhs_reversal=0x0x1}, dim_labels=0b1f2_0o12i->01bf2\n"
            "}\n")
    module = hlo.Module(text)
    assert hlo_cost.dot_flops(module, module.by_name["c"]) == 2 * (4 * 2 * 2) * 64 * 16 * 16


# A layer loop's body as the layer scan compiles for decode: a fusion reads one layer of stacked
# weights [4, 128, 128] through a nested fusion's dynamic-slice, an in-place scatter writes one
# token into a [4, 64, 128] pool, a paged-attention kernel is handed the whole pool, and a splash
# kernel runs over a 2 x 2 block grid.
KERNELS = """HloModule k

%slice_layer (w: bf16[4,128,128], i: s32[]) -> bf16[128,128] {
  %w = bf16[4,128,128]{2,1,0} parameter(0)
  %i = s32[] parameter(1)
  %z = s32[] constant(0)
  %ds = bf16[1,128,128]{2,1,0} dynamic-slice(%w, %i, %z, %z), dynamic_slice_sizes={1,128,128}
  ROOT %b = bf16[128,128]{1,0} bitcast(%ds)
}

%matmul (x: bf16[8,128], w: bf16[4,128,128], i: s32[]) -> bf16[8,128] {
  %x = bf16[8,128]{1,0} parameter(0)
  %w = bf16[4,128,128]{2,1,0} parameter(1)
  %i = s32[] parameter(2)
  %layer = bf16[128,128]{1,0} fusion(%w, %i), kind=kLoop, calls=%slice_layer
  ROOT %y = bf16[8,128]{1,0} dot(%x, %layer), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%write (pool: bf16[4,64,128], idx: s32[1,2], upd: bf16[1,128]) -> bf16[4,64,128] {
  %pool = bf16[4,64,128]{2,1,0} parameter(0)
  %idx = s32[1,2]{1,0} parameter(1)
  %upd = bf16[1,128]{1,0} parameter(2)
  ROOT %sc = bf16[4,64,128]{2,1,0} scatter(%pool, %idx, %upd), update_window_dims={1}, inserted_window_dims={0,1}, scatter_dims_to_operand_dims={0,1}, index_vector_dim=1, to_apply=%add
}

%add (a: bf16[], b: bf16[]) -> bf16[] {
  %a = bf16[] parameter(0)
  %b = bf16[] parameter(1)
  ROOT %sum = bf16[] add(%a, %b)
}

ENTRY %main (x: bf16[8,128], w: bf16[4,128,128], pool: bf16[4,64,128], idx: s32[1,2], upd: bf16[1,128], i: s32[], lens: s32[2], table: s32[6], q: f32[2,4,1,128], kp: bf16[1,32,8,128], sq: bf16[1,2,256,64], sk: bf16[1,1,256,64], grid: s8[1,2,2]) -> bf16[8,128] {
  %x = bf16[8,128]{1,0} parameter(0)
  %w = bf16[4,128,128]{2,1,0} parameter(1)
  %pool = bf16[4,64,128]{2,1,0} parameter(2)
  %idx = s32[1,2]{1,0} parameter(3)
  %upd = bf16[1,128]{1,0} parameter(4)
  %i = s32[] parameter(5)
  %lens = s32[2]{0} parameter(6)
  %table = s32[6]{0} parameter(7)
  %q = f32[2,4,1,128]{3,2,1,0} parameter(8)
  %kp = bf16[1,32,8,128]{3,2,1,0} parameter(9)
  %sq = bf16[1,2,256,64]{3,2,1,0} parameter(10)
  %sk = bf16[1,1,256,64]{3,2,1,0} parameter(11)
  %grid = s8[1,2,2]{2,1,0} parameter(12)
  %y = bf16[8,128]{1,0} fusion(%x, %w, %i), kind=kOutput, calls=%matmul
  %new = bf16[4,64,128]{2,1,0} fusion(%pool, %idx, %upd), kind=kLoop, calls=%write
  %pa = f32[2,4,1,128]{3,2,1,0} custom-call(%lens, %table, %q, %kp, %kp), custom_call_target="tpu_custom_call"
  %sa = bf16[1,2,256,64]{3,2,1,0} custom-call(%grid, %sq, %sk, %sk), custom_call_target="tpu_custom_call"
  ROOT %out = bf16[8,128]{1,0} copy(%y)
}
""".replace("%pa = ", "%paged_attention.1 = ").replace("%sa = ", "%splash_mha_fwd_no_residuals.1 = ")


def test_walk_counts_what_is_read_and_what_kernels_do():
    module = hlo.Module(KERNELS)
    y, new = module.by_name["y"], module.by_name["new"]
    # One layer's weights (not the stack), x and the layer index, the output.
    assert hlo_cost._fusion_bytes(module, y) == 128 * 128 * 2 + 8 * 128 * 2 + 4 + 8 * 128 * 2
    # The scatter writes its update in place: the update read and written, the indices read.
    assert hlo_cost._fusion_bytes(module, new) == 2 * 128 * 2 + 2 * 4
    flops, nbytes = hlo_cost.kernel_cost(module, module.by_name["paged_attention.1"])
    # The table's 6 pages x 8 tokens x 1 kv head x 128 x bfloat16, keys and values; not the pool.
    assert nbytes == 2 * 4 * 128 * 4 + 2 * 4 + 6 * 4 + 2 * 4 * 128 * 4 + 2 * 6 * 8 * 128 * 2
    assert flops == 2 * 2 * 4 * 6 * 8 * 128  # 4 heads, 48 tokens over both slots
    flops, _ = hlo_cost.kernel_cost(module, module.by_name["splash_mha_fwd_no_residuals.1"])
    assert flops == 2 * 2 * (2 * 256) * 256 * 64 * 0.75  # 3 of the 2 x 2 causal blocks
    # A grid of wider key blocks (1,024-token key blocks over 512-token query blocks): the
    # blocks touching the diagonal are computed whole.
    wide = hlo.Module(KERNELS.replace("s8[1,2,2]", "s8[1,2,1]"))
    assert hlo_cost.kernel_cost(wide, wide.by_name["splash_mha_fwd_no_residuals.1"])[0] == flops / 0.75
    assert [hlo_cost.causal_block_fraction(*g) for g in ((10, 10), (10, 5), (5, 10), (2, 1))] == [0.55, 0.6, 0.6, 1.0]
    # One sequence per chip: the kernel's batch dimension is gone; the same count.
    one = hlo.Module(KERNELS.replace("bf16[1,2,256,64]", "bf16[2,256,64]").replace("bf16[1,1,256,64]", "bf16[1,256,64]"))
    assert hlo_cost.kernel_cost(one, one.by_name["splash_mha_fwd_no_residuals.1"])[0] == flops
    # Instruction by instruction: each at its own bound, none overlapping another; between the
    # whole program's roofline and the sum of its compute and memory times.
    flops, nbytes = hlo_cost.walk_cost(module)
    assert hlo_cost.serial_seconds(module, 1.0, math.inf) == pytest.approx(flops)
    assert hlo_cost.serial_seconds(module, math.inf, 1.0) == pytest.approx(nbytes)
    serial = hlo_cost.serial_seconds(module, 1e10, 1e9)  # the kernels compute bound, the rest memory bound
    assert max(flops / 1e10, nbytes / 1e9) * (1 + 1e-9) < serial < (flops / 1e10 + nbytes / 1e9) * (1 - 1e-9)
    cost = hlo_cost.loop_cost(module)
    assert cost.kernels[0][0] == pytest.approx(2 * 2 * 4 * 48 * 128 + 2 * 2 * 512 * 256 * 64 * 0.75)
    # XLA counts no kernel: its figures scale what it sees, the kernels are added as counted.
    (once_flops, _), _ = cost.scale((4 * (cost.once[0] - cost.kernels[0][0]), 1.0))
    assert once_flops == pytest.approx(4 * (cost.once[0] - cost.kernels[0][0]) + cost.kernels[0][0])


def test_projection_arithmetic():
    chip = tpu_plan.Chip("x", peak_flops=100e12, hbm_bandwidth=1e12, hbm_bytes=16 * 2**30, source="")

    def program(flops, nbytes, step_flops=0.0, step_bytes=0.0):
        p = tpu_plan.ProgramPlan("p", "", 1, 1, 1, 0, flops, nbytes, 0.0, 0.0)  # no HLO: all of it once
        p.step_flops, p.step_bytes = step_flops, step_bytes
        return p

    programs = {"train": program(100e12, 1e9),      # compute bound: 1 s
                "logprobs": program(1e12, 1e11),    # memory bound: 0.1 s
                "prefill": program(10e12, 1e9),     # 0.1 s
                "decode": program(1e9, 2e10, 1e9, 1e9)}  # 20 ms once per call, 1 ms per step
    assert programs["train"].bound(chip) == "compute" and programs["logprobs"].bound(chip) == "memory"
    assert programs["train"].peak == 3 and programs["decode"].roofline_s(chip, step=True) == pytest.approx(1e-3)
    counts = tpu_plan.StepCounts(prefill_calls=4, admit_calls=0, decode_calls=4, decode_steps=4000, logprob_calls=10,
                                 updates=2, steps=3600)
    p = tpu_plan.project(programs, counts, chip)
    assert p["sampler"] == pytest.approx(4 * (0.1 + 0.02 + 1000 * 1e-3))
    assert p["logprobs"] == pytest.approx(1.0) and p["updates"] == pytest.approx(2.0)
    assert p["step"] == pytest.approx(7.48) and p["run_hours"] == pytest.approx(7.48)
    programs["prefill"] = tpu_plan.ProgramPlan("sampler prefill", "", 0, 0, 0, 0, 0.0, 0.0, 0.0, 0.0,
                                               error="RESOURCE_EXHAUSTED: Ran out of memory on HBM")
    assert "did not compile: RESOURCE_EXHAUSTED" in tpu_plan.program_table(programs, chip)[4]
    assert tpu_plan.projection_lines(programs, counts, chip)[0].startswith("No projection: sampler prefill")
    programs["prefill"] = program(10e12, 1e9)
    halved = tpu_plan.StepCounts(4, 0, 4, 2000, 10, 2, 3600)
    lines = tpu_plan.projection_lines(programs, counts, chip, (500, halved))
    assert lines[-1].startswith("  with every row ending at its budget (mean 500 tokens")
    assert lines[-1].endswith(f"3600 steps: {tpu_plan.project(programs, halved, chip)['run_hours']:.2f} h")


def test_step_counts_of_the_paper_config():
    config = qwen1_5b.get_config()
    run = spec.resolve(config, num_devices=16)
    # The refill engine with every row in flight (rollout.max_batch=0): 64 prompts prefilled in one
    # call, 1,024 rollouts admitted 64 at a time into 1,024 slots, 4,095 decode steps at the cap;
    # the engine scores the pre-filled prefix, so no old-log-prob pass; 4 mini-batch updates.
    assert tpu_plan.step_counts(run) == tpu_plan.StepCounts(1, 16, 17, 4095, 0, 4, 629)
    # Rows that end at their budgets' mean (1,536 tokens) take 1,024 x 1,535 / 1,024 steps.
    assert tpu_plan.step_counts(run, 1536).decode_steps == 1535
    # 256 slots: 1,024 x 4,095 / 256 decode steps at the cap.
    config.rollout.max_batch = 256
    assert tpu_plan.step_counts(spec.resolve(config, num_devices=16)) == tpu_plan.StepCounts(1, 64, 65, 16380, 0, 4, 629)
    # The static sampler: 4 calls of 256 rows, and one old-log-prob pass (the prefix takes the loss)
    # of 16-row micro-batches.
    config.rollout.engine = "static"
    assert tpu_plan.step_counts(spec.resolve(config, num_devices=16)) == tpu_plan.StepCounts(4, 0, 4, 16380, 64, 4, 629)
    assert plan.logprob_passes(spec.resolve(tiny.get_config(), num_devices=1)) == 0  # prefix_loss off
    config.loss.kl_coef = 0.01
    assert plan.logprob_passes(spec.resolve(config, num_devices=16)) == 2  # + the reference pass


SMALL = dict(num_layers=2, hidden_size=64, intermediate_size=128, head_dim=16, num_heads=4, num_kv_heads=2)


def _small_config(engine: str = "refill"):
    config = tiny.get_config()
    config.model.update(SMALL)
    r = config.rollout
    r.budgets, r.rollouts_per_prompt, r.max_prompt_len, r.max_response_len = (16, 32), 4, 16, 48
    r.prefix_loss = True  # so that the static step has an old-log-prob pass
    r.engine = engine
    config.objective.l_max = 48
    t = config.train
    t.prompts_per_step, t.mini_batches, t.micro_batch_size = 4, 2, 4
    return config


@pytest.mark.slow
def test_small_model_compiles_for_a_tpu_topology(monkeypatch):
    pytest.importorskip("libtpu")
    # Only compiling: another process holding libtpu's lock file (a parallel test worker, a
    # launch/memory.py run) must not stop this one.
    monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    config = _small_config("refill")
    mesh = plan.topology_mesh(config.mesh, "v5e:2x2")
    assert mesh.devices.size == 4 and mesh.devices.flat[0].platform == "tpu"
    programs = tpu_plan.compile_programs(config, mesh)
    assert list(programs) == ["train", "logprobs", "prefill", "admit", "decode"]
    chip = tpu_plan.chip_for("v5e:2x2")
    for p in programs.values():
        assert p.args > 0 and p.outs > 0 and p.peak > 0, p
        assert p.flops + p.step_flops > 0 and p.bytes > 0 and p.roofline_s(chip) > 0 and p.compile_s > 0, p
    # 2 micro-batches of forward + backward (3 forwards; no remat) of the log-prob pass's rows: the
    # micro-batch loop and the layer scan inside it each counted times their trips.
    assert programs["train"].flops == pytest.approx(6 * programs["logprobs"].flops, rel=0.1)
    decode = programs["decode"]
    assert decode.step_flops > 0 and decode.step_bytes > 0 and decode.roofline_s(chip, step=True) > 0
    assert hlo.loop_collectives(decode.text)  # the decode loop, found in the HLO
    assert tpu_plan.step_counts(spec.resolve(config, num_devices=4)).logprob_calls == 0
    assert tpu_plan.project(programs, tpu_plan.step_counts(spec.resolve(config, num_devices=4)), chip)["run_hours"] > 0
    lines = tpu_plan.program_table(programs, chip) + tpu_plan.collective_lines(decode.text)
    assert len(lines) > 6 and "| engine decode loop: one decode step |" in "\n".join(lines)
    text = tpu_plan.format_report(config, "v5e:2x2", mesh, programs)
    assert "One decode step moves" in text and "  one step: " in text and "At the cap (every row" in text
    assert text.splitlines()[-1].startswith("plan v5e:2x2: paper run ")  # the plan's last line
    # The static sampler's programs (the update and the log-prob pass are the same as above).
    static = _small_config("static")
    sampling = tpu_plan.compile_programs(static, mesh, only=("sampler",))
    assert list(sampling) == ["prefill", "decode"] and sampling["decode"].step_bytes > 0
    assert "| sampler decode loop: one decode step |" in "\n".join(tpu_plan.program_table(sampling, chip))
    assert tpu_plan.step_counts(spec.resolve(static, num_devices=4)).logprob_calls == 4


@pytest.mark.slow
def test_pod_mesh_over_two_slices_compiles_the_update():
    # The :pod layout on a multislice topology: FSDP inside each slice, data across the two.
    pytest.importorskip("libtpu")
    config = _small_config()
    config.rollout.prefix_loss = False
    config.train.micro_batch_size = 8
    mesh = plan.topology_mesh(config.mesh, "v5e:2x2", slices=2)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    programs = tpu_plan.compile_programs(config, mesh, only=("train",))
    assert list(programs) == ["train"] and programs["train"].peak > 0
    text = tpu_plan.format_report(config, "v5e:2x2", mesh, programs)
    assert "v5e:2x2 x 2 slices: 8 chips" in text and "one HBPO step" not in text


def test_memory_cli_rejects_unknown_programs_in_one_sentence():
    import subprocess
    done = subprocess.run([sys.executable, "launch/memory.py", "--topology=v5e:2x2", "--programs=train,bogus"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "--programs=train,bogus: choose from train,logprobs,sampler." in done.stderr
    assert "Traceback" not in done.stderr


# Memory-space assignment: x prefetched from HBM into on-chip memory (S(1)) by a copy-start, a
# fusion that reads it there and writes its result on chip, the result evicted to HBM, and an
# AllocateBuffer that only reserves a buffer.
ON_CHIP = """HloModule m

%neg (a: f32[8,128]) -> f32[8,128] {
  %a = f32[8,128]{1,0:T(8,128)S(1)} parameter(0)
  ROOT %n = f32[8,128]{1,0:T(8,128)S(1)} negate(%a)
}

ENTRY %main (x: f32[8,128]) -> f32[8,128] {
  %x = f32[8,128]{1,0:T(8,128)} parameter(0)
  %in = (f32[8,128]{1,0:T(8,128)S(1)}, f32[8,128]{1,0:T(8,128)}, u32[]{:S(2)}) copy-start(%x)
  %x1 = f32[8,128]{1,0:T(8,128)S(1)} copy-done(%in)
  %y1 = f32[8,128]{1,0:T(8,128)S(1)} fusion(%x1), kind=kLoop, calls=%neg
  %out = (f32[8,128]{1,0:T(8,128)}, f32[8,128]{1,0:T(8,128)S(1)}, u32[]{:S(2)}) copy-start(%y1)
  %buf = f32[64,128]{1,0:T(8,128)} custom-call(), custom_call_target="AllocateBuffer"
  ROOT %y = f32[8,128]{1,0:T(8,128)} copy-done(%out)
}
"""


def test_walk_counts_hbm_bytes_only():
    module = hlo.Module(ON_CHIP)
    one = 8 * 128 * 4
    assert hlo.on_chip("{1,0:T(8,128)S(1)}") and not hlo.on_chip("{1,0:T(8,128)}")
    assert hlo.shape_bytes(module.by_name["in"].shape, hbm_only=True) == one  # the HBM source only
    # The prefetch reads x from HBM, the eviction writes y to HBM; the fusion works on chip; the
    # reserved buffer is never written: two arrays' bytes in all.
    assert hlo_cost.walk_cost(module)[1] == 2 * one
    movers = hlo_cost.top_movers(module, 2)
    assert [m.opcode for m in movers] == ["copy-start", "copy-start"] and movers[0].bytes == one
    plan = tpu_plan.ProgramPlan("the program", "", 0, 0, 0, 0, 0.0, 0.0, 0.0, 0.0, ON_CHIP)
    assert plan.bytes == 2 * one  # the plan's bytes are the walk's HBM bytes, not XLA's count
    table = tpu_plan.mover_lines(plan, 5)
    assert table[0].startswith("the program: the 2 instructions") and "| 50.0% |" in table[3]
