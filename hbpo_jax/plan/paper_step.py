"""The plan's projection of one HBPO step at a length mix (lengths.LengthMix), and its text: each
compiled program's roofline scaled to the work the rows really ask for, its ICI traffic (ici),
the host's round trips, and the first-principles floor (floor) beside it.

  update   the compiled mini-batch update (U micro-batches at the prompt bucket + L_max) per
           micro-batch. Rows packed by tokens (train.pack_rows): the micro-batches packing fills
           (each mini-batch's rows, prompt + response, in lanes: packing.lane_layout), the rest
           skipped. Rows: scaled by forward flops to the widths the loop uses: rows sorted by
           length, each micro-batch cut to its longest row rounded up to train.update_width_step
           (batching.micro_layout), the prompt bucket of the step's longest prompt
  rollout  the refill engine's schedule over the rows (lengths.refill_schedule): one prefill
           (scaled to the prompt bucket), the admits (the first fill, S rows in one call, costs
           S / A admits of A rows), every decode step's roofline with the paged kernel's reads
           at the KV then filled (XLA's count holds them at the cap), the decode calls' rest
  ici      every program's collectives, bytes moved per chip (ici) times its calls, at the chip's
           ICI bandwidth; a synchronous collective (XLA left it unscheduled: the chip waits)
           adds; asynchronous ones ('-start': the windowed einsum's permutes) run under their
           program's compute, only their excess over it adds; each synchronous collective also
           costs a stated latency (ici.COLLECTIVE_LATENCY_S)
  host     one round trip per decode call (the device-to-host transfer the host waits on, its
           page book, the next dispatch) and the final output, a dispatch per admit, with pages
           on demand (a pool smaller than every slot's limit) a round trip and a grow dispatch per
           top-up of the longest row (pages.room tokens each: the decode loop returns when a row's
           pages run out, and rows admitted together run out together), a round trip per hand-over
           of finished rows to the grader (the engine returns every R / 16 ends), and the grading
           the rollout does not hide: rows are graded as they finish (grading.stream, on every
           host its share), so what is left after the last decode call is the last hand-over's
           rows, or the excess of all the grading over the rollout when the graders fall behind;
           priced at HOST (stated figures, not measurements: tpu_probe measures them)
Times add: a step runs rollout, the grading it leaves, update one after another.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from hbpo_jax.plan import floor as floor_lib
from hbpo_jax.plan import hlo, hlo_cost, ici, lengths
from hbpo_jax.rollout import static as sampler
from hbpo_jax.rollout.slots import StoreLayout
from hbpo_jax.train import minibatches as batching


@dataclasses.dataclass(frozen=True)
class HostCosts:
    """Stated host latencies (seconds): round_trip per decode call (a few KB device-to-host, the
    page book, the next dispatch); admit_dispatch per admit call (its ~11 host arrays put on the
    mesh); grade per response, CPU seconds of the grader (string match, math-verify when needed),
    spread over grading workers x hosts."""

    round_trip: float = 1e-3
    admit_dispatch: float = 0.5e-3
    grade: float = 5e-3


HOST = HostCosts()


@dataclasses.dataclass
class Terms:
    """One step's projection (seconds): update, rollout (prefill, admits, decode), ici (the part
    that adds), host; ici_total (all of it, overlapped or not); the schedule and counts behind
    them; widths: the update's micro-batch response widths, per mini-batch (packed rows: the
    micro-batches each mini-batch fills); slots: decode slots; top_ups: page top-ups of the
    longest row (decode-loop exits); update_calls: the update in compiled mini-batch calls."""

    update: float
    prefill: float
    admits: float
    decode: float
    ici: float
    ici_total: float
    host: float
    schedule: lengths.Schedule
    admit_equiv: float
    widths: list
    prompt_width: int
    round_trips: int
    grading: float
    ici_by_program: dict
    slots: int = 0
    top_ups: int = 0
    update_calls: float = 0.0
    ici_latency: float = 0.0

    @property
    def rollout(self) -> float:
        return self.prefill + self.admits + self.decode

    @property
    def step(self) -> float:
        return self.update + self.rollout + self.ici + self.host


def rows_of(run, mix: lengths.LengthMix):
    """(responses int [R], prompt tokens int [G], row_prompt int [R], budgets int [R]) of one
    step of `run` (prompt-major rows) at `mix`."""
    s, t = run.sampling, run.train
    samples = s.group // max(len(mix.means), 1)
    responses = mix.responses(t.prompts_per_step, samples)
    prompts = mix.prompt_lengths(t.prompts_per_step)
    row_prompt = np.repeat(np.arange(t.prompts_per_step), s.group)
    subgroup_budgets = s.rollout.budgets or (s.rollout.max_response_len,) * len(mix.means)
    budgets = np.tile(np.repeat(np.asarray(subgroup_budgets), samples),
                      t.prompts_per_step)
    return responses, prompts, row_prompt, budgets


def update_widths(run, responses: np.ndarray) -> tuple[list, int]:
    """(per mini-batch: its micro-batches' response widths; N, the batch's response width), as
    batching.minibatches cuts them."""
    t, cap = run.train, run.sampling.rollout.max_response_len
    n = batching.response_width(int(responses.max()), cap)
    out = []
    for start in range(0, len(responses), t.rows_per_minibatch):
        _, widths = batching.micro_layout(responses[start:start + t.rows_per_minibatch], t.rows_per_minibatch,
                                          t.micro_batch_size, n, t.update_width_step)
        out.append([int(w) for w in widths])
    return out, n


def packed_micro_batches(run, responses: np.ndarray, fill: np.ndarray) -> list[float]:
    """Per mini-batch: the micro-batches the packed update computes (train/packing.py), rows of
    fill + response tokens laid in lanes of the run's lane length, k lanes a micro-batch; a
    micro-batch of half lanes (packing.lane_plan) counts 1/2."""
    from hbpo_jax.train import packing
    t = run.train
    lanes, lane_len, _ = packing.layout_for(run)
    rows = np.asarray(fill) + np.asarray(responses)
    return [packing.micro_batch_cost(rows[start:start + t.rows_per_minibatch], lane_len, lanes)
            for start in range(0, len(rows), t.rows_per_minibatch)]


def page_top_ups(run, slots: int, chips: int, fill: np.ndarray) -> int:
    """Times the longest row's pages are topped up in a rollout (a decode-loop exit each), by the
    refill engine's own rule (RefillEngine.run: its pool, each row's need, pages.room): 0 when
    the pool holds every slot's whole limit, so rows take it at admission. fill: int [R], the KV
    tokens each row holds when admitted."""
    from hbpo_jax.plan.programs import PREFIX_TOKENS
    from hbpo_jax.rollout import pages, refill
    r = run.sampling.rollout
    cap, page_size = r.max_response_len, r.page_size
    slot_len = sampler.bucket_length(run.sampling.max_prompt_len) + refill.RefillEngine.start_width(PREFIX_TOKENS) + cap
    shards = chips // r.decode_tensor_parallel  # the slots' devices (sharding.decode_mesh)
    per_shard = pages.pool_pages(r.kv_tokens, slots, slot_len, page_size, shards) // shards
    most = pages.pages_for(int(np.max(fill)) + cap - 1, page_size)
    room = pages.room(0, cap, page_size, per_shard, max(slots // shards, 1), most)
    return 0 if room is None else -(-cap // room)


def _decode_parts(p):
    """(per decode step: flops and bytes outside the paged kernel; the kernel's flops and bytes
    as XLA's count places them, at the cap), per chip."""
    cost = hlo_cost.loop_cost(hlo.Module(p.text))
    k_flops, k_bytes = cost.kernels[1]
    return p.step_flops - k_flops, p.step_bytes - k_bytes


def project(programs: dict, run, cfg, chip, chips: int, hosts: int, mix: lengths.LengthMix,
            host: HostCosts = HOST) -> Terms:
    """The Terms of one step of `run` at `mix` from compiled programs (keyed train / prefill /
    admit / decode, tpu_plan.ProgramPlan) on `chips` chips of `chip` (tpu_plan.Chip) in `hosts`
    hosts. Needs the refill engine's programs."""
    s, t = run.sampling, run.train
    work = floor_lib.Workload.of(cfg)
    responses, prompts, row_prompt, budgets = rows_of(run, mix)
    compiled_prompt = sampler.bucket_length(s.max_prompt_len)
    prompt_width = sampler.bucket_length(int(prompts.max()))
    # Update: the compiled call is U0 micro-batches at compiled_prompt + L_max.
    u0 = t.rows_per_minibatch // t.micro_batch_size
    per_micro = programs["train"].roofline_s(chip) / u0
    if t.pack_rows:  # the same program every mini-batch, its empty micro-batches skipped
        widths = packed_micro_batches(run, responses, prompts[row_prompt] + mix.prefix)
        update_calls = sum(widths) / u0 * t.ppo_epochs  # in compiled mini-batches (all U0 full)
        update = update_calls * programs["train"].roofline_s(chip)
    else:
        full = work.forward_flops(np.array([compiled_prompt + s.rollout.max_response_len]))
        widths, _ = update_widths(run, responses)
        update = sum(per_micro * work.forward_flops(np.array([prompt_width + w])) / full
                     for mb in widths for w in mb) * t.ppo_epochs
        update_calls = t.mini_batches * t.ppo_epochs
    # Rollout.
    slots = min(s.rollout.max_batch or len(responses), len(responses))
    shards = chips // s.rollout.decode_tensor_parallel  # the slots' devices (sharding.decode_mesh)
    admit = -(-max(1, slots // 16) // shards) * shards  # engine.RefillEngine: default_admit, whole blocks
    limits = np.minimum(budgets, s.rollout.max_response_len)
    order = np.lexsort((np.arange(len(responses)), -limits))
    fill = prompts[row_prompt] + mix.prefix
    home = StoreLayout.assign(row_prompt, fill, limits, len(prompts), shards).home
    sched = lengths.refill_schedule(responses, fill, slots, admit, order, home, shards)
    prefill = programs["prefill"].roofline_s(chip) * (work.forward_flops(np.array([prompt_width]))
                                                      / work.forward_flops(np.array([compiled_prompt])))
    admit_equiv = sched.admit_calls - sched.full_fills + sched.full_fills * slots / admit
    admits = admit_equiv * programs["admit"].roofline_s(chip)
    d = programs["decode"]
    base_flops, base_bytes = _decode_parts(d)
    filled_pages = sched.filled.astype(np.float64)  # tokens; pages are read whole: + half a page a slot
    kv_tokens = (filled_pages + sched.running * s.rollout.page_size / 2) / chips
    step_bytes = base_bytes + work.kv_bytes * kv_tokens
    step_flops = base_flops + 4.0 * work.attn_width * work.layers * kv_tokens
    decode = float(np.maximum(step_flops / chip.peak_flops, step_bytes / chip.hbm_bandwidth).sum())
    decode += sched.segments * d.roofline_s(chip)
    # ICI, bytes sent per chip per step, by program.
    top_ups = page_top_ups(run, slots, chips, fill)
    # Collectives per micro-batch dominate the update's: a packed mini-batch's share of the
    # compiled one's (all U0 micro-batches) is its filled micro-batches' share.
    calls = {"train": update_calls, "prefill": 1, "admit": admit_equiv, "decode": sched.segments + top_ups}
    by_program, exposed, latency = {}, 0.0, 0.0
    compute = {"train": update, "prefill": prefill, "admit": admits, "decode": decode}
    for k, n in calls.items():
        once, per_step = ici.traffic(programs[k].text, chips)
        steps = sched.decode_steps if k == "decode" else 0
        sent = {a: n * ici.total_bytes(once, a) + steps * ici.total_bytes(per_step, a) for a in (True, False)}
        by_program[k] = (n, once, per_step, sent[True] + sent[False])
        # A synchronous collective stalls the chip (its bytes and its latency); asynchronous ones
        # run under the program's compute.
        latency += (n * ici.sync_count(once) + steps * ici.sync_count(per_step)) * ici.COLLECTIVE_LATENCY_S
        exposed += ici.ici_seconds(sent[False], chip.ici_bandwidth) + max(
            0.0, ici.ici_seconds(sent[True], chip.ici_bandwidth) - compute[k])
    exposed += latency
    # Host.
    handovers = 16  # RefillEngine.run(on_retire=...): the decode loop returns every R / 16 ends
    round_trips = sched.segments + top_ups + handovers + 1
    graders = max(run.grading_workers * hosts, 1)
    grading = max(len(responses) / handovers * host.grade / graders,
                  len(responses) * host.grade / graders - (prefill + admits + decode))
    host_s = round_trips * host.round_trip + (sched.admit_calls + top_ups) * host.admit_dispatch + grading
    total = sum(ici.ici_seconds(v[3], chip.ici_bandwidth) for v in by_program.values())
    return Terms(update, prefill, admits, decode, exposed, total, host_s, sched, admit_equiv,
                 widths, prompt_width, round_trips, grading, by_program, slots, top_ups, update_calls, latency)


def floor_of(run, cfg, chip, chips: int, mix: lengths.LengthMix) -> floor_lib.Floor:
    """The first-principles floor (floor.floor) of one step of `run` at `mix`."""
    responses, prompts, row_prompt, _ = rows_of(run, mix)
    return floor_lib.floor(floor_lib.Workload.of(cfg), responses, prompts, row_prompt, chips, chip.peak_flops,
                           chip.hbm_bandwidth, mix.prefix, run.sampling.rollout.decode_tensor_parallel)


def _widths(widths: list) -> str:
    """'16 x 1,024, 8 x 2,048' of the update's micro-batch widths, all mini-batches together."""
    values, counts = np.unique(np.concatenate([np.asarray(w) for w in widths]), return_counts=True)
    return ", ".join(f"{c} x {v:,}" for v, c in zip(values, counts))


def _terms_line(terms: Terms) -> str:
    return (f"update {terms.update:.1f} + rollout {terms.rollout:.1f} + ici {terms.ici:.1f} + host {terms.host:.1f}")


def lines(programs: dict, run, cfg, chip, chips: int, hosts: int, topology: str,
          mix: lengths.LengthMix) -> list[str]:
    """The plan's text: the projection of one step at `mix` and at the cap, the floor beside it,
    the collectives per step (ici.tables), and the plan's last line; programs: the refill
    engine's (tpu_plan.ProgramPlan by name), compiled for `chips` chips of `chip` in `hosts` hosts."""
    failed = [p.name for p in programs.values() if p.error]
    if failed:
        return [f"No projection: {', '.join(failed)} did not fit this slice at the config's shapes."]
    terms = project(programs, run, cfg, chip, chips, hosts, mix)
    cap = project(programs, run, cfg, chip, chips, hosts, mix.at_cap())
    fl = floor_of(run, cfg, chip, chips, mix)
    responses = rows_of(run, mix)[0]
    steps, sched, t = run.train.steps, terms.schedule, run.train
    u0 = t.rows_per_minibatch // t.micro_batch_size
    hours = lambda x: steps * x / 3600  # noqa: E731
    work = floor_lib.Workload.of(cfg)
    calls = {"train": terms.update_calls, "prefill": 1, "admit": terms.admit_equiv,
             "decode": (sched.segments + terms.top_ups, sched.decode_steps)}
    r = run.sampling.rollout
    slots = terms.slots
    ici_ms = {k: ici.ici_seconds(v[3], chip.ici_bandwidth) for k, v in terms.ici_by_program.items()}
    if t.pack_rows:
        from hbpo_jax.train import packing
        lanes, lane_len, _ = packing.layout_for(run)
        update = (f"  update:  {t.mini_batches * t.ppo_epochs} mini-batches, rows packed by tokens in lanes of "
                  f"{lane_len:,} ({lanes} lanes a micro-batch): {', '.join(f'{w:g}' for w in terms.widths)} of the "
                  f"compiled {u0} micro-batches (a half-lane one counts 1/2), the rest skipped: "
                  f"{terms.update_calls:.2f} compiled mini-batches = {terms.update:.2f} s")
    else:
        update = (f"  update:  {t.mini_batches * t.ppo_epochs} mini-batches of {u0} micro-batches cut to the rows' "
                  f"lengths (train.update_width_step={t.update_width_step}): widths {_widths(terms.widths)}, prompt "
                  f"bucket {terms.prompt_width:,} (compiled: {u0} x "
                  f"{sampler.bucket_length(run.sampling.max_prompt_len):,} + {r.max_response_len:,}) = "
                  f"{terms.update:.2f} s")
    pool = (f"pages on demand from a pool of {r.kv_tokens:,} tokens: {terms.top_ups} top-ups of the longest row, "
            f"each a round trip and a grow dispatch" if terms.top_ups else
            "no page grows: each row takes its whole limit at admission")
    return [
        f"Projection of one step at the length mix: {mix.describe(responses)}. Every program at its roofline "
        "(max(flops / peak, bytes / HBM bandwidth); flops XLA's, HBM bytes the HLO walk's) scaled to the rows' "
        "work (paper_step):",
        update,
        f"  rollout: refill engine over {slots} slots: {sched.admit_calls} admits ({sched.full_fills} "
        f"fill(s) of every slot, each costed as {slots // max(1, slots // 16)} "
        f"admits of the compiled width: {terms.admit_equiv:.0f} admit-equivalents), {sched.segments} decode "
        f"calls, {sched.decode_steps:,} decode "
        f"steps at {sched.tokens / max(sched.slot_steps, 1):.0%} slot utilization, KV read as filled (mean "
        f"{sched.filled.mean() / max(slots, 1):,.0f} tokens a slot): prefill {terms.prefill:.2f} + "
        f"admits {terms.admits:.2f} + decode {terms.decode:.2f} = {terms.rollout:.2f} s",
        f"  ici:     {terms.ici_total:.2f} s of collectives' bytes per step (update {ici_ms['train']:.2f}, admits "
        f"{ici_ms['admit']:.2f}, decode {ici_ms['decode']:.2f}, prefill {ici_ms['prefill']:.2f}) and "
        f"{terms.ici_latency:.2f} s of synchronous collectives' latency ({ici.COLLECTIVE_LATENCY_S * 1e6:.0f} us "
        f"each, stated): {terms.ici:.2f} s added (synchronous collectives stall the chip and add; asynchronous "
        "ones run under their program's compute and add only past it)",
        f"  host:    {terms.round_trips} round trips x {HOST.round_trip * 1e3:.1f} ms + "
        f"{sched.admit_calls + terms.top_ups} admit and grow dispatches x {HOST.admit_dispatch * 1e3:.1f} ms + "
        f"grading left after the rollout (the last {len(responses) // 16:,} of {len(responses):,} responses x "
        f"{HOST.grade * 1e3:.0f} ms / ({run.grading_workers} workers x {hosts} hosts); the rest graded while "
        f"decoding) {terms.grading:.2f} s = {terms.host:.2f} s (stated latencies, not measured; {pool})",
        f"  one step: {terms.step:.1f} s = {_terms_line(terms)}; {steps} steps: {hours(terms.step):.2f} h",
        f"At the cap (every row to {r.max_response_len:,} tokens, {cap.schedule.decode_steps:,} decode "
        f"steps): {cap.step:.1f} s = {_terms_line(cap)}; {steps} steps: {hours(cap.step):.2f} h",
        f"Floor (floor.py, from the model and the rows, not XLA's counts: {work.matmul_params / 1e9:.3f} B matmul "
        f"parameters, {work.kv_bytes:,.0f} B of KV a token, x{work.passes:.0f} forward flops to train (remat "
        f"{cfg.remat}), every chip at peak, no ICI or host): update {fl.update_s:.2f} s ({fl.trained_tokens:,} "
        f"real tokens), rollout {fl.rollout_s:.2f} s (all rows at once: {fl.decode_steps:,} decode steps of the "
        f"longest row, each reading {work.weight_bytes / r.decode_tensor_parallel / 1e9:.2f} GB of bfloat16 "
        f"weights{f' (1/{r.decode_tensor_parallel}: tensor-parallel decode)' if r.decode_tensor_parallel > 1 else ''} "
        f"and the filled KV per chip) = {fl.step_s:.1f} s; {steps} steps: {hours(fl.step_s):.2f} h; projection / floor "
        f"{terms.step / fl.step_s:.1f}x",
        f"Not in the step: compilation, once per run (the update "
        f"{'once' if t.pack_rows else f'at each of its {len(set(sum(terms.widths, [])))} widths'}, the engine's "
        f"programs, the fill admit at {slots} rows); this CPU compiled the "
        f"plan's {len(programs)} programs in {sum(p.compile_cpu_s for p in programs.values()):.0f} CPU-s.",
        "", *ici.tables(programs, chips, chip, calls), "",
        f"plan {topology}: paper run {hours(terms.step):.2f} h at mean response {responses.mean():,.0f} tokens (floor "
        f"{hours(fl.step_s):.2f} h, {terms.step / fl.step_s:.1f}x); step {terms.step:.1f} s = {_terms_line(terms)}",
    ]
