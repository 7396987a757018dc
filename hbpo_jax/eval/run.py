"""The one evaluation path: every evaluation (the training loop's before / after and periodic
ones, launch/eval.py, the ablations) is `load_benchmarks` + `evaluate`, driven by a spec.EvalSpec
only, with `scalars` naming its numbers and eval.report building its tables and files.

`run(config, checkpoint, out_dir)` is launch/eval.py's job: it resolves the config's eval section
(spec.resolve_eval), loads the benchmarks of `eval.benchmarks` (default: the tiny task's eval
problems) before the model, so a bad file fails early, loads the policy from any checkpoint kind
(eval.checkpoints), filters long prompts, evaluates, and writes eval.report's files.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Sequence

import jax
import numpy as np

from hbpo_jax import spec as spec_lib
from hbpo_jax.data import readers as data
from hbpo_jax.errors import ConfigError
from hbpo_jax.eval import checkpoints, report, sets
from hbpo_jax.eval import scoring as evaluation
from hbpo_jax.rollout import prompting
from hbpo_jax.rollout import static as sampler

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- benchmarks

def load_benchmarks(eval_spec, tokenizer=None, *, tiny_records: list | None = None,
                    benchmarks: Sequence[tuple[str, str]] | None = None) -> list[sets.Benchmark]:
    """The benchmarks of an evaluation, their prompts filtered when `tokenizer` is given.

    eval_spec: spec.EvalSpec (max_problems, seed; max_prompt_len and system_prompt for the
      filter). benchmarks: (kind, arg) pairs; default eval_spec.benchmarks, else sets.TINY when
      `tiny_records` (the arithmetic task's eval problems) are given.
    tokenizer None: nothing is filtered yet (fit_prompts once it is known), so a bad file fails
      before a model loads. Raises ConfigError when there is nothing to evaluate.
    """
    specs = tuple(benchmarks if benchmarks is not None else eval_spec.benchmarks)
    specs = specs or ((sets.TINY,) if tiny_records is not None else ())
    if not specs:
        raise ConfigError("eval.benchmarks is empty and there is no task eval set; name benchmarks, "
                          "e.g. --config.eval.benchmarks='(\"math500:/data/math500.jsonl\",)'.")
    size = eval_spec.max_problems or sets.DEFAULT_RG_SIZE  # reasoning-gym problems to generate
    loaded = [sets.load(s, max_problems=eval_spec.max_problems, seed=eval_spec.seed, size=size,
                        tiny_records=tiny_records) for s in specs]
    return loaded if tokenizer is None else fit_prompts(loaded, tokenizer, eval_spec)


def fit_prompts(benchmarks: Sequence[sets.Benchmark], tokenizer, eval_spec) -> list[sets.Benchmark]:
    """Drops (in place) the problems whose chat-templated prompt is longer than
    eval_spec.max_prompt_len tokens (prompting.split_long_prompts, the one prompt filter), counted
    in each benchmark's report as "prompt_too_long"; logs each non-empty report."""
    for bench in benchmarks:
        kept, dropped = prompting.split_long_prompts(tokenizer, bench.records, eval_spec.max_prompt_len,
                                                   eval_spec.rollout.system_prompt)
        for i in dropped:
            bench.report.add("prompt_too_long", i)
        if not kept:
            raise data.DataError(f"benchmark {bench.name!r}: every prompt is longer than "
                                 f"rollout.max_prompt_len={eval_spec.max_prompt_len} tokens.")
        bench.records = kept
        if bench.report.total:
            log.warning("%s: %s", bench.name, bench.report.summary())
    return list(benchmarks)


# ----------------------------------------------------------------------------- evaluating

def _longest_prompt(tokenizer, problems: Sequence[str], modes: Sequence[prompting.ModeSpec],
                    system_prompt: str | None) -> int:
    """Tokens of the longest templated prompt plus its pre-filled prefix over `modes` (L1's
    suffix is in the prompt), counted as the sampler sees them."""
    longest = 0
    for mode in modes:
        layout = prompting.build_prompts(tokenizer, problems, budgets=mode.budget or None, mode=mode.mode,
                                       system_prompt=system_prompt)
        longest = max(longest, max(len(p) + len(x) for p, x in zip(layout.prompt_tokens, layout.prefix_tokens)))
    return longest


def evaluate(eval_spec, graphdef, params, tokenizer, benchmarks: Sequence, key: jax.Array, *,
             max_positions: int | None = None, mesh=None, rules=None) -> list[evaluation.BenchmarkResult]:
    """Every benchmark in every mode of `eval_spec` (spec.EvalSpec): evaluation.generate, then
    evaluation.score.

    benchmarks: sets.Benchmark list, prompts already filtered (load_benchmarks).
    Sampling follows eval_spec.rollout, eval_spec.batch_size problems per rollout call; its
    max_response_len is cut only where prompt + response would not fit the model's
    `max_positions` (default: the model's max_position_embeddings). Benchmark b, mode k samples
    with fold_in(fold_in(key, b), k), so a benchmark's numbers do not depend on which others run.
    Returns benchmark-major results;
    every process must call it (the sampler is collective).
    """
    if max_positions is None:
        max_positions = sampler.graphdef_cfg(graphdef, params).max_position_embeddings
    e = eval_spec
    results = []
    units, done, t0 = len(benchmarks) * len(e.modes), 0, time.time()
    for b, bench in enumerate(benchmarks):
        problems = [x["problem"] for x in bench.records]
        n = evaluation.max_new_tokens(e.rollout.max_response_len, max_positions,
                                      _longest_prompt(tokenizer, problems, e.modes, e.rollout.system_prompt))
        settings = e.rollout.replace(max_response_len=n)
        for k, mode in enumerate(e.modes):
            # Progress with an ETA: a real model's evaluation takes minutes per benchmark and mode.
            eta = "" if not done else f", ETA {(time.time() - t0) / done * (units - done) / 60:.1f} min"
            log.info("eval %d/%d: %s / %s, %d problems x %d samples (%.0f s so far%s)", done + 1, units,
                     bench.name, mode.name, len(problems), e.rollout.samples_per_budget, time.time() - t0, eta)
            texts, lengths = evaluation.generate(
                (graphdef, params), tokenizer, problems, mode, settings,
                key=jax.random.fold_in(jax.random.fold_in(key, b), k), batch_size=e.batch_size,
                mesh=mesh, rules=rules)
            results.append(evaluation.score(bench.name, mode, bench.records, texts, lengths,
                                            samples=e.rollout.samples_per_budget, workers=e.grading_workers,
                                            timeout_s=e.grading_timeout_s, answer_format=e.answer_format,
                                            scorer=bench.scorer if e.dataset_score else None))
            s = results[-1].summary()
            log.info("eval %s / %s: accuracy %.1f%%, mean tokens %.1f (%d problems x %d samples)",
                     bench.name, mode.name, s["accuracy"], s["mean_tokens"], s["problems"], s["samples"])
            done += 1
    return results


def scalars(summaries: Sequence[dict], prefix: str = "eval") -> dict[str, float]:
    """TensorBoard / metrics.jsonl scalars, always named <prefix>/<benchmark>/<mode>/{accuracy,
    mean_tokens, median_tokens} (and dataset_score, when the benchmark has its own scorer) and
    <prefix>/<benchmark>/<mode>/level_<l>/{accuracy,mean_tokens}."""
    out = {}
    for s in summaries:
        base = f"{prefix}/{s.get('benchmark', '')}/{s['mode']}"
        for key in ("accuracy", "mean_tokens", "median_tokens"):
            out[f"{base}/{key}"] = s[key]
        if "dataset_score" in s:
            out[f"{base}/dataset_score"] = s["dataset_score"]
        for level, v in s["by_level"].items():
            out[f"{base}/level_{level}/accuracy"] = v["accuracy"]
            out[f"{base}/level_{level}/mean_tokens"] = v["mean_tokens"]
    return out


# ----------------------------------------------------------------------------- launch/eval.py

def tiny_records(task: spec_lib.TaskSpec, seed: int) -> list | None:
    """The arithmetic task's eval problems, the ones the training loop evaluates (None for other
    tasks)."""
    if task.name != "arithmetic":
        return None
    from hbpo_jax.tasks import warmstart
    return warmstart.eval_records(task, seed)


def run(config, checkpoint: str, out_dir: str | None = None, *, workdir: str | None = None) -> dict:
    """Evaluates `checkpoint` (any kind eval.checkpoints loads) as the module docstring says.

    out_dir default: <workdir, or the run folder the checkpoint is in>/eval. Returns {paths,
    summaries, table, out_dir, accuracy (mean over results)}."""
    eval_spec = spec_lib.resolve_eval(config)  # the training keys do not matter here
    model = spec_lib.resolve_model(config)
    task = spec_lib.resolve_task(config, tuple(config.rollout.budgets))
    mesh_spec = spec_lib.resolve_mesh(config)  # the config goes no further
    mesh, rules = mesh_spec.make(), mesh_spec.rules
    benchmarks = load_benchmarks(eval_spec, tiny_records=tiny_records(task, eval_spec.seed))  # before the model
    policy = checkpoints.load_policy(checkpoint, model, workdir=workdir, mesh=mesh, rules=rules)
    fit_prompts(benchmarks, policy.tokenizer, eval_spec)
    results = evaluate(eval_spec, policy.graphdef, policy.params, policy.tokenizer, benchmarks,
                       jax.random.key(eval_spec.seed), max_positions=policy.cfg.max_position_embeddings,
                       mesh=mesh, rules=rules)
    up = 2 if policy.kind == "train_step" else 1  # <workdir>/checkpoints/<step> or <workdir>/export
    out_dir = out_dir or os.path.join(workdir or os.path.abspath(os.path.join(policy.path, *[".."] * up)), "eval")
    meta = {"checkpoint": policy.path, "checkpoint_kind": policy.kind,
            "modes": [m.name for m in eval_spec.modes], "samples": eval_spec.rollout.samples_per_budget,
            "temperature": eval_spec.rollout.temperature, "top_p": eval_spec.rollout.top_p,
            "max_response_len": eval_spec.rollout.max_response_len, "seed": eval_spec.seed,
            "answer_format": eval_spec.answer_format, "prompt_format": eval_spec.prompt_format,
            "system_prompt": eval_spec.rollout.system_prompt,
            "interval": "normal approximation over per-problem means (1.96 sd/sqrt(P))"}
    skipped = {b.name: b.report.summary() for b in benchmarks}
    summaries = [r.summary() for r in results]
    paths = {}
    if jax.process_index() == 0:  # every process computed the same results
        paths = report.write(results, out_dir, meta=meta, skipped=skipped)
    return {"paths": paths, "summaries": summaries, "table": report.markdown(summaries),
            "out_dir": out_dir, "accuracy": float(np.mean([s["accuracy"] for s in summaries]))}
