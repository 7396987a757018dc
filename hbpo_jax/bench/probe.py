"""A ~10-minute measurement on one TPU VM (v5e-8, v5p-8), set against the plan's predictions
(launch/tpu_probe.py): the update at the widths the loop uses under each mesh, the decode step
over slots x filled length, the paged-attention kernel (page sizes, megacore modes), and a
profiler trace of one scaled HBPO step (rollout rows ending at lengths drawn from the plan's mix,
then an update), written as one markdown report.

Predictions: the update's roofline from its compiled HLO (the plan's walk over XLA's counts); a
decode step's and the kernel's floor (weights + filled KV over HBM bandwidth: floor.py); the
engine's schedule (lengths.refill_schedule), which must equal the engine's own counts.
Smoke mode (SMOKE; the test suite): a tiny model and shapes on the CPU, kernels in TPU
interpret mode; its timings mean nothing, its plumbing is what is checked.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from hbpo_jax import config as config_lib
from hbpo_jax import sharding, spec
from hbpo_jax.plan import floor as floor_lib
from hbpo_jax.plan import lengths
from hbpo_jax.plan import programs as plan
from hbpo_jax.plan import tpu as tpu_plan
from hbpo_jax.rollout import static as sampler
from hbpo_jax.rollout.slots import StoreLayout


@dataclasses.dataclass(frozen=True)
class ProbeSpec:
    """What to time. meshes: mesh shapes (config.mesh.shape spellings); widths: update response
    widths (each micro-batch piece at the prompt bucket + width); slots x filled: decode sweeps
    (filled: KV tokens per slot), decode_steps per timed segment; page_sizes, megacore modes
    (None, "kv_head", "batch"; only None on single-core chips) for the kernel at kernel_slots x
    kernel_filled; step_scale: the traced step's lengths scaled (and its rows' count: rows);
    iters: timed repeats (median)."""

    meshes: tuple = ((1, -1, 1), (-1, 4, 1))
    widths: tuple = (1024, 2048)
    prompt_width: int = 512
    slots: tuple = (64, 256)
    filled: tuple = (512, 2048)
    decode_steps: int = 64
    page_sizes: tuple = (16, 64, 128)
    megacore: tuple = (None, "kv_head", "batch")
    kernel_slots: int = 256
    kernel_filled: int = 2048
    step_scale: float = 0.25
    rows: int = 256
    iters: int = 3
    interpret: bool = False


SMOKE = ProbeSpec(meshes=((1, -1, 1), (-1, 4, 1)), widths=(32,), prompt_width=16, slots=(8,), filled=(16, 32),
                  decode_steps=4, page_sizes=(16, 32), megacore=(None,), kernel_slots=2, kernel_filled=64,
                  step_scale=0.5, rows=16, iters=1, interpret=True)


def smoke_config():
    """The smoke mode's config: the base config with a 2-layer model of head_dim 128 (the paged
    kernel's), budgets 16 / 32, 16 rows a step in mini-batches of 8, 8 decode slots."""
    from ml_collections import config_dict
    config = config_lib.base_config()
    config.name = "hbpo-probe-smoke"
    config.model = config_dict.ConfigDict(dict(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=2, num_kv_heads=1,
        head_dim=128, rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, max_position_embeddings=512,
        bos_token_id=None, eos_token_ids=(), dtype="float32", param_dtype="float32", attention_impl="xla",
        remat="none"))
    config.data.path = ""
    r = config.rollout
    r.budgets, r.rollouts_per_prompt, r.max_prompt_len, r.max_response_len, r.max_batch = (16, 32), 4, 16, 48, 8
    config.objective.l_max = 48
    t = config.train
    t.prompts_per_step, t.mini_batches, t.micro_batch_size = 4, 2, 8
    return config


def _median_s(fn, iters: int) -> float:
    """Median wall seconds of fn() (its result blocked on), after one warm-up call."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(max(iters, 1)):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _zeros_like_inputs(compiled):
    """Zero arrays for a compiled program's inputs, placed as it expects (args, kwargs)."""
    args, kwargs = compiled.in_avals
    shardings = compiled.input_shardings
    make = lambda aval, sh: jax.device_put(jnp.zeros(aval.shape, aval.dtype), sh)  # noqa: E731
    return jax.tree.map(make, args, shardings[0]), jax.tree.map(make, kwargs, shardings[1])


def _plan_of(name: str, compiled) -> tpu_plan.ProgramPlan:
    """The plan's reading of a compiled program (roofline from XLA's counts and the HLO walk)."""
    m, cost = compiled.memory_analysis(), compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
    return tpu_plan.ProgramPlan(name, "", m.argument_size_in_bytes, m.output_size_in_bytes, m.temp_size_in_bytes,
                                getattr(m, "alias_size_in_bytes", 0), float(cost.get("flops", 0.0)),
                                float(cost.get("bytes accessed", 0.0)), 0.0, 0.0, compiled.as_text())


def _chip(devices) -> tpu_plan.Chip | None:
    try:
        return tpu_plan.chip_for(devices[0].device_kind)
    except ValueError:
        return None


def time_updates(config, probe: ProbeSpec, chip) -> list[dict]:
    """The update (one mini-batch of rows_per_minibatch rows) at each mesh x width: measured and
    the plan's roofline, ms per call."""
    rows = []
    for shape in probe.meshes:
        config.mesh.shape = tuple(shape)
        mesh = sharding.mesh_from_config(config.mesh)
        for width in probe.widths:
            compiled = plan.lower_train_step(config, mesh, prompt_width=probe.prompt_width,
                                             response_width=width).compile()
            # The update donates its state: fresh zeros for every call, made outside the timing.
            calls = iter([_zeros_like_inputs(compiled) for _ in range(probe.iters + 1)])

            def call(compiled=compiled, calls=calls):
                args, kwargs = next(calls)
                return compiled(*args, **kwargs)
            measured = _median_s(call, probe.iters)
            predicted = _plan_of("update", compiled).roofline_s(chip) if chip else float("nan")
            rows.append(dict(mesh=dict(mesh.shape), width=width, measured_ms=measured * 1e3,
                             predicted_ms=predicted * 1e3))
    return rows


def _params(config, mesh):
    from flax import nnx

    from hbpo_jax.models import create_model
    cfg, rules = spec.resolve_model(config).config(), sharding.rules_from_config(config.mesh)
    graphdef, state = nnx.split(create_model(cfg, seed=0, mesh=mesh, rules=rules))
    return cfg, rules, graphdef, sharding.decode_weights(state, mesh, rules, cfg.compute_dtype)


def time_decode(config, probe: ProbeSpec, chip, mesh) -> list[dict]:
    """A decode step at slots x filled: engine runs of one prompt of `filled` tokens per slot,
    rows ending after k and 2k tokens; (2k run - k run) / k, against the floor's step."""
    from hbpo_jax.rollout.refill import RefillEngine
    cfg, rules, graphdef, params = _params(config, mesh)
    work, chips = floor_lib.Workload.of(cfg), mesh.devices.size
    k, out = probe.decode_steps, []
    for slots in probe.slots:
        for filled in probe.filled:
            eng = RefillEngine(graphdef, cfg, sampler.SamplerSettings(max_new_tokens=2 * k + 1, eos_ids=()),
                               slots=slots, mesh=mesh, rules=rules)
            prompt = [[1 + i % 7 for i in range(filled)]]

            def run(n, eng=eng, prompt=prompt, slots=slots):
                return eng.run(params, prompt, np.zeros(slots, np.int32), [[]] * slots, np.full(slots, n),
                               key=jax.random.key(0))[0].tokens
            per_step = (_median_s(lambda: run(2 * k + 1), probe.iters)
                        - _median_s(lambda: run(k + 1), probe.iters)) / k
            predicted = float("nan")
            if chip:
                kv = work.kv_bytes * slots * (filled + 1.5 * k) / chips
                predicted = max((work.weight_bytes + kv) / chip.hbm_bandwidth,
                                2 * work.matmul_params * slots / chips / chip.peak_flops)
            out.append(dict(slots=slots, filled=filled, measured_ms=per_step * 1e3, floor_ms=predicted * 1e3))
    return out


def time_kernel(config, probe: ProbeSpec, chip) -> list[dict]:
    """jax's paged-attention kernel for one layer at kernel_slots x kernel_filled, each page size
    and megacore mode (those this chip and jax take; others listed with the error)."""
    from jax.experimental.pallas import tpu as pltpu
    from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention
    cfg = spec.resolve_model(config).config()
    s, f, d = probe.kernel_slots, probe.kernel_filled, cfg.head_dim
    h, kh = cfg.num_heads, cfg.num_kv_heads
    key = jax.random.key(1)
    out = []
    for page in probe.page_sizes:
        per_slot = -(-f // page)
        block = max(b for b in (1, 2, 4, 8, 16) if per_slot % b == 0 and b * page <= 2048)
        q = jax.random.normal(key, (s, h, d), jnp.float32)
        pool = jax.random.normal(key, (kh, s * per_slot, page, d), jnp.bfloat16)
        table = jnp.arange(s * per_slot, dtype=jnp.int32).reshape(s, per_slot)
        lens = jnp.full((s,), f, jnp.int32)
        for mode in probe.megacore:
            fn = jax.jit(lambda q, k, v, lens, t, mode=mode, block=block: paged_attention(
                q, k, v, lens, t, pages_per_compute_block=block, megacore_mode=mode))
            row = dict(page=page, megacore=str(mode), block_pages=block)
            try:
                call = functools.partial(fn, q, pool, pool, lens, table)
                if probe.interpret:
                    with pltpu.force_tpu_interpret_mode():
                        row["measured_ms"] = _median_s(call, probe.iters) * 1e3
                else:
                    row["measured_ms"] = _median_s(call, probe.iters) * 1e3
            except Exception as e:  # noqa: BLE001 (a mode this chip or jax does not take: reported, not fatal)
                row["error"] = str(e).strip().splitlines()[0][:120]
            kv_bytes = 2 * s * f * kh * d * 2  # keys and values, bfloat16
            row["floor_ms"] = kv_bytes / chip.hbm_bandwidth * 1e3 if chip else float("nan")
            out.append(row)
    return out


def trace_step(config, probe: ProbeSpec, mesh, out_dir: Path, update_width: int) -> dict:
    """One scaled HBPO step under jax.profiler.trace (out_dir/trace): the engine over `rows` rows
    whose lengths are the plan's mix scaled by step_scale (each row ending at its length: no EOS),
    then one update at `update_width`. Returns the engine's counts and the schedule's."""
    from hbpo_jax.rollout.refill import RefillEngine
    cfg, rules, graphdef, params = _params(config, mesh)
    run = spec.resolve(config, num_devices=mesh.devices.size)
    s = run.sampling
    mix = tpu_plan.length_mix(run)
    cap = max(4, int(s.rollout.max_response_len * probe.step_scale))
    mix = dataclasses.replace(mix, means=tuple(m * probe.step_scale for m in mix.means), cap=cap)
    groups = max(probe.rows // max(s.group, 1), 1)
    limits = mix.responses(groups, max(s.group // len(mix.means), 1))[:probe.rows]
    budgets = np.tile(np.repeat(np.arange(len(mix.means))[::-1], max(s.group // len(mix.means), 1)), groups)
    order = np.lexsort((np.arange(len(limits)), budgets[:len(limits)]))
    prompt_len = min(s.max_prompt_len, max(4, int(mix.mean_prompt * probe.step_scale)))
    prompts = [[1 + (i + g) % 7 for i in range(prompt_len)] for g in range(groups)]
    row_prompt = np.repeat(np.arange(groups), s.group)[:len(limits)]
    slots = min(s.rollout.max_batch or len(limits), len(limits))
    slots = max(mesh.devices.size, slots - slots % mesh.devices.size)  # the slots split over the chips
    eng = RefillEngine(graphdef, cfg, sampler.SamplerSettings(max_new_tokens=cap, eos_ids=()), slots=slots,
                       mesh=mesh, rules=rules)
    compiled = plan.lower_train_step(config, mesh, prompt_width=probe.prompt_width,
                                     response_width=update_width).compile()
    inputs = _zeros_like_inputs(compiled)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with jax.profiler.trace(str(out_dir / "trace")):
        _, stats = eng.run(params, prompts, row_prompt, [[]] * len(limits), limits, key=jax.random.key(0), order=order)
        rollout_s = time.perf_counter() - t0
        jax.block_until_ready(compiled(*inputs[0], **inputs[1]))
    fill = np.full(len(limits), prompt_len)
    home = StoreLayout.assign(row_prompt, fill, limits, groups, eng.shards).home
    sched = lengths.refill_schedule(limits, fill, eng.slots, eng.admit_width, order, home, eng.shards)
    return dict(rows=len(limits), slots=eng.slots, mean_length=float(limits.mean()), rollout_s=rollout_s,
                step_s=time.perf_counter() - t0, engine=(stats.decode_steps, stats.segments, stats.admit_calls),
                schedule=(sched.decode_steps, sched.segments, sched.admit_calls))


def run(config, out_dir: str | Path, probe: ProbeSpec = ProbeSpec()) -> str:
    """Every measurement, written to out_dir/probe.md (and the trace to out_dir/trace); returns
    the markdown. config: the run's ConfigDict (its model, rollout and train settings)."""
    out_dir = Path(out_dir)
    devices = jax.devices()
    # Only the meshes these devices can make (a fixed axis product that divides the device count).
    fits = tuple(m for m in probe.meshes if len(devices) % int(np.prod([x for x in m if x > 0])) == 0)
    probe = dataclasses.replace(probe, meshes=fits or ((1, -1, 1),))
    chip = _chip(devices)
    if chip is not None and chip.name in ("v5e", "v6e"):  # one TensorCore a chip: no megacore split
        probe = dataclasses.replace(probe, megacore=tuple(m for m in probe.megacore if m is None) or (None,))
    t0 = time.perf_counter()
    updates = time_updates(config, probe, chip)
    config.mesh.shape = tuple(probe.meshes[0])
    mesh = sharding.mesh_from_config(config.mesh)
    decode = time_decode(config, probe, chip, mesh)
    kernel = time_kernel(config, probe, chip)
    step = trace_step(config, probe, mesh, out_dir, probe.widths[0])
    lines = [f"# TPU probe of {config.name} ({time.strftime('%Y-%m-%d')})", "",
             f"{len(devices)} x {devices[0].device_kind} ({devices[0].platform}), jax {jax.__version__}; "
             f"chip figures: {chip.name + ' (' + chip.source + ')' if chip else 'none (not a TPU: no predictions)'}; "
             f"{'SMOKE mode (tiny shapes, kernels interpreted): timings mean nothing' if probe.interpret else ''}",
             "", "## Update (one mini-batch, micro-batch pieces at the prompt bucket + width)", "",
             "| mesh | width | measured ms | plan roofline ms | measured / plan |", "|---|---|---|---|---|"]
    lines += [f"| {r['mesh']} | {probe.prompt_width} + {r['width']:,} | {r['measured_ms']:.1f} | "
              f"{r['predicted_ms']:.1f} "
              f"| {r['measured_ms'] / r['predicted_ms']:.2f} |" for r in updates]
    lines += ["", "## Decode step (engine runs of 2k and k steps; per step)", "",
              "| slots | filled tokens | measured ms | floor ms | measured / floor |", "|---|---|---|---|---|"]
    lines += [f"| {r['slots']} | {r['filled']:,} | {r['measured_ms']:.3f} | {r['floor_ms']:.3f} "
              f"| {r['measured_ms'] / r['floor_ms']:.2f} |" for r in decode]
    lines += ["", f"## Paged-attention kernel (one layer, {probe.kernel_slots} slots x {probe.kernel_filled:,} tokens)",
              "", "| page | megacore | pages per block | measured ms | floor ms (KV read) | note |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {r['page']} | {r['megacore']} | {r['block_pages']} | {r.get('measured_ms', float('nan')):.3f} "
              f"| {r['floor_ms']:.4f} | {r.get('error', '')} |" for r in kernel]
    lines += ["", "## One scaled HBPO step (profiler trace in trace/)", "",
              f"{step['rows']} rows over {step['slots']} slots, mean length {step['mean_length']:.0f} "
              "(the plan's mix x "
              f"{probe.step_scale:g}), each ending at its length; rollout {step['rollout_s']:.2f} s, with one update "
              f"{step['step_s']:.2f} s.",
              f"Engine (decode steps, calls, admits) {step['engine']}; the plan's schedule {step['schedule']}: "
              f"{'equal' if step['engine'] == step['schedule'] else 'DIFFERENT'}.",
              "", f"Probe wall time: {time.perf_counter() - t0:.0f} s."]
    text = "\n".join(lines) + "\n"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "probe.md").write_text(text)
    return text
