"""The run spec: a validated config resolved once, at start-up, into frozen typed settings.

`resolve(config)` checks every value a run depends on (one sentence naming the key, before
anything compiles) and returns a `RunSpec`. Each objective declares its own recipe in
`objectives.OBJECTIVES` (prompting, clip range, dual clip, aggregation, overlong shaping, dynamic
sampling); a config value overrides the recipe only where the user set it: `rollout.mode`,
`loss.clip_low`, `loss.clip_high`, `loss.dual_clip` (0 turns it off), `loss.aggregation` and
`objective.l_max` default to None ("the objective's" / "rollout.max_response_len").

The loop, evaluation, planning, benchmarks and ablations read the spec (or the part they need),
never config fields one by one. `RunSpec.to_json()` is what `<workdir>/spec.json` holds.
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from hbpo_jax import loss as loss_lib
from hbpo_jax import objectives, sharding
from hbpo_jax.data.sources import DataSpec, parse_benchmark, resolve_data
from hbpo_jax.errors import ConfigError, require
from hbpo_jax.grading import answers as grading
from hbpo_jax.models.config import DTYPES, LORA_TARGETS, ModelConfig
from hbpo_jax.rollout import prompting
from hbpo_jax.rollout.settings import ENGINES, RolloutSettings

TASKS = ("", "arithmetic")



# ----------------------------------------------------------------------------- the parts

@dataclasses.dataclass(frozen=True)
class SamplingSpec:
    """Training rollouts: `rollout` is what the rollout is handed (its mode, budgets, sampling);
    the rest is what training adds. group = rollouts per prompt (= len(budgets) x
    samples_per_budget in budget mode; l1 / l1_max draw N per prompt from the budgets' range);
    prefix_loss: the pre-filled prefix takes the policy loss; prompt_format: prompting.PROMPT_FORMATS."""

    rollout: RolloutSettings
    group: int
    max_prompt_len: int
    prefix_loss: bool
    prompt_format: str


@dataclasses.dataclass(frozen=True)
class ObjectiveSpec:
    """The objective by name and the values of every setting it declares (its defaults, or the
    config's where set); l_max = L_MAX of the rewards (= rollout.max_response_len)."""

    name: str
    settings: dict
    l_max: int
    overlong_penalty: bool
    dynamic_sampling: bool

    @property
    def objective(self) -> objectives.Objective:
        return objectives.get_objective(self.name)

    def advantages(self, correct, format_ok, lengths, budgets):
        """(rewards, advantages), float32 [P, G] each, of bool / int arrays [P, G]."""
        overlong = dict(max_len=self.l_max, cache_len=max(self.l_max // 8, 1)) if self.overlong_penalty else {}
        return objectives.compute_advantages(self.objective, correct, format_ok, lengths, budgets,
                                           **self.settings, **overlong)


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """policy_loss settings; dual_clip None = off. loss_scale_tokens: Dr. GRPO's constant
    divisor (token-sum-norm), None otherwise."""

    clip_low: float
    clip_high: float
    dual_clip: float | None
    kl_coef: float
    aggregation: str
    loss_scale_tokens: float | None = None

    def kwargs(self) -> tuple:
        """policy_loss keyword arguments as sorted (name, value) pairs (a static jit argument)."""
        kw = dict(clip_low=self.clip_low, clip_high=self.clip_high, dual_clip=self.dual_clip,
                  kl_coef=self.kl_coef, aggregation=self.aggregation)
        if self.loss_scale_tokens is not None:
            kw["loss_scale_tokens"] = self.loss_scale_tokens
        return tuple(sorted(kw.items()))


# optim.schedule: the learning rate after warm-up (train/update.make_optimizer builds it).
SCHEDULES = ("constant", "cosine", "linear")


@dataclasses.dataclass(frozen=True)
class OptimSpec:
    learning_rate: float
    schedule: str
    warmup_steps: int
    weight_decay: float
    b1: float
    b2: float
    grad_clip: float | None


@dataclasses.dataclass(frozen=True)
class TrainSpec:
    """rows_per_minibatch = prompts_per_step / mini_batches x group sequences per optimizer update;
    update_width_step: 0, or the multiple each length-grouped micro-batch's width is rounded to
    (batching.micro_layout)."""

    steps: int
    prompts_per_step: int
    mini_batches: int
    micro_batch_size: int
    ppo_epochs: int
    rows_per_minibatch: int
    total_updates: int
    log_every: int
    checkpoint_every: int
    keep_checkpoints: int
    max_consecutive_skips: int
    recompute_old_logprobs: str
    export_hf: bool
    update_width_step: int = 0
    pack_rows: bool = False  # rows packed by tokens (train/packing.py); update_width_step unused then


@dataclasses.dataclass(frozen=True)
class EvalSpec:
    """Everything an evaluation needs (before/after, periodic, launch/eval.py, ablations).

    modes: prompting.ModeSpec per prompting mode; benchmarks: (kind, arg) pairs (empty: the task's
    eval set, "tiny"); rollout: the sampling of every mode (eval.temperature / top_p / samples /
    max_response_len, or the rollout cap when 0; the training rollout's system prompt, prefix
    counting, max_batch and engine); each mode sets its own mode and budgets on it.
    batch_size: problems per rollout call; answer_format: the grading.FORMATS policy that grades;
    dataset_score: also report a benchmark's own scorer (reasoning-gym's) beside ours.
    """

    modes: tuple
    benchmarks: tuple[tuple[str, str], ...]
    rollout: RolloutSettings
    every: int
    before_after: bool
    reuse_before: bool
    max_problems: int
    batch_size: int
    max_prompt_len: int
    grading_workers: int
    grading_timeout_s: float
    seed: int
    answer_format: str
    prompt_format: str
    dataset_score: bool


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The policy's model. path: a Hugging Face folder ("" = random init, or the task's model);
    fields: the config's model section, ModelConfig fields: with a path only the numerics and
    memory settings of OVERRIDABLE apply over its config.json, without one they are the model."""

    path: str
    fields: dict

    # What a config may change on a model read from config.json.
    OVERRIDABLE = ("param_dtype", "dtype", "attention_impl", "remat", "scan_layers")

    def config(self, **changes) -> ModelConfig:
        """The ModelConfig of `fields` (a random-init or task model), with `changes`."""
        fields = {**self.fields, **changes}
        fields["eos_token_ids"] = tuple(fields.get("eos_token_ids", ()))
        try:
            return ModelConfig(**fields)
        except TypeError as e:
            raise ConfigError(f"model: {e}.") from None

    def overrides(self) -> dict:
        """The fields that apply over a pretrained model's config.json."""
        return {k: self.fields[k] for k in self.OVERRIDABLE if k in self.fields}


@dataclasses.dataclass(frozen=True)
class LoRASpec:
    """LoRA adapters (rank 0: off, full fine-tuning): rank, alpha (the scale is alpha / rank),
    the projections they sit on (models.config.LORA_TARGETS) and the frozen base's dtype."""

    rank: int = 0
    alpha: float = 16.0
    targets: tuple[str, ...] = LORA_TARGETS
    base_dtype: str = "bfloat16"

    def model_config(self, cfg: ModelConfig) -> ModelConfig:
        """cfg with these adapters and the base in base_dtype (cfg itself when rank is 0)."""
        if not self.rank:
            return cfg
        return cfg.replace(lora_rank=self.rank, lora_alpha=self.alpha, lora_targets=self.targets,
                           param_dtype=self.base_dtype)


@dataclasses.dataclass(frozen=True)
class MeshSpec:
    """mesh.shape (-1: the rest of the devices), its axes and the logical-axis rule table."""

    shape: tuple[int, ...]
    axes: tuple[str, ...]
    rules: tuple

    def make(self):
        """The device mesh of this spec over the local devices (jax.sharding.Mesh)."""
        return sharding.make_mesh(self.shape, self.axes)


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """A synthetic task instead of data.path (name "arithmetic": hbpo_jax.tasks; "" = none), its
    tokenizer and supervised warm start. sft_budgets: the budgets the warm start is built for
    (task.sft_budgets, else rollout.budgets)."""

    name: str
    train_problems: int
    eval_problems: int
    tokenizer_vocab_size: int
    tokenizer_whole_budgets: bool
    sft_examples: int
    sft_steps: int
    sft_batch_size: int
    sft_lr: float
    sft_max_len: int
    sft_budgets: tuple[int, ...]
    sft_budget_prior: float
    sft_budget_scales: tuple[float, ...]


@dataclasses.dataclass(frozen=True)
class DistributedSpec:
    """jax.distributed.initialize() when `enabled` (one process per host): automatic on TPU pods,
    or from coordinator / num_processes / process_id (CPU clusters, tests)."""

    enabled: bool
    coordinator: str
    num_processes: int
    process_id: int


@dataclasses.dataclass(frozen=True)
class RunSpec:
    name: str
    seed: int
    sampling: SamplingSpec
    objective: ObjectiveSpec
    loss: LossSpec
    optim: OptimSpec
    train: TrainSpec
    eval: EvalSpec
    grading_workers: int
    grading_timeout_s: float
    answer_format: str  # grading.FORMATS: how training rollouts are graded
    data: DataSpec
    model: ModelSpec
    mesh: MeshSpec
    task: TaskSpec
    distributed: DistributedSpec
    lora: LoRASpec = LoRASpec()

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True, default=str)


# ----------------------------------------------------------------------------- resolving

def _sampling(config, objective: objectives.Objective) -> SamplingSpec:
    r = config.rollout
    mode = r.mode if r.get("mode") is not None else objective.prompting
    require(mode in prompting.MODES,
             f"rollout.mode must be one of {prompting.MODES} (or None: the objective's), got {mode!r}.")
    budgets = tuple(r.budgets)
    require(len(budgets) > 0, "rollout.budgets must not be empty.")
    require(all(isinstance(b, int) and b > 0 for b in budgets),
             f"rollout.budgets must be positive integers, got {budgets}.")
    require(list(budgets) == sorted(set(budgets)), f"rollout.budgets must be strictly increasing, got {budgets}.")
    require(r.max_prompt_len > 0 and r.max_response_len > 0,
             "rollout.max_prompt_len and rollout.max_response_len must be positive.")
    require(budgets[-1] < r.max_response_len,
             f"rollout.budgets holds {budgets[-1]}, not below rollout.max_response_len (L_max = {r.max_response_len}).")
    group = int(r.rollouts_per_prompt)
    per_budget = mode == "budget"
    require(group >= 1, f"rollout.rollouts_per_prompt must be at least 1, got {group}.")
    require(not per_budget or (group >= len(budgets) and group % len(budgets) == 0),
             f"rollout.rollouts_per_prompt ({group}) must be a positive multiple of the {len(budgets)} "
             "budgets in rollout.budgets.")
    require(mode != "fixed" or len(budgets) == 1,
             f"rollout.mode 'fixed' samples one budget; rollout.budgets holds {len(budgets)}.")
    require(r.temperature > 0, f"rollout.temperature must be positive for RL, got {r.temperature}.")
    require(0 < r.top_p <= 1, f"rollout.top_p must be in (0, 1], got {r.top_p}.")
    require(r.top_k >= 0, f"rollout.top_k must be ≥ 0 (0 = off), got {r.top_k}.")
    require(r.max_batch >= 0, f"rollout.max_batch must be ≥ 0 (0 = all rows at once), got {r.max_batch}.")
    kv_tokens = int(r.get("kv_tokens", 0) or 0)
    require(kv_tokens >= 0, f"rollout.kv_tokens must be ≥ 0 (0 = max_batch x the longest row), got {kv_tokens}.")
    page_size = int(r.get("page_size", 16))
    require(page_size >= 1, f"rollout.page_size must be ≥ 1 tokens, got {page_size}.")
    tp = _decode_tensor_parallel(r)
    prompt_format, system_prompt = _prompt_format(r)
    rollout = RolloutSettings(
        max_response_len=int(r.max_response_len), mode=mode, budgets=budgets,
        samples_per_budget=group // len(budgets) if per_budget else group,
        prefix_in_response=bool(r.prefix_in_response), hard_budget_cap=bool(r.hard_budget_cap),
        temperature=float(r.temperature), top_p=float(r.top_p), top_k=int(r.top_k), system_prompt=system_prompt,
        max_batch=int(r.max_batch), engine=_engine(r), kv_tokens=kv_tokens, page_size=page_size,
        decode_tensor_parallel=tp)
    return SamplingSpec(rollout=rollout, group=group, max_prompt_len=int(r.max_prompt_len),
                        prefix_loss=bool(r.prefix_loss), prompt_format=prompt_format)


def _engine(r) -> str:
    name = r.get("engine", RolloutSettings.engine)
    require(name in ENGINES, f"rollout.engine must be one of {ENGINES}, got {name!r}.")
    return name


def _decode_tensor_parallel(r) -> int:
    k = int(r.get("decode_tensor_parallel", 1))
    require(k >= 1, f"rollout.decode_tensor_parallel must be ≥ 1 (1: whole decode weights on every chip), got {k}.")
    return k


def _prompt_format(r) -> tuple[str, str | None]:
    """(rollout.prompt_format, the system prompt it resolves to with rollout.system_prompt)."""
    name = r.get("prompt_format", "template")
    require(name in prompting.PROMPT_FORMATS,
             f"rollout.prompt_format must be one of {tuple(prompting.PROMPT_FORMATS)}, got {name!r}.")
    require(prompting.PROMPT_FORMATS[name] is None or not r.system_prompt,
             f"rollout.prompt_format {name!r} brings its own system prompt; leave rollout.system_prompt empty.")
    return name, prompting.system_prompt_for(name, r.system_prompt)


def _answer_format(g) -> str:
    name = g.get("format", "paper")
    require(name in grading.FORMATS, f"grading.format must be one of {grading.FORMATS}, got {name!r}.")
    return name


def _check_held_out(data_spec: DataSpec, evaluation: "EvalSpec") -> None:
    """rg: training problems must not be the eval's: the same task from the same seed is."""
    shared = [arg for kind, arg in evaluation.benchmarks if kind == "rg" and arg in data_spec.rg_tasks]
    if shared:
        require(data_spec.seed != evaluation.seed,
                 f"data.seed ({data_spec.seed}) equals seed, so the rg:{shared[0]} training problems "
                 "would be the eval's; pick another data.seed.")


# config.objective key -> the setting name the reward / advantage functions use.
OBJECTIVE_KEYS = {"beta": "beta", "reward_variant": "variant", "format_reward": "format_reward",
                  "wrong_reward": "wrong_reward", "intra_weight": "intra_weight"}


def _objective(config, objective: objectives.Objective, sampling: SamplingSpec) -> ObjectiveSpec:
    o = config.objective
    cap = sampling.rollout.max_response_len
    l_max = cap if o.get("l_max") is None else int(o.l_max)
    require(l_max == cap, f"objective.l_max ({l_max}) must equal rollout.max_response_len ({cap}); "
             "leave it unset (None) to follow it.")
    declared = objective.setting_names()
    settings = {k: v for k, v in {**objective.reward_settings, **objective.advantage_settings}.items()}
    if "l_max" in declared:
        settings["l_max"] = l_max
    for key, name in OBJECTIVE_KEYS.items():
        value = o.get(key)
        if value is None:
            continue
        require(name in declared, f"objective.{key} does not apply to objective {objective.name!r} "
                 f"(its settings: {sorted(declared)}); leave it unset.")
        settings[name] = value
    if "variant" in settings:
        require(settings["variant"] in loss_lib.REWARD_VARIANTS,
                 f"objective.reward_variant must be one of {loss_lib.REWARD_VARIANTS}, got {settings['variant']!r}.")
    if "beta" in settings:
        require(settings["beta"] > 0, f"objective.beta must be positive, got {settings['beta']}.")
    return ObjectiveSpec(name=objective.name, settings=settings, l_max=l_max,
                         overlong_penalty=objective.overlong_penalty,
                         dynamic_sampling=objective.dynamic_sampling)


def _loss(config, objective: objectives.Objective, sampling: SamplingSpec, rows_per_minibatch: int) -> LossSpec:
    c = config.loss
    pick = lambda key, default: default if c.get(key) is None else c.get(key)  # noqa: E731
    clip_low, clip_high = float(pick("clip_low", objective.clip_low)), float(pick("clip_high", objective.clip_high))
    dual = pick("dual_clip", objective.dual_clip)
    dual = None if dual in (None, 0) else float(dual)
    aggregation = pick("aggregation", objective.aggregation)
    require(0 <= clip_low < 1, f"loss.clip_low must be in [0, 1), got {clip_low}.")
    require(clip_high >= 0, f"loss.clip_high must be ≥ 0, got {clip_high}.")
    require(dual is None or dual > 1, f"loss.dual_clip must be > 1, or 0 for off, got {dual}.")
    require(c.kl_coef >= 0, f"loss.kl_coef must be ≥ 0, got {c.kl_coef}.")
    require(aggregation in loss_lib.AGGREGATIONS,
             f"loss.aggregation must be one of {loss_lib.AGGREGATIONS}, got {aggregation!r}.")
    scale = float(rows_per_minibatch * sampling.rollout.max_response_len) if aggregation == "token-sum-norm" else None
    return LossSpec(clip_low, clip_high, dual, float(c.kl_coef), aggregation, scale)


def _optim(config) -> OptimSpec:
    o = config.optim
    require(o.learning_rate > 0, f"optim.learning_rate must be positive, got {o.learning_rate}.")
    require(o.schedule in SCHEDULES, f"optim.schedule must be one of {SCHEDULES}, got {o.schedule!r}.")
    require(o.warmup_steps >= 0, f"optim.warmup_steps must be ≥ 0, got {o.warmup_steps}.")
    require(o.grad_clip is None or o.grad_clip > 0, f"optim.grad_clip must be positive or None, got {o.grad_clip}.")
    return OptimSpec(float(o.learning_rate), o.schedule, int(o.warmup_steps), float(o.weight_decay),
                     float(o.b1), float(o.b2), None if o.grad_clip is None else float(o.grad_clip))


def _train(config, group: int) -> TrainSpec:
    t = config.train
    require(t.steps >= 1, f"train.steps must be at least 1, got {t.steps}.")
    require(t.prompts_per_step >= 1, f"train.prompts_per_step must be at least 1, got {t.prompts_per_step}.")
    require(t.mini_batches >= 1 and t.prompts_per_step % t.mini_batches == 0,
            f"train.prompts_per_step ({t.prompts_per_step}) must be divisible by "
            f"train.mini_batches ({t.mini_batches}).")
    rows = t.prompts_per_step // t.mini_batches * group
    require(t.micro_batch_size >= 1 and rows % t.micro_batch_size == 0,
             f"train.micro_batch_size ({t.micro_batch_size}) must divide the {rows} sequences of a mini-batch.")
    require(t.ppo_epochs >= 1, f"train.ppo_epochs must be at least 1, got {t.ppo_epochs}.")
    width_step = int(t.get("update_width_step", 0))
    require(width_step >= 0, f"train.update_width_step must be ≥ 0 (0 = off), got {width_step}.")
    require(t.recompute_old_logprobs in ("auto", "always", "never"),
             f"train.recompute_old_logprobs must be 'auto', 'always' or 'never', got {t.recompute_old_logprobs!r}.")
    return TrainSpec(
        steps=int(t.steps), prompts_per_step=int(t.prompts_per_step), mini_batches=int(t.mini_batches),
        micro_batch_size=int(t.micro_batch_size), ppo_epochs=int(t.ppo_epochs), rows_per_minibatch=rows,
        total_updates=int(t.steps * t.mini_batches * t.ppo_epochs), log_every=int(t.log_every),
        checkpoint_every=int(t.checkpoint_every), keep_checkpoints=int(t.keep_checkpoints),
        max_consecutive_skips=int(t.max_consecutive_skips),
        recompute_old_logprobs=t.recompute_old_logprobs, export_hf=bool(t.export_hf),
        update_width_step=width_step, pack_rows=bool(t.get("pack_rows", False)))


def resolve_eval(config) -> EvalSpec:
    """The eval section with the rollout and grading values it uses (launch/eval.py needs no
    training keys)."""
    e, r, g = config.eval, config.rollout, config.grading
    require(e.every >= 0, f"eval.every must be ≥ 0 (0 = off), got {e.every}.")
    require(e.samples >= 1, f"eval.samples must be at least 1, got {e.samples}.")
    require(e.temperature >= 0, f"eval.temperature must be ≥ 0 (0 = greedy), got {e.temperature}.")
    require(0 < e.top_p <= 1, f"eval.top_p must be in (0, 1], got {e.top_p}.")
    require(e.max_response_len >= 0, f"eval.max_response_len must be ≥ 0, got {e.max_response_len}.")
    require(e.max_problems >= 0, f"eval.max_problems must be ≥ 0 (0 = all), got {e.max_problems}.")
    require(e.batch_size >= 1, f"eval.batch_size must be at least 1, got {e.batch_size}.")
    require(r.max_prompt_len > 0 and r.max_response_len > 0,
             "rollout.max_prompt_len and rollout.max_response_len must be positive.")
    require(r.max_batch >= 0, f"rollout.max_batch must be ≥ 0 (0 = all rows at once), got {r.max_batch}.")
    require(g.workers >= 0, f"grading.workers must be ≥ 0 (0 = in this process), got {g.workers}.")
    require(g.timeout_s > 0, f"grading.timeout_s must be positive, got {g.timeout_s}.")
    answer_format = _answer_format(g)
    prompt_format, system_prompt = _prompt_format(r)
    try:
        modes = tuple(prompting.parse_modes(tuple(e.modes), tuple(r.budgets)))
    except ValueError as err:
        raise ConfigError(f"eval.modes: {err}") from None
    benchmarks = tuple(parse_benchmark(s) for s in tuple(e.benchmarks))
    task = config.task.get("name", "")
    require(e.every == 0 or benchmarks or task == "arithmetic",
             "eval.every > 0 needs eval.benchmarks (or a task with an eval set, task.name).")
    rollout = RolloutSettings(
        max_response_len=int(e.max_response_len or r.max_response_len), samples_per_budget=int(e.samples),
        prefix_in_response=bool(r.prefix_in_response), temperature=float(e.temperature), top_p=float(e.top_p),
        system_prompt=system_prompt, max_batch=int(r.max_batch), engine=_engine(r),
        decode_tensor_parallel=_decode_tensor_parallel(r))
    return EvalSpec(
        modes=modes, benchmarks=benchmarks, rollout=rollout, every=int(e.every),
        before_after=bool(e.before_after), reuse_before=bool(e.reuse_before), max_problems=int(e.max_problems),
        batch_size=int(e.batch_size), max_prompt_len=int(r.max_prompt_len), grading_workers=int(g.workers),
        grading_timeout_s=float(g.timeout_s), seed=int(config.seed), answer_format=answer_format,
        prompt_format=prompt_format, dataset_score=bool(e.get("dataset_score", True)))


def resolve_task(config, budgets: tuple[int, ...]) -> TaskSpec:
    """The task section (budgets: rollout.budgets, the default of task.sft_budgets)."""
    t = config.task
    name = t.get("name", "")
    require(name in TASKS, f"task.name must be one of {TASKS}, got {name!r}.")
    sft_budgets = tuple(t.get("sft_budgets", ()))
    require(all(isinstance(b, int) and b > 0 for b in sft_budgets),
             f"task.sft_budgets must be positive integers, got {sft_budgets}.")
    prior = t.get("sft_budget_prior", 0.0)
    require(0.0 <= prior <= 1.0, f"task.sft_budget_prior must be in [0, 1], got {prior}.")
    scales = tuple(t.get("sft_budget_scales", ()))
    if scales and name == "arithmetic":  # only the synthetic task reads them
        n = len(set(sft_budgets or budgets))
        require(len(scales) == n and all(0.0 <= x <= 1.0 for x in scales),
                 f"task.sft_budget_scales needs one scale in [0, 1] per budget ({n}), got {scales}.")
    return TaskSpec(
        name=name, train_problems=int(t.train_problems), eval_problems=int(t.eval_problems),
        tokenizer_vocab_size=int(t.tokenizer_vocab_size), tokenizer_whole_budgets=bool(t.tokenizer_whole_budgets),
        sft_examples=int(t.sft_examples), sft_steps=int(t.sft_steps), sft_batch_size=int(t.sft_batch_size),
        sft_lr=float(t.sft_lr), sft_max_len=int(t.sft_max_len), sft_budgets=sft_budgets or tuple(budgets),
        sft_budget_prior=float(prior), sft_budget_scales=tuple(float(x) for x in scales))


def resolve_model(config) -> ModelSpec:
    """The model section: config.model_path and config.model (checked as a whole ModelConfig
    when it is one; a path's config.json is checked when it is read)."""
    model = ModelSpec(path=str(config.model_path), fields=dict(config.model))
    if not model.path or "vocab_size" in model.fields:  # a whole model section (the plan reads it)
        model.config()  # a wrong field or value: ConfigError naming it
    return model


def resolve_lora(config) -> LoRASpec:
    """The lora section (absent: off)."""
    c = config.get("lora")
    if c is None:
        return LoRASpec()
    rank, alpha, targets = c.get("rank", 0), c.get("alpha", 16.0), tuple(c.get("targets", LORA_TARGETS))
    base_dtype = c.get("base_dtype", "bfloat16")
    require(isinstance(rank, int) and not isinstance(rank, bool) and rank >= 0,
            f"lora.rank must be an integer ≥ 0 (0 = off), got {rank!r}.")
    require(isinstance(alpha, (int, float)) and alpha > 0, f"lora.alpha must be positive, got {alpha!r}.")
    require(len(targets) > 0 and set(targets) <= set(LORA_TARGETS) and len(set(targets)) == len(targets),
            f"lora.targets must be distinct names from {LORA_TARGETS}, got {targets}.")
    require(base_dtype in DTYPES, f"lora.base_dtype must be one of {sorted(DTYPES)}, got {base_dtype!r}.")
    return LoRASpec(rank=int(rank), alpha=float(alpha), targets=targets, base_dtype=base_dtype)


def resolve_distributed(config) -> DistributedSpec:
    """The distributed keys; read before anything asks jax for its devices."""
    return DistributedSpec(enabled=bool(config.get("distributed", False)),
                           coordinator=str(config.get("distributed_coordinator", "")),
                           num_processes=int(config.get("distributed_num_processes", 0)),
                           process_id=int(config.get("distributed_process_id", 0)))


def resolve_mesh(config, rows_per_step: int | None = None, micro_batch_size: int | None = None,
                 num_devices: int | None = None, slices: int | None = None) -> MeshSpec:
    """The mesh section, checked against the devices (num_devices / slices: default jax's) and,
    when given, the training batch it must split."""
    m = config.mesh
    require(len(tuple(m.shape)) == len(tuple(m.axes)),
             f"mesh.shape {tuple(m.shape)} and mesh.axes {tuple(m.axes)} must have the same length.")
    if num_devices is None:
        import jax
        num_devices, slices = jax.device_count(), sharding.num_slices(jax.devices())
    try:
        shape = sharding.resolve_mesh_shape(tuple(m.shape), num_devices, slices=slices or 1,
                                            axis_names=tuple(m.axes))
    except sharding.MeshError as e:
        raise ConfigError(str(e)) from None
    batch_axes = dict(sharding.rules_from_config(m)).get("batch", ())
    ways = math.prod(s for s, a in zip(shape, m.axes) if a in batch_axes)
    require(rows_per_step is None or (rows_per_step % ways == 0 and micro_batch_size % ways == 0),
             f"train.micro_batch_size ({micro_batch_size}) and the {rows_per_step} rollouts per step must be "
             f"divisible by the {ways} data-parallel ways of mesh.shape {shape}.")
    k = _decode_tensor_parallel(config.rollout)
    if k > 1:
        try:
            sharding.decode_mesh_shape(shape, tuple(m.axes), k, slices or 1)
        except sharding.MeshError as e:
            raise ConfigError(f"rollout.decode_tensor_parallel={k}: {e}") from None
        groups = math.prod(shape) // k
        require(rows_per_step is None or rows_per_step % groups == 0,
                f"rollout.decode_tensor_parallel={k}: the {rows_per_step} rollouts per step must split over its "
                f"{groups} decode groups.")
    return MeshSpec(shape=tuple(int(x) for x in m.shape), axes=tuple(m.axes), rules=sharding.rules_from_config(m))


def resolve(config, num_devices: int | None = None, slices: int = 1) -> RunSpec:
    """Validates `config` and resolves it into a RunSpec (ConfigError naming the key otherwise).

    num_devices: the devices the mesh must cover (default: jax.device_count()), in `slices` TPU
      slices (default: those of jax.devices(); see sharding.resolve_mesh_shape).
    """
    model = resolve_model(config)
    name = config.objective.name
    require(name in objectives.OBJECTIVES,
             f"objective.name must be one of {sorted(objectives.OBJECTIVES)}, got {name!r}.")
    objective = objectives.get_objective(name)
    sampling = _sampling(config, objective)
    train = _train(config, sampling.group)
    task = resolve_task(config, sampling.rollout.budgets)
    mesh = resolve_mesh(config, train.prompts_per_step * sampling.group, train.micro_batch_size, num_devices,
                        None if num_devices is None else slices)
    evaluation = resolve_eval(config)
    data_spec = resolve_data(config)
    _check_held_out(data_spec, evaluation)
    return RunSpec(
        name=config.name, seed=int(config.seed), sampling=sampling,
        objective=_objective(config, objective, sampling),
        loss=_loss(config, objective, sampling, train.rows_per_minibatch), optim=_optim(config),
        train=train, eval=evaluation, grading_workers=evaluation.grading_workers,
        grading_timeout_s=evaluation.grading_timeout_s, answer_format=evaluation.answer_format,
        data=data_spec, model=model, mesh=mesh, task=task, distributed=resolve_distributed(config),
        lora=resolve_lora(config))


def as_dict(spec: Any) -> dict:
    """A spec (or any part) as plain JSON-ready values."""
    return json.loads(json.dumps(dataclasses.asdict(spec), default=str))
