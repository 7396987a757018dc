"""The evaluation job (launch/eval.py) and the training loop's periodic evaluation.

`run(config, checkpoint, out_dir)` loads a policy from any of
  * a Hugging Face folder (config.json + safetensors; e.g. a run's `export/`),
  * a params checkpoint (checkpoint.save_params: config.json + params/; e.g. `warmstart/`),
  * a training-checkpoint step folder (`<workdir>/checkpoints/<step>`: its params only), or
  * a run's workdir (its newest training checkpoint),
evaluates it on `eval.benchmarks` (eval_sets specs; default: the tiny task's eval problems) in
every `eval.modes` mode with `eval.samples` samples per problem at `eval.temperature` / `top_p`,
and writes eval_report's files. The tokenizer is the checkpoint's own, else the first one found
in --workdir, the model_path, or the folders above the checkpoint (a tiny run keeps its tokenizer
in `<workdir>/tokenizer-<hash>/`).
"""
from __future__ import annotations

import dataclasses
import glob
import logging
import os
from typing import Any, Sequence

import jax
import numpy as np

from hbpo_jax import checkpoint as ckpt_lib
from hbpo_jax import config as config_lib
from hbpo_jax import data, rollout, sharding
from hbpo_jax.eval import report as eval_report
from hbpo_jax.eval import sets as eval_sets
from hbpo_jax.eval import evaluation
from hbpo_jax.models import load_pretrained
from hbpo_jax.models.config import ModelConfig
from hbpo_jax.models.hf import load_tokenizer, read_hf_config

log = logging.getLogger(__name__)


@dataclasses.dataclass
class LoadedPolicy:
    graphdef: Any
    params: Any  # nnx.State on the mesh
    tokenizer: Any
    cfg: ModelConfig
    kind: str  # "hf", "params", "train_step"
    path: str


def _is_hf(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json")) and any(
        os.path.isfile(os.path.join(path, n)) for n in ("model.safetensors", "model.safetensors.index.json"))


def _latest_step(checkpoints: str) -> str:
    steps = sorted((int(n) for n in os.listdir(checkpoints) if n.isdigit()
                    and os.path.isdir(os.path.join(checkpoints, n, "state"))), reverse=True)
    if not steps:
        raise FileNotFoundError(f"{checkpoints}: no training checkpoints (step folders with state/).")
    return os.path.join(checkpoints, str(steps[0]))


def find_tokenizer(folders: Sequence[str]):
    """The first tokenizer in `folders` (tokenizer.json there, else one `tokenizer-*/` below);
    None when there is none."""
    for folder in folders:
        if not folder or not os.path.isdir(folder):
            continue
        if os.path.isfile(os.path.join(folder, "tokenizer.json")):
            return load_tokenizer(folder)
        found = sorted(glob.glob(os.path.join(folder, "tokenizer-*", "tokenizer.json")), key=os.path.getmtime)
        if found:
            if len(found) > 1:
                log.warning("%s holds %d tokenizers; using the newest, %s.", folder, len(found), found[-1])
            return load_tokenizer(os.path.dirname(found[-1]))
    return None


def _train_step_params(step_dir: str, cfg: ModelConfig, mesh, rules):
    """The params of a TrainCheckpointer step folder, restored alone onto the mesh."""
    import orbax.checkpoint as ocp
    from flax import nnx

    graphdef, state, targets = ckpt_lib.abstract_params(cfg, mesh, rules)
    # The TrainState stores each nnx variable as {"value": array}.
    item = {"params": jax.tree.map(lambda x: {"value": x}, targets)}
    restored = ocp.PyTreeCheckpointer().restore(
        os.path.join(step_dir, "state"), args=ocp.args.PyTreeRestore(
            item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True))
    params = jax.tree.map(lambda v: v["value"], restored["params"],
                          is_leaf=lambda v: isinstance(v, dict) and set(v) == {"value"})
    nnx.replace_by_pure_dict(state, params)
    return graphdef, state


def load_policy(checkpoint: str, config, *, workdir: str | None = None, mesh=None,
                rules=sharding.DEFAULT_RULES) -> LoadedPolicy:
    """Loads a policy from any checkpoint kind of the module docstring; raises FileNotFoundError
    naming the path when it is none of them or no tokenizer is found."""
    from flax import nnx

    path = os.path.abspath(os.fspath(checkpoint))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint {checkpoint!r} does not exist.")
    m = config.model
    dtype = m.get("param_dtype", "float32")
    if os.path.isdir(os.path.join(path, "checkpoints")):  # a run's workdir
        workdir = workdir or path
        path = _latest_step(os.path.join(path, "checkpoints"))
    parents = [os.path.dirname(path), os.path.dirname(os.path.dirname(path))]
    if os.path.isdir(os.path.join(path, "state")):
        run_dir = workdir or parents[1]
        source = next((d for d in (os.path.join(run_dir, "warmstart"), config.model_path)
                       if d and os.path.isfile(os.path.join(d, "config.json"))), None)
        if source is None:
            raise FileNotFoundError(f"{path}: a training checkpoint, but no model config.json in "
                                    f"{run_dir}/warmstart or config.model_path; pass --workdir.")
        cfg = ModelConfig.from_hf(read_hf_config(source), source=source, param_dtype=dtype,
                                  dtype=m.get("dtype") or dtype)
        graphdef, params = _train_step_params(path, cfg, mesh, rules)
        kind = "train_step"
    elif os.path.isdir(os.path.join(path, "params")):
        model = ckpt_lib.restore_params(path, mesh=mesh, rules=rules, dtype=dtype)
        cfg, kind = model.cfg, "params"
        graphdef, params = nnx.split(model)
    elif _is_hf(path):
        model, cfg, _ = load_pretrained(path, dtype=dtype, compute_dtype=m.get("dtype"), mesh=mesh,
                                        rules=rules, with_tokenizer=False)
        graphdef, params = nnx.split(model)
        kind = "hf"
    else:
        raise FileNotFoundError(f"{path}: not a Hugging Face folder, a params checkpoint (params/), a "
                                "training checkpoint (state/) or a run workdir (checkpoints/).")
    tokenizer = find_tokenizer([path, workdir, config.model_path, *parents])
    if tokenizer is None:
        raise FileNotFoundError(f"{path}: no tokenizer in the checkpoint, --workdir, model_path or the "
                                "folders above it.")
    return LoadedPolicy(graphdef, params, tokenizer, cfg, kind, path)


def tiny_records(config) -> list | None:
    """The arithmetic task's eval problems, as loop.py builds them (None for other tasks)."""
    if config.task.name != "arithmetic":
        return None
    from hbpo_jax.tasks import arithmetic
    return arithmetic.make_dataset(config.task.eval_problems, config.seed + 3)


def load_sets(config, tiny: list | None) -> list[eval_sets.Benchmark]:
    """The benchmarks of eval.benchmarks (default: "tiny" when the task has an eval set)."""
    e = config.eval
    specs = tuple(e.benchmarks) or (("tiny",) if tiny is not None else ())
    if not specs:
        raise config_lib.ConfigError("eval.benchmarks is empty and there is no task eval set; name "
                                     "benchmarks, e.g. --config.eval.benchmarks='(\"math500:/data/math500.jsonl\",)'.")
    size = e.max_problems or eval_sets.DEFAULT_RG_SIZE
    return [eval_sets.load(spec, max_problems=e.max_problems, seed=config.seed, size=size, tiny_records=tiny)
            for spec in specs]


def drop_long_prompts(benchmarks: Sequence[eval_sets.Benchmark], tokenizer, config) -> None:
    """Drops (in place) problems whose templated prompt exceeds rollout.max_prompt_len tokens,
    counted in each benchmark's report as "prompt_too_long"; logs each non-empty report."""
    r = config.rollout
    for bench in benchmarks:
        lengths = rollout.prompt_lengths(tokenizer, [x["problem"] for x in bench.records], r.system_prompt or None)
        kept = []
        for i, (rec, n) in enumerate(zip(bench.records, lengths)):
            if n > r.max_prompt_len:
                bench.report.add("prompt_too_long", i)
            else:
                kept.append(rec)
        if not kept:
            raise data.DataError(f"benchmark {bench.name!r}: every prompt is longer than "
                                 f"rollout.max_prompt_len={r.max_prompt_len} tokens.")
        bench.records = kept
        if bench.report.total:
            log.warning("%s: %s", bench.name, bench.report.summary())


def evaluate_sets(config, graphdef, params, tokenizer, model_cfg: ModelConfig,
                  benchmarks: Sequence[eval_sets.Benchmark], key: jax.Array, *, mesh=None,
                  rules=None) -> list[evaluation.BenchmarkResult]:
    """Every benchmark in every eval.modes mode (generate, then score)."""
    e, r = config.eval, config.rollout
    modes = evaluation.parse_modes(tuple(e.modes), tuple(r.budgets))
    prefix = max(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in (
        rollout.EFFICIENCY_PREFIX, rollout.BUDGET_PREFIX.format(budget=max(m.budget for m in modes) or 1),
        rollout.L1_SUFFIX.format(budget=max(m.budget for m in modes) or 1)))
    results = []
    for b, bench in enumerate(benchmarks):
        problems = [x["problem"] for x in bench.records]
        longest = int(rollout.prompt_lengths(tokenizer, problems, r.system_prompt or None).max())
        n = evaluation.max_new_tokens(e.max_response_len or r.max_response_len,
                                      model_cfg.max_position_embeddings, longest + prefix)
        for k, mode in enumerate(modes):
            texts, lengths = evaluation.generate(
                (graphdef, params), tokenizer, problems, mode, samples=e.samples, max_new_tokens=n,
                key=jax.random.fold_in(jax.random.fold_in(key, b), k), temperature=e.temperature,
                top_p=e.top_p, batch_size=e.batch_size, max_batch=r.max_batch,
                prefix_in_response=r.prefix_in_response, system_prompt=r.system_prompt or None,
                mesh=mesh, rules=rules)
            results.append(evaluation.score(bench.name, mode, bench.records, texts, lengths,
                                            samples=e.samples, workers=config.grading.workers,
                                            timeout_s=config.grading.timeout_s))
            s = results[-1].summary()
            log.info("eval %s / %s: accuracy %.1f%%, mean tokens %.1f", bench.name, mode.name,
                     s["accuracy"], s["mean_tokens"])
    return results


def scalars(summaries: Sequence[dict]) -> dict[str, float]:
    """TensorBoard scalars: eval/<mode>/{accuracy,mean_tokens,median_tokens} (and
    .../level_<l>/...) with one benchmark; eval/<benchmark>/<mode>/... with several."""
    several = len({s["benchmark"] for s in summaries}) > 1
    out = {}
    for s in summaries:
        base = f"eval/{s['benchmark']}/{s['mode']}" if several else f"eval/{s['mode']}"
        for key in ("accuracy", "mean_tokens", "median_tokens"):
            out[f"{base}/{key}"] = s[key]
        for level, v in s["by_level"].items():
            out[f"{base}/level_{level}/accuracy"] = v["accuracy"]
            out[f"{base}/level_{level}/mean_tokens"] = v["mean_tokens"]
    return out


def run(config, checkpoint: str, out_dir: str | None = None, *, workdir: str | None = None) -> dict:
    """Evaluates `checkpoint` as the module docstring says; returns {paths, summaries, table}."""
    config_lib.validate_eval(config)  # the training keys do not matter here
    mesh = sharding.mesh_from_config(config.mesh)
    rules = sharding.rules_from_config(config.mesh)
    benchmarks = load_sets(config, tiny_records(config))  # bad files fail before the model loads
    policy = load_policy(checkpoint, config, workdir=workdir, mesh=mesh, rules=rules)
    drop_long_prompts(benchmarks, policy.tokenizer, config)
    results = evaluate_sets(config, policy.graphdef, policy.params, policy.tokenizer, policy.cfg, benchmarks,
                            jax.random.key(config.seed), mesh=mesh, rules=rules)
    up = 2 if policy.kind == "train_step" else 1  # <workdir>/checkpoints/<step> or <workdir>/export
    out_dir = out_dir or os.path.join(workdir or os.path.abspath(os.path.join(policy.path, *[".."] * up)), "eval")
    e = config.eval
    meta = {"checkpoint": policy.path, "checkpoint_kind": policy.kind, "modes": list(e.modes),
            "samples": e.samples, "temperature": e.temperature, "top_p": e.top_p,
            "seed": config.seed, "interval": "normal approximation over per-problem means (1.96 sd/sqrt(P))"}
    skipped = {b.name: b.report.summary() for b in benchmarks}
    summaries = [r.summary() for r in results]
    paths = {}
    if jax.process_index() == 0:
        paths = eval_report.write(results, out_dir, meta=meta, skipped=skipped)
    return {"paths": paths, "summaries": summaries, "table": eval_report.markdown(summaries),
            "out_dir": out_dir, "accuracy": float(np.mean([s["accuracy"] for s in summaries]))}
