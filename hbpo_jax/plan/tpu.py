"""The TPU plan of a config: its programs compiled on this machine for a TPU topology (libtpu,
no TPU needed), read per chip: XLA's memory plan, flops and bytes, a roofline time at the chip's
peak, the collectives of the decode loop, and a roofline projection of a training run.

    python launch/memory.py --config=configs/qwen1_5b.py --topology=v5p:2x2x4

Programs (hbpo_jax.plan.programs, at the config's full shapes): the train step (one mini-batch
update), one micro-batch of the old-log-prob pass, the sampler's prefill and its decode loop.
Everything here is a plan, not a measurement: nothing runs on a TPU.
"""
from __future__ import annotations

import dataclasses
import time
from importlib import metadata

import jax
import numpy as np
from absl import logging

from hbpo_jax import sharding, spec
from hbpo_jax.plan import hlo, hlo_cost, ici, lengths, paper_step
from hbpo_jax.plan import programs as plan
from hbpo_jax.rollout import refill as engine
from hbpo_jax.rollout import static as sampler

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU chip: peak_flops (dense bf16 FLOP/s), hbm_bandwidth (bytes/s), hbm_bytes, source."""

    name: str
    peak_flops: float
    hbm_bandwidth: float
    hbm_bytes: float
    source: str
    ici_bandwidth: float = 0.0  # bidirectional ICI bytes/s per chip (0: no figure)


# Cloud TPU's system-architecture pages, "Peak compute per chip (bf16)" and "HBM capacity and
# bandwidth" (read 2026): https://cloud.google.com/tpu/docs/v4 (275 TFLOPs, 32 GiB, 1200 GBps),
# https://cloud.google.com/tpu/docs/v5e (197 TFLOPs, 16 GB, 819 GBps),
# https://cloud.google.com/tpu/docs/v5p (459 TFLOPs, 95 GB, 2765 GBps),
# https://cloud.google.com/tpu/docs/v6e (918 TFLOPs, 32 GB, 1638 GBps).
# The pages write GB for v5e, v5p and v6e and GiB for v4; HBM comes in GiB-sized stacks, so the
# capacities are taken as GiB. The runtime keeps part of HBM for itself: a plan near 100% may not fit.
# ICI: the same pages' "Bidirectional inter-chip interconnect (ICI) bandwidth (per chip)" (read
# 2026-12-07): v5e 400 GBps, v5p 1,200 GBps, v6e 800 GBps; v4's page gives no per-chip figure
# in that form, so none is used (its ICI time is left out and the plan says so).
CHIPS = {
    "v4": Chip("v4", 275e12, 1200e9, 32 * GiB, "https://cloud.google.com/tpu/docs/v4"),
    "v5e": Chip("v5e", 197e12, 819e9, 16 * GiB, "https://cloud.google.com/tpu/docs/v5e", 400e9),
    "v5p": Chip("v5p", 459e12, 2765e9, 95 * GiB, "https://cloud.google.com/tpu/docs/v5p", 1200e9),
    "v6e": Chip("v6e", 918e12, 1638e9, 32 * GiB, "https://cloud.google.com/tpu/docs/v6e", 800e9),
}
# Other names of the same chips: topology prefixes and jax's device_kind.
CHIP_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e", "tpu v4": "v4", "tpu v5 lite": "v5e",
                "tpu v5e": "v5e", "tpu v5": "v5p", "tpu v5p": "v5p", "tpu v6 lite": "v6e", "tpu v6e": "v6e"}


def chip_for(name: str) -> Chip:
    """The Chip of a topology name ("v5p:2x2x4"), a chip name ("v5e") or a device_kind ("TPU v5
    lite"); ValueError naming the known chips otherwise."""
    key = name.split(":")[0].strip().lower()
    key = CHIP_ALIASES.get(key, key)
    if key not in CHIPS:
        raise ValueError(f"no chip figures for {name!r}; known: {', '.join(sorted(CHIPS))}.")
    return CHIPS[key]


@dataclasses.dataclass
class ProgramPlan:
    """One compiled program, per chip. Bytes: args, outs, temps, alias (XLA's memory_analysis);
    xla_flops / xla_bytes: cost_analysis(), which counts each while-loop body once; seconds:
    lower_s, compile_s (wall clock), compile_cpu_s (this process's CPU time: compiling is mostly
    one thread, so this is what a machine of its own would take); text: the optimised HLO;
    error: why it did not compile (XLA's out-of-HBM message), "" when it did. From these
    (hlo_cost.loop_cost): flops / bytes of one call with every loop of known trip count times that
    count, and step_flops / step_bytes of one iteration of a loop whose exit depends on data (the
    decode loop; 0 elsewhere), left out of flops / bytes; flops are XLA's so scaled, bytes the
    HLO walk's HBM traffic (XLA's, scaled, only for a plan without HLO text)."""

    name: str
    shape: str
    args: float
    outs: float
    temps: float
    alias: float
    xla_flops: float
    xla_bytes: float
    lower_s: float
    compile_s: float
    text: str = dataclasses.field(repr=False, default="")
    compile_cpu_s: float = 0.0
    error: str = ""

    def __post_init__(self):
        cost = hlo_cost.loop_cost(hlo.Module(self.text))
        (self.flops, self.bytes), (self.step_flops, self.step_bytes) = cost.scale((self.xla_flops, self.xla_bytes))
        if self.text:
            # HBM bytes are the walk's own: XLA's count also holds the on-chip (VMEM) operands that
            # memory-space assignment placed there, which cost no HBM bandwidth (hlo.on_chip).
            self.bytes, self.step_bytes = cost.once[1], cost.per_iteration[1]

    @property
    def peak(self) -> float:
        """Bytes live at once per chip: arguments + outputs + temporaries - donated (aliased)."""
        return self.args + self.outs + self.temps - self.alias

    def roofline_s(self, chip: Chip, step: bool = False) -> float:
        """max(flops / peak FLOP/s, bytes / HBM bandwidth) of a call (step: of one data-dependent
        loop iteration), seconds at the chip's peak."""
        flops, nbytes = (self.step_flops, self.step_bytes) if step else (self.flops, self.bytes)
        return max(flops / chip.peak_flops, nbytes / chip.hbm_bandwidth)

    def bound(self, chip: Chip, step: bool = False) -> str:
        flops, nbytes = (self.step_flops, self.step_bytes) if step else (self.flops, self.bytes)
        return "compute" if flops / chip.peak_flops >= nbytes / chip.hbm_bandwidth else "memory"


def _cost(compiled) -> dict:
    cost = compiled.cost_analysis()
    return (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}


def analyse(name: str, shape: str, lower) -> ProgramPlan:
    """Lowers (`lower()`: a jax Lowered) and compiles one program and reads its plan; a program
    XLA finds too big for the chip's HBM comes back with `error` set (other errors raise)."""
    t0 = time.perf_counter()
    lowered = lower()
    t1, cpu = time.perf_counter(), time.process_time()
    cache = jax.config.jax_enable_compilation_cache
    try:
        # A program for a topology this process has no client for can be neither loaded from nor
        # usefully stored in a persistent compilation cache (jax warns on each read).
        jax.config.update("jax_enable_compilation_cache", False)
        compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001 (jax raises XlaRuntimeError / JaxRuntimeError)
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        error = str(e).strip().splitlines()[0]
        logging.warning("%s: %s", name, error)
        return ProgramPlan(name, shape, 0, 0, 0, 0, 0.0, 0.0, t1 - t0, time.perf_counter() - t1,
                           compile_cpu_s=time.process_time() - cpu, error=error)
    finally:
        jax.config.update("jax_enable_compilation_cache", cache)
    t2, cpu = time.perf_counter(), time.process_time() - cpu
    logging.info("%s: lowered in %.1f s, compiled in %.1f s (%.1f s CPU)", name, t1 - t0, t2 - t1, cpu)
    m, cost = compiled.memory_analysis(), _cost(compiled)
    return ProgramPlan(name, shape, m.argument_size_in_bytes, m.output_size_in_bytes, m.temp_size_in_bytes,
                       getattr(m, "alias_size_in_bytes", 0), float(cost.get("flops", 0.0)),
                       float(cost.get("bytes accessed", 0.0)), t1 - t0, t2 - t1, compiled.as_text(), cpu)


# ----------------------------------------------------------------------------- the projection

@dataclasses.dataclass(frozen=True)
class StepCounts:
    """How often one HBPO step runs each program (step.Step), every row at the cap: prefill_calls
    prefills, admit_calls admits (refill engine; 0 for static), decode_calls decode programs and
    decode_steps loop iterations in all (static: max_response_len - 1 per call, the first token
    comes from prefill's logits; refill: rows x (max_response_len - 1) / slots), logprob_calls
    micro-batches of the log-prob pass(es), updates optimizer updates; steps: train.steps."""

    prefill_calls: int
    admit_calls: int
    decode_calls: int
    decode_steps: int
    logprob_calls: int
    updates: int
    steps: int


def step_counts(run: spec.RunSpec, response_len: int | None = None) -> StepCounts:
    """The StepCounts of `run`, every row at the cap, or (refill engine) `response_len` tokens
    per row: the engine's decode steps follow the rows' lengths, the static sampler's a call's
    longest row (the cap)."""
    s, t = run.sampling, run.train
    rows = t.prompts_per_step * s.group
    refill = s.rollout.engine == "refill"
    per_row = max((response_len if response_len and refill else s.rollout.max_response_len) - 1, 0)
    logprobs, updates = plan.logprob_passes(run) * -(-rows // t.micro_batch_size), t.mini_batches * t.ppo_epochs
    if s.rollout.engine == "refill":
        slots = min(s.rollout.max_batch or rows, rows)
        admits = -(-rows // engine.RefillEngine.default_admit(slots))
        return StepCounts(1, admits, admits + 1, -(-rows * per_row // slots), logprobs, updates, t.steps)
    calls = -(-rows // s.rollout.max_batch) if s.rollout.max_batch else 1
    return StepCounts(calls, 0, calls, calls * per_row, logprobs, updates, t.steps)


def project(plans: dict[str, ProgramPlan], counts: StepCounts, chip: Chip) -> dict[str, float]:
    """Seconds of one step's parts at each program's roofline time: sampler (its prefills, admits,
    decode programs and decode_steps loop iterations), logprobs, updates, step; and run_hours =
    counts.steps steps. plans: keyed train / logprobs / prefill / decode (and admit)."""
    t = {k: p.roofline_s(chip) for k, p in plans.items()}
    step = plans["decode"].roofline_s(chip, step=True)
    sampler_s = (counts.prefill_calls * t["prefill"] + counts.admit_calls * t.get("admit", 0.0)
                 + counts.decode_calls * t["decode"] + counts.decode_steps * step)
    out = {"sampler": sampler_s,
           "logprobs": counts.logprob_calls * t["logprobs"], "updates": counts.updates * t["train"]}
    out["step"] = sum(out.values())
    out["run_hours"] = counts.steps * out["step"] / 3600
    return out


# ----------------------------------------------------------------------------- the report

PROGRAMS = ("train", "logprobs", "sampler")


def compile_programs(config, mesh, only: tuple[str, ...] = PROGRAMS) -> dict[str, ProgramPlan]:
    """The programs of `config` compiled on `mesh` (TPU topology devices or local ones): the train
    step, the log-prob pass and the sampler's (prefill and decode; the engine's admit too), or
    those of them named in `only` (a subset of PROGRAMS)."""
    unknown = set(only) - set(PROGRAMS)
    if unknown:
        raise ValueError(f"unknown programs {sorted(unknown)}; choose from {PROGRAMS}")
    run = spec.resolve(config, num_devices=mesh.devices.size, slices=sharding.num_slices(mesh.devices.flat))
    s, t = run.sampling, run.train
    width = sampler.bucket_length(s.max_prompt_len)
    rows = s.rollout.max_batch or t.prompts_per_step * s.group
    tokens = f"{width:,} + {s.rollout.max_response_len:,} tokens"
    programs = {}
    if "train" in only:
        programs["train"] = analyse("train step (one mini-batch update)",
                                    f"{t.rows_per_minibatch} rows x {tokens}, micro-batches of {t.micro_batch_size}",
                                    lambda: plan.lower_train_step(config, mesh))
    if "logprobs" in only:
        programs["logprobs"] = analyse("log-prob pass (one micro-batch)", f"{t.micro_batch_size} rows x {tokens}",
                                       lambda: plan.lower_logprobs(config, mesh))
    if "sampler" not in only:
        return programs
    t0 = time.perf_counter()
    if s.rollout.engine == "refill":
        eng, (prefill, admit, decode) = plan.lower_engine(config, mesh)
        lower_s = time.perf_counter() - t0
        cache = width + eng.start_width(plan.PREFIX_TOKENS) + s.rollout.max_response_len
        programs["prefill"] = analyse("engine prompt prefill", f"{t.prompts_per_step} prompts x {width:,} tokens",
                                      lambda: prefill)
        programs["admit"] = analyse("engine admit", f"{eng.admit_width} rows x {eng.start_width(plan.PREFIX_TOKENS)} "
                                    f"tokens, prompt KV copied on its chip", lambda: admit)
        programs["decode"] = analyse("engine decode loop", f"{eng.slots} slots, cache of {cache:,}", lambda: decode)
    else:
        prefill, decode = plan.lower_sampler(config, mesh)
        lower_s = time.perf_counter() - t0
        programs["prefill"] = analyse("sampler prefill", f"{rows} rows x {width:,} tokens", lambda: prefill)
        cache = width + s.rollout.max_response_len
        programs["decode"] = analyse("sampler decode loop", f"{rows} rows, cache of {cache:,}",
                                     lambda: decode)
    programs["prefill"].lower_s = lower_s  # the sampler's programs are lowered at once: counted once, here
    return programs


def _libtpu_version() -> str:
    try:
        return metadata.version("libtpu")
    except metadata.PackageNotFoundError:
        return "not installed"


def _row(p: ProgramPlan, chip: Chip, name: str, step: bool = False, memory: bool = True) -> str:
    flops, nbytes = (p.step_flops, p.step_bytes) if step else (p.flops, p.bytes)
    mem = (f"{p.args / GiB:.2f} | {p.outs / GiB:.2f} | {p.temps / GiB:.2f} | {p.peak / GiB:.2f} | "
           f"{p.peak / chip.hbm_bytes:.0%}") if memory else "| | | |"
    cpu = f" ({p.compile_cpu_s:.0f} CPU)" if p.compile_cpu_s else ""
    seconds = f"{p.lower_s:.1f} | {p.compile_s:.0f}{cpu}" if memory else "|"
    return (f"| {name} | {p.shape if memory else ''} | {mem} | {flops / 1e12:.3f} | {nbytes / 1e9:.2f} "
            f"| {p.roofline_s(chip, step) * 1e3:.2f} | {p.bound(chip, step)} | {seconds} |")


def program_table(programs: dict[str, ProgramPlan], chip: Chip) -> list[str]:
    """Markdown rows, per chip: one call of each program; a program with a data-dependent loop
    (decode) in two rows, one loop iteration and the rest of a call."""
    lines = ["| program | shape | args GiB | outs GiB | temps GiB | peak GiB | of HBM | TFLOP | HBM GB "
             "| roofline ms | bound | lower s | compile s (CPU s) |", "|---" * 13 + "|"]
    for p in programs.values():
        if p.error:
            lines.append(f"| {p.name} | {p.shape} | did not compile: {p.error} |" + " |" * 9
                         + f" {p.lower_s:.1f} | {p.compile_s:.0f} ({p.compile_cpu_s:.0f} CPU) |")
        elif p.step_bytes or p.step_flops:
            lines.append(_row(p, chip, f"{p.name}: one decode step", step=True))
            lines.append(_row(p, chip, f"{p.name}: the rest of a call (outside the loop)", memory=False))
        else:
            lines.append(_row(p, chip, p.name))
    return lines


def mover_lines(p: ProgramPlan, n: int) -> list[str]:
    """The `n` instructions of a compiled program that move the most HBM bytes per call (loop
    bodies times their trip counts; hlo_cost.top_movers), as a markdown table: where its roofline's
    bytes come from."""
    if p.error or n <= 0:
        return []
    movers = hlo_cost.top_movers(hlo.Module(p.text), n)
    lines = [f"{p.name}: the {len(movers)} instructions moving the most HBM bytes per call "
             f"(of {p.bytes / 1e9:,.1f} GB)",
             "| GB | share | TFLOP | runs | op | result | from |", "|---|---|---|---|---|---|---|"]
    for m in movers:
        lines.append(f"| {m.bytes / 1e9:,.2f} | {m.bytes / max(p.bytes, 1):.1%} | {m.flops / 1e12:,.2f} | {m.calls} | "
                     f"{m.opcode} | `{m.shape[:70]}` | {m.source[-70:]} |")
    return lines + [""]


def collective_lines(text: str) -> list[str]:
    """The collectives of each while loop in the entry of `text` (per iteration, per chip)."""
    lines = []
    for loop, items in hlo.loop_collectives(text).items():
        total = sum(c.result_bytes for c in items)
        lines += [f"Collectives in the decode loop ({loop}: body and condition, run every decode step), "
                  f"per chip: {len(items)}, {total / 2**20:.2f} MiB of results per step.",
                  "| collective | operand -> result | count | MiB each (result) | replica groups |",
                  "|---|---|---|---|---|"]
        lines += [f"| {c.opcode} | {c.operand_shape} -> {c.result_shape} | {n} | {c.result_bytes / 2**20:.3f} "
                  f"| {c.groups} |" for c, n in hlo.group_collectives(items)]
    return lines or ["No while loop in the decode program."]


def projection_lines(programs: dict[str, ProgramPlan], counts: StepCounts, chip: Chip,
                     at_budgets: tuple[int, StepCounts] | None = None) -> list[str]:
    """The projection's text; at_budgets: (mean response tokens, their StepCounts) for a second
    line with every row ending at its budget."""
    failed = [p.name for p in programs.values() if p.error]
    if failed:
        return [f"No projection: {', '.join(failed)} did not fit this slice at the config's shapes."]
    p = project(programs, counts, chip)
    budget_line = []
    if at_budgets:
        tokens, counts_b = at_budgets
        b = project(programs, counts_b, chip)
        budget_line = [f"  with every row ending at its budget (mean {tokens:,} tokens; the engine's decode steps "
                       f"follow the rows, each step still reads the KV at the cap): {counts_b.decode_steps:,} decode "
                       f"steps, sampler {b['sampler']:.1f} s; one HBPO step: {b['step']:.1f} s; "
                       f"{counts_b.steps} steps: {b['run_hours']:.2f} h"]
    ms = {k: v.roofline_s(chip) * 1e3 for k, v in programs.items()}
    step_ms = programs["decode"].roofline_s(chip, step=True) * 1e3
    return [
        "Projection (a roofline FLOOR, not a measurement: every program at max(flops / peak, bytes / HBM "
        "bandwidth) at the chip's peak, XLA's counts; no communication time, no host work, no grading):",
        f"  sampler:   {counts.prefill_calls} x prefill {ms['prefill']:.1f} ms + {counts.admit_calls} x admit "
        f"{ms.get('admit', 0.0):.1f} ms + {counts.decode_calls} x decode outside its loop {ms['decode']:.1f} ms + "
        f"{counts.decode_steps:,} decode steps x {step_ms:.3f} ms = {p['sampler']:.1f} s (every row at the cap; "
        "shorter rows end earlier: the refill engine's steps follow the mean length, the static sampler's each "
        "call's longest row)",
        f"  log-probs: {counts.logprob_calls} micro-batch calls x {ms['logprobs']:.1f} ms = {p['logprobs']:.1f} s",
        f"  updates:   {counts.updates} x {ms['train']:.1f} ms = {p['updates']:.1f} s",
        f"  one HBPO step: {p['step']:.1f} s; {counts.steps} steps (train.steps): {p['run_hours']:.2f} h",
        *budget_line,
    ]


def report(config, topology: str, slices: int = 1, only: tuple[str, ...] = PROGRAMS,
           mean_response: float | None = None) -> str:
    """The plan of `config` on `slices` slices of TPU `topology`, compiled here, as text (markdown
    tables); `only`: a subset of PROGRAMS; mean_response: the length mix scaled to that mean
    (default: the paper's steady state, lengths.LengthMix). ValueError (before anything
    compiles) for a chip without figures in CHIPS or an unknown program."""
    chip_for(topology)
    if set(only) - set(PROGRAMS):
        raise ValueError(f"unknown programs {sorted(set(only) - set(PROGRAMS))}; choose from {PROGRAMS}")
    mesh = plan.topology_mesh(config.mesh, topology, slices)
    return format_report(config, topology, mesh, compile_programs(config, mesh, only), mean_response)


def _margin_lines(programs: dict[str, ProgramPlan], chip: Chip) -> list[str]:
    """The largest peak of the compiled programs against the chip's HBM, and what is left."""
    done = [p for p in programs.values() if not p.error]
    if not done:
        return []
    top = max(done, key=lambda p: p.peak)
    left = chip.hbm_bytes - top.peak
    verdict = "fits" if left > 0 and len(done) == len(programs) else "does NOT fit"
    return [f"Largest peak: {top.peak / GiB:.2f} GiB of {chip.hbm_bytes / GiB:.0f} GiB ({top.name}): {verdict}, "
            f"margin {left / GiB:.2f} GiB (the runtime keeps some HBM for itself)."]


def length_mix(run, mean_response: float | None = None) -> lengths.LengthMix:
    """The paper's steady-state mix (lengths.LengthMix) at the run's cap, for its budgets (their
    means scaled with the budgets when the run's budgets are not the paper's), at `mean_response`."""
    s = run.sampling.rollout
    mix = lengths.LengthMix(cap=s.max_response_len)
    budgets = tuple(s.budgets) if s.mode == "budget" and s.budgets else ()
    paper = np.array([512, 1024, 2048, 2560], float)
    if not budgets:  # one subgroup: the paper's mean
        mix = dataclasses.replace(mix, means=(mix.mean_response,))
    elif budgets != tuple(paper.astype(int)):
        # Another budget set: each subgroup ends at the paper's length / budget ratio there.
        ratio = np.interp(budgets, paper, np.array(lengths.PAPER_MEANS) / paper)
        means = tuple(float(min(b * r, s.max_response_len)) for b, r in zip(budgets, ratio))
        mix = dataclasses.replace(mix, means=means)
    return mix.scaled(mean_response) if mean_response else mix


def format_report(config, topology: str, mesh, programs: dict[str, ProgramPlan],
                  mean_response: float | None = None) -> str:
    """The text of `report` from compiled programs (compile_programs on `mesh`)."""
    chip = chip_for(topology)
    slices = sharding.num_slices(mesh.devices.flat)
    run = spec.resolve(config, num_devices=mesh.devices.size, slices=slices)
    cfg = plan.model_config(run, mesh)
    lora = (f", LoRA rank {cfg.lora_rank} on {'/'.join(cfg.lora_targets)} (base frozen in {cfg.param_dtype}, "
            "adapters and their AdamW state float32)") if cfg.lora_rank else ""
    factors = ", ".join(f"{k} x{p.flops / p.xla_flops if p.xla_flops else 1:.1f}"
                        for k, p in programs.items() if not (p.step_flops or p.step_bytes or p.error))
    lines = [
        f"TPU plan of {config.name} ({cfg.num_params():,} parameters, {cfg.param_dtype}; compute {cfg.dtype}{lora}) on "
        f"{topology}{f' x {slices} slices' if slices > 1 else ''}: "
        f"{mesh.devices.size} chips ({mesh.devices.flat[0].device_kind}), mesh {dict(mesh.shape)}.",
        f"Compiled on this machine's CPU for the TPU topology (libtpu {_libtpu_version()}); nothing ran on a TPU.",
        f"Chip {chip.name}: {chip.peak_flops / 1e12:.0f} TFLOP/s bf16 dense, {chip.hbm_bandwidth / 1e12:.3f} TB/s HBM, "
        f"{chip.hbm_bytes / GiB:.0f} GiB HBM ({chip.source}).", "",
        "Per chip, per call:", *program_table(programs, chip), *_margin_lines(programs, chip), "",
        "peak = arguments + outputs + temporaries - aliased (donated) bytes, XLA's memory_analysis. TFLOP is XLA's "
        "cost_analysis, which counts a while-loop body once whatever its trip count; here each loop body is scaled "
        f"by its trip count read from the HLO ({factors}). HBM GB is an HLO walk's (hlo_cost): the operands and "
        "results of every instruction times the trip counts of its loops, left out what memory-space assignment "
        "placed on chip (S(1), VMEM: copy-start / copy-done move it, once, from and to HBM), which XLA's own "
        "'bytes accessed' counts too. The decode loop exits on data: one iteration of it is split out as one "
        "decode step; the projection multiplies the step by the number of steps. XLA counts nothing for a "
        "Pallas kernel (splash attention, paged attention): their flops and bytes are the walk's "
        "(hlo_cost.kernel_cost: splash's causal blocks; paged attention's reads with every slot at the cap).", ""]
    if "decode" in programs and not programs["decode"].error:
        d = programs["decode"]
        lines += [f"One decode step moves {d.step_bytes / 1e9:.2f} GB per chip; the decode program's arguments "
                  f"(the weights as laid out for decode, the KV cache full at the cap, the slots' state) are "
                  f"{d.args / 1e9:.2f} GB: the step reads {d.step_bytes / d.args:.0%} of them.",
                  *collective_lines(d.text), ""]
    paper = set(programs) >= {"train", "prefill", "admit", "decode"} and plan.logprob_passes(run) == 0
    if not paper:
        lines += ici.tables(programs, mesh.devices.size, chip)
    if paper:
        hosts = len({getattr(d, "process_index", 0) for d in mesh.devices.flat})
        lines += paper_step.lines(programs, run, cfg, chip, mesh.devices.size, hosts, topology,
                                  length_mix(run, mean_response))
    elif set(programs) >= {"train", "logprobs", "prefill", "decode"}:
        s = run.sampling
        r = s.rollout
        mean = round(sum(r.budgets) / len(r.budgets)) if r.mode == "budget" and r.engine == "refill" else 0
        lines += ["", *projection_lines(programs, step_counts(run), chip,
                                        (mean, step_counts(run, mean)) if mean else None)]
    return "\n".join(lines)
