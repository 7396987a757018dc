"""One training step on the run spec: rollouts -> grading -> rewards and advantages -> updates.

With P prompts and G rollouts each (R = P * G rows, prompt-major):
  rollout.budget_rollouts (jitted sampler, KV cache)  ->  grading (worker processes): rows are
  graded as they finish (grading.stream), while the rest decode  ->  spec.objective.advantages
  ->  batching.update_arrays (+ old log-probs recomputed where the sampler did not sample, e.g. a
  pre-filled budget prefix that takes the loss)  ->  one optimizer update per mini-batch that
  has a loss token.

Several processes (a TPU pod slice): every process samples the same global batch and gathers all
rollouts to its host; each grades a disjoint share as its rows finish and the grades are gathered
(hosts.gather), so host-side values are identical everywhere.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from hbpo_jax import loss, sharding
from hbpo_jax.grading import hosts, stream
from hbpo_jax.models import lora
from hbpo_jax.policy import Policy
from hbpo_jax.rollout import batch as rollout
from hbpo_jax.spec import RunSpec, SamplingSpec
from hbpo_jax.train import minibatches as batching
from hbpo_jax.train import packing
from hbpo_jax.train import update as trainer

L1_MODES = ("l1", "l1_max")


def draw_l1_budgets(key: jax.Array, prompts: int, budgets: tuple[int, ...]) -> np.ndarray:
    """L1's training targets: one N per prompt, uniform over [budgets[0], budgets[-1]]
    (Aggarwal & Welleck 2025 draw N from U(100, 4000)). int32 [prompts]."""
    lo, hi = budgets[0], budgets[-1]
    return np.asarray(jax.random.randint(key, (prompts,), lo, hi + 1), np.int32)


def sample(sampling: SamplingSpec, graphdef, params, tokenizer, problems: list, key: jax.Array, *,
           mesh=None, rules=None, on_texts=None) -> rollout.RolloutBatch:
    """The rollouts of one step as the spec's prompting mode lays them out. Row r (its index among
    the step's rows) samples with fold_in(key, r), so neither max_batch nor the engine changes a
    token. l1 / l1_max draw one N per prompt from the budgets' range. on_texts: rows handed over
    as they finish (budget_rollouts)."""
    settings, prompt_budgets = sampling.rollout, None
    if settings.mode in L1_MODES:
        key, sub = jax.random.split(key)
        prompt_budgets = draw_l1_budgets(sub, len(problems), settings.budgets)
    return rollout.budget_rollouts((graphdef, params), tokenizer, problems, settings, key=key, mesh=mesh,
                                   rules=rules, prompt_budgets=prompt_budgets, on_texts=on_texts)


def _per_budget(values: np.ndarray, budgets: np.ndarray, name: str) -> dict:
    return {f"{name}/budget_{int(b)}": float(values[budgets == b].mean()) for b in np.unique(budgets)}


class Step:
    """Runs training steps; holds what stays fixed across them (optimizer, shardings, reference)."""

    def __init__(self, spec: RunSpec, policy: Policy, mesh, rules):
        self.spec, self.policy, self.mesh, self.rules = spec, policy, mesh, rules
        self.optimizer = trainer.make_optimizer(spec.optim, spec.train.total_updates)
        batch_axes = sharding.logical_to_spec(("batch",), rules, mesh)[0]
        self.row_sharding = NamedSharding(mesh, PartitionSpec(batch_axes))
        # LoRA (spec.lora.rank > 0): the train state holds the adapters; the frozen base stays here.
        adapters, self.frozen = lora.split(policy.params) if spec.lora.rank else (None, None)
        self.ref_params = None
        if spec.loss.kl_coef > 0:  # with LoRA: the base itself, its adapters zeroed (no copy of it)
            self.ref_params = (lora.join(self.frozen, lora.zeroed(adapters)) if self.frozen is not None
                               else jax.tree.map(jnp.copy, policy.params))

    def trainable(self, params):
        """What the train state holds of the policy's full params: all of them, or the adapters."""
        return params if self.frozen is None else lora.split(params)[0]

    def full(self, trainable):
        """The policy's full params (to sample, evaluate, export) from the train state's."""
        return trainable if self.frozen is None else lora.join(self.frozen, trainable)

    def _logprobs(self, params, tokens, attn, prompt_len):
        """Log-probs of the whole batch, micro-batch by micro-batch: float32 [R, N]."""
        mb = self.spec.train.micro_batch_size
        out = [trainer.compute_logprobs(self.policy.graphdef, params,
                                        jax.device_put(tokens[i:i + mb], self.row_sharding),
                                        jax.device_put(attn[i:i + mb], self.row_sharding),
                                        prompt_len=prompt_len, temperature=self.spec.sampling.rollout.temperature,
                                        rules=sharding.normalize_rules(self.rules))
               for i in range(0, len(tokens), mb)]
        return np.concatenate([sharding.to_host(x) for x in out])

    def _old_logprobs(self, params, arrays: dict) -> np.ndarray:
        """The sampling policy's log-probs, recomputed where a loss token was not scored when it was
        sampled (a pre-filled prefix under the static sampler), or always."""
        mode, old = self.spec.train.recompute_old_logprobs, arrays["old_logp"]
        needed = (arrays["response_mask"] & ~arrays["scored_mask"]).any()
        if mode == "never" or (mode == "auto" and not needed):
            return old
        fresh = self._logprobs(params, arrays["tokens"], arrays["attention_mask"], arrays["prompt_len"])
        return fresh if mode == "always" else np.where(arrays["scored_mask"], old, fresh)

    def __call__(self, state: trainer.TrainState, records: list, key) -> tuple[trainer.TrainState, dict]:
        s = self.spec.sampling
        t0 = time.perf_counter()
        params = self.full(state.params)
        grade_kw = dict(workers=self.spec.grading_workers, timeout_s=self.spec.grading_timeout_s,
                        answer_format=self.spec.answer_format)
        # Rows are graded as they finish, while the rest decode: each host its own share of them
        # (every host sees every finished row), the verdicts gathered after the rollout.
        mine = hosts.share(len(records) * s.group, jax.process_index(), jax.process_count())
        grader = stream.StreamGrader(**grade_kw)

        def on_texts(rows, prompts, texts):
            keep = [i for i, r in enumerate(rows) if int(r) in mine]
            truths = [records[prompts[i]]["answer"] for i in keep]
            grader.submit([rows[i] for i in keep], [texts[i] for i in keep], truths)
        try:
            batch = sample(s, self.policy.graphdef, params, self.policy.tokenizer,
                           [x["problem"] for x in records], key, mesh=self.mesh, rules=self.rules, on_texts=on_texts)
        except BaseException:
            grader.close()
            raise
        lengths = np.asarray(batch.lengths)
        t1 = time.perf_counter()

        grades = hosts.gather(grader.results(mine), list(batch.texts), self.spec.answer_format)
        correct = np.array([g.correct for g in grades], bool)
        format_ok = np.array([g.format_ok for g in grades], bool)
        t2 = time.perf_counter()

        shape = (len(records), s.group)
        budgets = np.asarray(batch.budgets, np.int32)
        rewards, adv = self.spec.objective.advantages(correct.reshape(shape), format_ok.reshape(shape),
                                                      lengths.reshape(shape), budgets.reshape(shape))
        rewards, adv = np.asarray(rewards).reshape(-1), np.asarray(adv, np.float32).reshape(-1)
        keep = None
        if self.spec.objective.dynamic_sampling:
            keep = np.asarray(loss.dynamic_sampling_mask(correct.reshape(shape))).repeat(s.group)
        arrays = batching.update_arrays(batch, adv, keep_rows=keep, prefix_loss=s.prefix_loss)
        arrays["old_logp"] = self._old_logprobs(params, arrays)
        if self.ref_params is not None:
            arrays["ref_logp"] = self._logprobs(self.ref_params, arrays["tokens"], arrays["attention_mask"],
                                                arrays["prompt_len"])
        state, updates, empty = self._update(state, arrays)
        t3 = time.perf_counter()

        metrics = {k: float(np.mean([u[k] for u in updates])) for k in (updates[0] if updates else {})}
        metrics.update(
            reward=float(rewards.mean()), accuracy=float(correct.mean()),
            format_error_rate=float(1 - format_ok.mean()), response_len=float(lengths.mean()),
            response_len_max=float(lengths.max()), advantage_abs=float(np.abs(adv).mean()),
            generated_tokens_per_s=float(lengths.sum() / max(t1 - t0, 1e-9)),
            update_padded_fraction=self._padded_fraction(arrays),
            time_rollout=t1 - t0, time_grading=t2 - t1, time_update=t3 - t2,
            skipped_total=float(state.skipped_total), empty_minibatches=float(empty),
            grading_timeouts=float(hosts.count_status(grades, "timeout")))
        if s.rollout.mode == "budget":
            for name, values in (("reward", rewards), ("accuracy", correct.astype(float)),
                                 ("response_len", lengths.astype(float)),
                                 ("format_error_rate", (~format_ok).astype(float))):
                metrics.update(_per_budget(values, budgets, name))
        return state, metrics

    def _padded_fraction(self, arrays: dict) -> float:
        """The share of the update's token slots (packed) or response slots (rows) without a token."""
        t = self.spec.train
        if t.pack_rows:
            lanes, lane_len, _ = packing.layout_for(self.spec)
            return packing.padded_fraction(arrays, t.rows_per_minibatch, lanes=lanes, lane_len=lane_len)
        return batching.padded_fraction(batching.response_lengths(arrays), t.rows_per_minibatch, t.micro_batch_size,
                                        arrays["response_mask"].shape[1], t.update_width_step)

    def _packed_minibatches(self, arrays: dict):
        """The step's mini-batches packed by tokens (train/packing.py): one dict of [U, k, S] fields
        each, or None for a mini-batch without a loss token."""
        t = self.spec.train
        lanes, lane_len, u = packing.layout_for(self.spec)
        for start in range(0, len(arrays["tokens"]), t.rows_per_minibatch):
            yield packing.pack(arrays, slice(start, start + t.rows_per_minibatch), lanes=lanes, lane_len=lane_len,
                               micro_batches=u, aggregation=self.spec.loss.aggregation,
                               loss_scale_tokens=self.spec.loss.loss_scale_tokens, micro=t.micro_batch_size)

    def _update(self, state, arrays: dict):
        """ppo_epochs passes over the mini-batches; a mini-batch with no loss token (all its groups
        dropped by dynamic sampling) takes no optimizer step: weights, moments and counters stay.
        Returns (state, per-update metrics on the host, empty mini-batches skipped)."""
        t, loss_kwargs = self.spec.train, self.spec.loss.kwargs()
        updates, empty = [], 0
        for _ in range(t.ppo_epochs):
            if t.pack_rows:  # one program for the run: every mini-batch has the same [U, k, S] shapes
                for mb in self._packed_minibatches(arrays):
                    if mb is None:
                        empty += 1
                        continue
                    state, m = trainer.update(self.policy.graphdef, state, batching.put(mb, self.mesh, self.rules),
                                              optimizer=self.optimizer, prompt_len=0,
                                              temperature=self.spec.sampling.rollout.temperature,
                                              loss_kwargs=loss_kwargs, rules=sharding.normalize_rules(self.rules),
                                              frozen=self.frozen)
                    updates.append(m)
                continue
            for mb in batching.minibatches(arrays, t.rows_per_minibatch, t.micro_batch_size,
                                           self.spec.loss.aggregation, width_step=t.update_width_step):
                if mb is None:
                    empty += 1
                    continue
                pieces = [batching.put(piece, self.mesh, self.rules) for piece in mb]
                state, m = trainer.update_pieces(self.policy.graphdef, state, pieces, optimizer=self.optimizer,
                                                 prompt_len=arrays["prompt_len"],
                                                 temperature=self.spec.sampling.rollout.temperature,
                                                 loss_kwargs=loss_kwargs, rules=self.rules, frozen=self.frozen)
                updates.append(m)
        return state, jax.device_get(updates), empty
