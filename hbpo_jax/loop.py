"""The HBPO training loop: rollouts -> grading -> rewards and advantages -> policy updates, with
checkpoints, metrics, resumption and a final export. `run(config, workdir)` is the main job.

One step with P prompts, G = budgets x samples rollouts each (R = P * G rows, prompt-major):
  budget_rollouts (jitted sampler, KV cache)  ->  grade_batch (worker processes)
  ->  loss.compute_advantages (by objective name)  ->  old log-probs (sampler, recomputed where
  the sampler did not sample, e.g. the pre-filled budget prefix)  ->  mini-batch updates.

Several processes (a TPU pod slice, one per host, one global mesh): every process reads the same
global prompt batch, gathers all rollouts to its host and grades them all (grading is duplicated
per host), so host-side values are identical everywhere; the win is simplicity and runs that equal
a one-process run on the same mesh (tests/test_multiprocess.py).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from hbpo_jax import checkpoint, data, grading
from hbpo_jax.eval import evaluation
from hbpo_jax import loss as loss_lib
from hbpo_jax import metrics as metrics_lib
from hbpo_jax import rollout, sampler, sharding, trainer
from hbpo_jax import config as config_lib
from hbpo_jax.models import create_model, load_pretrained, save_pretrained

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. too many consecutive non-finite steps); a checkpoint was kept."""


@dataclasses.dataclass
class Policy:
    graphdef: Any
    params: Any  # nnx.State, sharded on the mesh
    tokenizer: Any
    train_records: list
    eval_records: list
    cache_dir: str | None = None  # where a cached warm start lives (its evaluation is cached too)


# ----------------------------------------------------------------------------- setup

WARM_START_SETTINGS = "sft_settings.json"


def _warm_start_settings(config, budgets, model_cfg) -> dict:
    """What the cached warm start was built from, flat and JSON-normalised: "task.<key>" for the
    task's data and SFT settings, "model.<key>" for the architecture, and "seed"."""
    task = {k: v for k, v in config.task.to_dict().items()
            if k.startswith(("sft_", "tokenizer_")) or k == "name"}
    task["sft_budgets"] = budgets  # the budgets actually used (sft_budgets or rollout.budgets)
    model = {k: v for k, v in model_cfg.to_hf().items() if k not in ("dtype", "torch_dtype")}
    flat = {**{f"task.{k}": v for k, v in task.items()}, **{f"model.{k}": v for k, v in model.items()},
            "seed": config.seed}
    return json.loads(json.dumps(flat))  # tuples as lists, as they come back from the file


def _check_warm_start_settings(warm: str, settings: dict) -> None:
    """Refuses a cached warm start built from other settings: reusing it would silently train
    from a model the config does not describe (a changed SFT setting needs a fresh workdir)."""
    path = os.path.join(warm, WARM_START_SETTINGS)
    if not os.path.exists(path):
        log.warning("warm start: %s has no %s (an older cache); using it as it is", warm, WARM_START_SETTINGS)
        return
    cached = _read_json(path)
    # A setting added since the cache was written was at its default then.
    defaults = json.loads(json.dumps(
        {f"task.{k}": v for k, v in config_lib.base_config().task.to_dict().items()}))
    cached = {**{k: v for k, v in defaults.items() if k in settings}, **cached}
    diff = [f"{k}: cached {cached.get(k)!r}, config {v!r}" for k, v in sorted(settings.items())
            if cached.get(k) != v]
    if diff:
        raise ValueError(f"{warm} was built with other settings ({'; '.join(diff)}). Use a new --workdir, "
                         f"or delete {warm} to rebuild the warm start there.")


def _arithmetic_policy(config, workdir: str, mesh, rules) -> Policy:
    """The tiny run's world: its tokenizer, problems, and an SFT warm start cached in workdir."""
    from hbpo_jax.tasks import sft
    from hbpo_jax.tasks import tokenizer as tokenizer_lib
    from hbpo_jax.tasks import arithmetic

    t, r = config.task, config.rollout
    budgets = tuple(t.get("sft_budgets", ())) or tuple(r.budgets)
    tokenizer = tokenizer_lib.build_tokenizer(
        arithmetic.corpus_texts(seed=config.seed, budgets=budgets),
        vocab_size=t.tokenizer_vocab_size, workdir=workdir,
        whole_words=tuple(str(b) for b in budgets) if t.tokenizer_whole_budgets else ())
    # The task's tokenizer decides the vocabulary (rounded up to a multiple of 8).
    model_cfg = config_lib.model_config(config).replace(
        vocab_size=-(-len(tokenizer) // 8) * 8, eos_token_ids=(tokenizer.eos_token_id,))
    warm = os.path.join(workdir, "warmstart")
    settings = _warm_start_settings(config, budgets, model_cfg)
    if os.path.isdir(os.path.join(warm, "params")):
        _check_warm_start_settings(warm, settings)
        log.info("warm start: restoring the cached SFT model from %s", warm)
        model = checkpoint.restore_params(warm, mesh=mesh, rules=rules, dtype=model_cfg.param_dtype)
    else:
        examples = arithmetic.sft_examples(t.sft_examples, config.seed + 1, budgets=budgets,
                                           budget_prior=t.get("sft_budget_prior", 0.0),
                                           budget_scales=tuple(t.get("sft_budget_scales", ())))
        arrays = sft.tokenize_sft(tokenizer, examples, t.sft_max_len)
        model = create_model(model_cfg, seed=config.seed, mesh=mesh, rules=rules)
        result = sft.sft_train(model, arrays, steps=t.sft_steps, lr=t.sft_lr, batch_size=t.sft_batch_size,
                               seed=config.seed, mesh=mesh, rules=rules, log=log.info)
        model = result.model()
        log.info("warm start: %d SFT steps in %.0fs, final loss %.3f", t.sft_steps, result.seconds,
                 float(result.losses[-10:].mean()))
        checkpoint.save_params(warm, model)
        _write_json(os.path.join(warm, WARM_START_SETTINGS), settings)
    graphdef, params = nnx.split(model)
    train = arithmetic.make_dataset(t.train_problems, config.seed + 2)
    evals = arithmetic.make_dataset(t.eval_problems, config.seed + 3)
    return Policy(graphdef, params, tokenizer, train, evals, cache_dir=warm)


def _pretrained_policy(config, mesh, rules) -> Policy:
    m = config.model
    overrides = {k: m[k] for k in ("attention_impl", "remat") if k in m}
    model, _, tokenizer = load_pretrained(config.model_path, dtype=m.get("param_dtype", "float32"),
                                          compute_dtype=m.get("dtype"), mesh=mesh, rules=rules, **overrides)
    if tokenizer is None:
        raise FileNotFoundError(f"{config.model_path}: no tokenizer files (tokenizer.json) in the model folder.")
    if not getattr(tokenizer, "chat_template", None):
        raise config_lib.ConfigError(f"{config.model_path}: the tokenizer has no chat template.")
    records, report = data.load_records(config.data.path, split=config.data.split,
                                        field_map=config.data.field_map or None,
                                        max_rows=config.data.max_rows or None)
    if report.total:
        log.warning("data: %s", report.summary())
    records = _drop_long_prompts(records, tokenizer, config.rollout)
    graphdef, params = nnx.split(model)
    return Policy(graphdef, params, tokenizer, records, [])


def _drop_long_prompts(records: list, tokenizer, rollout_cfg) -> list:
    """Drops (and counts) problems whose templated prompt exceeds rollout.max_prompt_len tokens."""
    lengths = rollout.prompt_lengths(tokenizer, [r["problem"] for r in records],
                                     rollout_cfg.system_prompt or None)
    keep = lengths <= rollout_cfg.max_prompt_len
    if not keep.all():
        log.warning("data: %d of %d problems are longer than rollout.max_prompt_len=%d tokens and are "
                    "skipped (longest: %d).", int((~keep).sum()), len(records), rollout_cfg.max_prompt_len,
                    int(lengths.max()))
    kept = [r for r, k in zip(records, keep) if k]
    if not kept:
        raise config_lib.ConfigError(f"rollout.max_prompt_len={rollout_cfg.max_prompt_len}: no problem is short enough.")
    return kept


def build_policy(config, workdir, mesh, rules) -> Policy:
    if config.task.name == "arithmetic":
        return _arithmetic_policy(config, workdir, mesh, rules)
    if config.task.name:
        raise config_lib.ConfigError(f"task.name must be '' or 'arithmetic', got {config.task.name!r}.")
    if not config.model_path:
        raise config_lib.ConfigError("model_path is empty: name a Hugging Face model folder (or set task.name).")
    return _pretrained_policy(config, mesh, rules)


# ----------------------------------------------------------------------------- one step

def _bucket(n: int, multiple: int = 64) -> int:
    return max(multiple, -(-n // multiple) * multiple)


def _objective_settings(objective: loss_lib.Objective, config) -> dict:
    """The config.objective values that this objective's reward / advantage functions take."""
    o = config.objective
    candidates = dict(beta=o.beta, l_max=o.l_max, variant=o.reward_variant, format_reward=o.format_reward,
                      wrong_reward=o.wrong_reward, intra_weight=o.intra_weight)
    settings = {k: v for k, v in candidates.items() if k in objective.setting_names()}
    if objective.overlong_penalty:
        settings.update(max_len=o.l_max, cache_len=max(o.l_max // 8, 1))
    return settings


def _loss_kwargs(objective: loss_lib.Objective, config, rows_per_minibatch: int) -> tuple:
    kw = dict(objective.loss_kwargs())
    kw.update(clip_low=config.loss.clip_low, clip_high=config.loss.clip_high,
              dual_clip=config.loss.dual_clip, kl_coef=config.loss.kl_coef)
    if config.loss.aggregation != "token-mean" or objective.name == "hbpo":
        kw["aggregation"] = config.loss.aggregation
    if kw["aggregation"] == "token-sum-norm":  # Dr. GRPO: one constant for every mini-batch
        kw["loss_scale_tokens"] = float(rows_per_minibatch * config.rollout.max_response_len)
    return tuple(sorted(kw.items()))


def _per_budget(values: np.ndarray, budgets: np.ndarray, name: str) -> dict:
    return {f"{name}/budget_{int(b)}": float(values[budgets == b].mean()) for b in np.unique(budgets)}


class Step:
    """Runs training steps; holds what stays fixed across them (jitted functions, shardings)."""

    def __init__(self, config, policy: Policy, mesh, rules, total_updates: int):
        self.config, self.policy, self.mesh, self.rules = config, policy, mesh, rules
        self.objective = loss_lib.get_objective(config.objective.name)
        self.settings = _objective_settings(self.objective, config)
        r, t = config.rollout, config.train
        self.group = r.rollouts_per_prompt
        self.rows_per_minibatch = t.prompts_per_step // t.mini_batches * self.group
        self.loss_kwargs = _loss_kwargs(self.objective, config, self.rows_per_minibatch)
        self.optimizer = trainer.make_optimizer(config.optim, total_updates)
        batch_axes = sharding.logical_to_spec(("batch",), rules, mesh)[0]
        self.micro_sharding = NamedSharding(mesh, PartitionSpec(None, batch_axes))
        self.row_sharding = NamedSharding(mesh, PartitionSpec(batch_axes))
        self.replicated = NamedSharding(mesh, PartitionSpec())
        self.ref_params = (jax.tree.map(jnp.copy, policy.params) if config.loss.kl_coef > 0 else None)

    def _logprobs(self, params, tokens, attn, prompt_len):
        """Log-probs of the whole batch, micro-batch by micro-batch: float32 [R, N]."""
        mb = self.config.train.micro_batch_size
        out = [trainer.compute_logprobs(self.policy.graphdef, params,
                                        jax.device_put(tokens[i:i + mb], self.row_sharding),
                                        jax.device_put(attn[i:i + mb], self.row_sharding),
                                        prompt_len=prompt_len, temperature=self.config.rollout.temperature)
               for i in range(0, len(tokens), mb)]
        return np.concatenate([sharding.to_host(x) for x in out])

    def __call__(self, state: trainer.TrainState, records: list, key) -> tuple[trainer.TrainState, dict]:
        c, r = self.config, self.config.rollout
        t0 = time.perf_counter()
        batch = rollout.budget_rollouts(
            (self.policy.graphdef, state.params), self.policy.tokenizer, [x["problem"] for x in records],
            budgets=tuple(r.budgets), samples_per_budget=config_lib.samples_per_budget(c), mode=r.mode,
            max_new_tokens=r.max_response_len, prefix_in_response=r.prefix_in_response,
            hard_budget_cap=r.hard_budget_cap, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
            key=key, mesh=self.mesh, rules=self.rules, system_prompt=r.system_prompt or None,
            max_batch=r.max_batch)
        lengths = np.asarray(batch.lengths)
        t1 = time.perf_counter()

        truths = [records[i]["answer"] for i in np.asarray(batch.prompt_index)]
        grades = grading.grade_batch(list(batch.texts), truths, workers=c.grading.workers,
                                     timeout_s=c.grading.timeout_s)
        correct = np.array([g.correct for g in grades], bool)
        format_ok = np.array([g.format_ok for g in grades], bool)
        t2 = time.perf_counter()

        shape = (len(records), self.group)
        budgets = np.asarray(batch.budgets, np.int32)
        rewards, adv = loss_lib.compute_advantages(
            self.objective, correct.reshape(shape), format_ok.reshape(shape), lengths.reshape(shape),
            budgets.reshape(shape), **self.settings)
        rewards, adv = np.asarray(rewards).reshape(-1), np.asarray(adv, np.float32).reshape(-1)

        # Training arrays, the response cut to the longest one, rounded up to half the generation
        # cap: at most two shapes, so the update compiles at most twice (a compile of the tiny
        # model's step costs as much CPU time as several steps).
        n = min(_bucket(int(np.asarray(batch.response_mask).sum(1).max()), max(64, r.max_response_len // 2)),
                batch.response_ids.shape[1])
        prompt_len = batch.prompt_ids.shape[1]
        resp_mask = np.asarray(batch.response_mask, bool)[:, :n]
        if self.objective.dynamic_sampling:
            keep = np.asarray(loss_lib.dynamic_sampling_mask(correct.reshape(shape))).repeat(self.group)
            resp_mask &= keep[:, None]
        tokens = np.concatenate([np.asarray(batch.prompt_ids), np.asarray(batch.response_ids)[:, :n]], 1)
        attn = np.concatenate([np.asarray(batch.prompt_mask, bool),
                               np.asarray(batch.response_mask, bool)[:, :n]], 1).astype(np.int32)
        old = np.asarray(batch.logprobs, np.float32)[:, :n]
        sampled = np.asarray(batch.sampled_mask, bool)[:, :n]
        if not r.prefix_loss:  # the pre-filled budget text still counts in n, but gets no loss
            resp_mask &= sampled
        mode = c.train.recompute_old_logprobs
        if mode == "always" or (mode == "auto" and (resp_mask & ~sampled).any()):
            recomputed = self._logprobs(state.params, tokens, attn, prompt_len)
            old = recomputed if mode == "always" else np.where(sampled, old, recomputed)
        arrays = dict(tokens=tokens.astype(np.int32), attention_mask=attn, response_mask=resp_mask,
                      old_logp=old, advantages=adv)
        if self.ref_params is not None:
            arrays["ref_logp"] = self._logprobs(self.ref_params, tokens, attn, prompt_len)

        updates = []
        rows = self.rows_per_minibatch
        micro = c.train.micro_batch_size
        for _ in range(c.train.ppo_epochs):
            for start in range(0, len(tokens), rows):
                mb = {k: v[start:start + rows].reshape((rows // micro, micro) + v.shape[1:])
                      for k, v in arrays.items()}
                mb["weight"] = trainer.micro_weights(mb["response_mask"], dict(self.loss_kwargs)["aggregation"])
                mb = {k: jax.device_put(v, self.micro_sharding if v.ndim > 1 else self.replicated)
                      for k, v in mb.items()}
                state, m = trainer.update(self.policy.graphdef, state, mb, optimizer=self.optimizer,
                                          prompt_len=prompt_len, temperature=r.temperature,
                                          loss_kwargs=self.loss_kwargs)
                updates.append(m)
        updates = jax.device_get(updates)
        t3 = time.perf_counter()

        metrics = {k: float(np.mean([u[k] for u in updates])) for k in updates[0]}
        metrics.update(
            reward=float(rewards.mean()), accuracy=float(correct.mean()),
            format_error_rate=float(1 - format_ok.mean()), response_len=float(lengths.mean()),
            response_len_max=float(lengths.max()), advantage_abs=float(np.abs(adv).mean()),
            generated_tokens_per_s=float(lengths.sum() / max(t1 - t0, 1e-9)),
            time_rollout=t1 - t0, time_grading=t2 - t1, time_update=t3 - t2,
            skipped_total=float(state.skipped_total))
        if r.mode == "budget":
            for name, values in (("reward", rewards), ("accuracy", correct.astype(float)),
                                 ("response_len", lengths.astype(float)),
                                 ("format_error_rate", (~format_ok).astype(float))):
                metrics.update(_per_budget(values, budgets, name))
        return state, metrics


# ----------------------------------------------------------------------------- the run

class _Preemption:
    """SIGTERM (a TPU VM's maintenance notice) sets a flag; the loop checkpoints and exits."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._previous = None
        return self

    def _handle(self, signum, frame):
        log.warning("SIGTERM received: checkpointing and stopping after this step.")
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _evaluate(config, policy: Policy, params, mesh, rules, key) -> list[evaluation.BenchmarkResult]:
    e, r = config.eval, config.rollout
    return evaluation.evaluate(
        (policy.graphdef, params), policy.tokenizer, policy.eval_records, budgets=tuple(r.budgets),
        key=key, max_new_tokens=r.max_response_len, temperature=e.temperature, top_p=e.top_p,
        samples=e.samples, prefix_in_response=r.prefix_in_response, mesh=mesh, rules=rules,
        workers=config.grading.workers, timeout_s=config.grading.timeout_s,
        modes=tuple(e.get("modes", ("natural", "efficiency", "fixed"))))


def _periodic_eval(config, policy: Policy, params, sets, mesh, rules, key, step, writer, workdir) -> None:
    """eval_run.evaluate_sets on `sets`; scalars eval/<mode>/... and <workdir>/eval/step_<step>.json."""
    from hbpo_jax.eval import run as eval_run
    cfg = sampler.graphdef_cfg(policy.graphdef, params)
    results = eval_run.evaluate_sets(config, policy.graphdef, params, policy.tokenizer, cfg, sets, key,
                                     mesh=mesh, rules=rules)
    summaries = [r.summary() for r in results]
    writer.scalars(step, eval_run.scalars(summaries), console=False)
    if writer.enabled:
        os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
    _write_json(os.path.join(workdir, "eval", f"step_{step}.json"), {"step": step, "results": summaries})


def run(config, workdir: str) -> dict:
    """Trains as `config` says, in `workdir` (resuming from its checkpoints). Returns a summary."""
    _initialize_distributed(config)
    config_lib.validate(config)
    os.makedirs(workdir, exist_ok=True)
    mesh = sharding.mesh_from_config(config.mesh)
    rules = sharding.rules_from_config(config.mesh)
    policy = build_policy(config, workdir, mesh, rules)
    t = config.train
    total_updates = t.steps * t.mini_batches * t.ppo_epochs
    step_fn = Step(config, policy, mesh, rules, total_updates)
    base_key = jax.random.key(config.seed)

    state = trainer.init_state(policy.params, step_fn.optimizer)
    ckpt = checkpoint.TrainCheckpointer(os.path.join(workdir, "checkpoints"), keep=t.keep_checkpoints)
    # The same global batch on every process (see the module docstring).
    batches = data.prompt_batches(policy.train_records, batch_size=t.prompts_per_step, seed=config.seed,
                                  shuffle=config.data.shuffle, process_index=0, process_count=1)
    start = 0
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    restored = ckpt.restore_latest(abstract)
    if restored is not None:
        start, state, meta = restored
        batches.set_state(meta["data"])
        log.info("resumed from step %d in %s", start, ckpt.directory)

    writer = metrics_lib.MetricsWriter(workdir, t.steps, start)
    summary: dict = {"workdir": workdir}
    results_path = os.path.join(workdir, "results.json")
    if config.eval.before_after:
        reuse = (config.eval.get("reuse_before", False) and os.path.exists(results_path)
                 and "before" in _read_json(results_path))
        if not reuse and (start == 0 or not os.path.exists(results_path)):
            before = _evaluate_warm_start(config, policy, mesh, rules, jax.random.fold_in(base_key, 10**6))
            _write_json(results_path, {"before": before})
        if writer.enabled:  # process 0, which wrote the file
            _log_eval(writer, "before", _read_json(results_path)["before"], 0)

    eval_sets = None  # every eval.every steps: eval.benchmarks, default the task's eval set
    if config.eval.every:
        from hbpo_jax.eval import run as eval_run
        eval_sets = eval_run.load_sets(config, policy.eval_records or None)
        eval_run.drop_long_prompts(eval_sets, policy.tokenizer, config)

    step = start
    with _Preemption() as preemption:
        for step in range(start + 1, t.steps + 1):
            records = next(batches)
            state, metrics = step_fn(state, records, jax.random.fold_in(base_key, step))
            if step % t.log_every == 0 or step == t.steps:
                writer.scalars(step, metrics)
            if eval_sets is not None and step % config.eval.every == 0:
                _periodic_eval(config, policy, state.params, eval_sets, mesh, rules,
                               jax.random.fold_in(base_key, 2 * 10**6 + step), step, writer, workdir)
            if int(state.skipped) > t.max_consecutive_skips:
                ckpt.save(step, state, _meta(batches, config, step))
                ckpt.close()
                raise TrainingError(
                    f"{int(state.skipped)} consecutive steps had a non-finite loss or gradient "
                    f"(train.max_consecutive_skips={t.max_consecutive_skips}); the last good state "
                    f"is checkpointed at step {step} in {ckpt.directory}.")
            if step % t.checkpoint_every == 0 or step == t.steps or preemption.requested:
                ckpt.save(step, state, _meta(batches, config, step))
            if preemption.requested:
                ckpt.close()
                writer.close()
                summary.update(stopped_at=step, preempted=True)
                return summary
    ckpt.close()
    summary["steps"] = step

    if t.export_hf:
        export = os.path.join(workdir, "export")
        save_pretrained(nnx.merge(policy.graphdef, state.params), export, tokenizer=policy.tokenizer)
        summary["export"] = export
    if config.eval.before_after:
        after = [m.summary() for m in _evaluate(config, policy, state.params, mesh, rules,
                                                jax.random.fold_in(base_key, 10**6 + 1))]
        before = _read_json(results_path)["before"]
        _write_json(results_path, {"before": before, "after": after})
        _log_eval(writer, "after", after, step)
        table = evaluation.before_after_table(before, after)
        if writer.enabled:
            with open(os.path.join(workdir, "results.md"), "w") as f:
                f.write(table + "\n")
        writer.text("eval/table", table, step)
        summary["table"] = table
    writer.close()
    return summary


def _evaluate_warm_start(config, policy: Policy, mesh, rules, key) -> list[dict]:
    """The before-training evaluation (summaries), cached beside the cached warm start and keyed
    by the evaluation settings: a rerun in the same workdir with other RL settings evaluates the
    warm start once. (Ablation variants each copy the warm start; they share their "before"
    through eval.reuse_before instead.)"""
    path = None
    if policy.cache_dir:
        settings = json.dumps([config.eval.to_dict(), list(config.rollout.budgets),
                               config.rollout.max_response_len, config.rollout.prefix_in_response,
                               config.rollout.system_prompt, config.task.to_dict(), config.seed],
                              sort_keys=True, default=str)
        path = os.path.join(policy.cache_dir, f"eval-{hashlib.sha1(settings.encode()).hexdigest()[:16]}.json")
        if os.path.exists(path):
            log.info("before-training evaluation: cached in %s", path)
            return _read_json(path)
    before = [m.summary() for m in _evaluate(config, policy, policy.params, mesh, rules, key)]
    if path:
        _write_json(path, before)
    return before


def _initialize_distributed(config) -> None:
    """jax.distributed.initialize() when config.distributed: found automatically on TPU pods, or
    from config.distributed_{coordinator,num_processes,process_id} (CPU clusters, tests)."""
    if not config.get("distributed", False):
        return
    kwargs = {}
    if config.get("distributed_coordinator", ""):
        kwargs = dict(coordinator_address=config.distributed_coordinator,
                      num_processes=int(config.distributed_num_processes),
                      process_id=int(config.distributed_process_id))
    if (jax.config.jax_platforms or "").split(",")[0] == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # cross-process CPU collectives
    jax.distributed.initialize(**kwargs)
    log.info("process %d of %d, %d local of %d devices", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())


def _meta(batches, config, step) -> dict:
    return {"data": batches.get_state(), "seed": int(config.seed), "step": int(step),
            "rng": "jax.random.fold_in(key(seed), step)"}


def _log_eval(writer, tag, summaries: list[dict], step: int) -> None:
    for s in summaries:
        writer.scalars(step, {f"eval_{tag}/{s['mode']}/accuracy": s["accuracy"],
                              f"eval_{tag}/{s['mode']}/mean_tokens": s["mean_tokens"]}, console=False)
        for level, v in s["by_level"].items():
            writer.scalars(step, {f"eval_{tag}/{s['mode']}/level_{level}/accuracy": v["accuracy"],
                                  f"eval_{tag}/{s['mode']}/level_{level}/mean_tokens": v["mean_tokens"]},
                           console=False)


def _write_json(path, obj) -> None:
    if jax.process_index() != 0:  # one writer; every process computed the same obj
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def _read_json(path):
    with open(path) as f:
        return json.load(f)
