"""Run configuration: the defaults every config file starts from, and start-up validation.

Config files (configs/*.py) define `get_config(arg=None)` returning an ml_collections ConfigDict
built on `base_config()`. `validate(config)` runs before anything compiles and raises ConfigError
with one sentence naming the offending key.
"""
from __future__ import annotations

import math

from ml_collections import config_dict

from hbpo_jax import sharding
from hbpo_jax.models.config import ConfigError, ModelConfig

ROLLOUT_MODES = ("budget", "natural", "efficiency", "fixed", "l1")
AGGREGATIONS = ("token-mean", "sequence-mean-token-mean", "token-sum-norm")
SCHEDULES = ("constant", "cosine", "linear")


def base_config() -> config_dict.ConfigDict:
    """Defaults: the paper's method (HBPO.md) at whatever scale the file sets."""
    c = config_dict.ConfigDict()
    c.name = "hbpo"
    c.seed = 0
    c.model = config_dict.ConfigDict()  # ModelConfig fields; overridden by model_path's config.json
    c.model_path = ""  # a Hugging Face folder; empty: random init from `model`
    c.distributed = False  # jax.distributed.initialize(), one process per host (TPU pod slices)
    # Where the processes meet, when jax cannot find out itself (it can on TPU pods: leave these
    # empty there). E.g. CPU processes: coordinator "10.0.0.1:1234", num_processes 2, process_id 0 / 1.
    c.distributed_coordinator = ""
    c.distributed_num_processes = 0
    c.distributed_process_id = 0

    c.mesh = config_dict.ConfigDict(dict(
        shape=(1, -1, 1), axes=sharding.MESH_AXES, rules=sharding.DEFAULT_RULES))

    c.data = config_dict.ConfigDict(dict(path="", field_map="deepscaler", split="train",
                                         shuffle=True, max_rows=0))
    # A synthetic task instead of data.path ("arithmetic": hbpo_jax.tasks.arithmetic), with its
    # own tokenizer and a supervised warm start cached in the workdir.
    c.task = config_dict.ConfigDict(dict(
        name="", train_problems=4096, eval_problems=200, tokenizer_vocab_size=192,
        # The budget numbers as single tokens (tokenizer.build_tokenizer's whole_words) instead
        # of digit by digit; the operands stay single digits either way.
        tokenizer_whole_budgets=False,
        sft_examples=6000, sft_steps=500, sft_batch_size=32, sft_lr=3e-3, sft_max_len=192,
        # Budgets the tokenizer and the warm-start data are built for (empty: rollout.budgets).
        # Runs with other rollout budgets set them equal so they can share one warm start.
        sft_budgets=(),
        # How much the warm-start data shortens reasoning under smaller budget prompts
        # (tasks.arithmetic.sft_examples' budget_prior; 0: lengths independent of the prompt), and
        # optionally the redundancy scale under each budget, smallest first (budget_scales).
        sft_budget_prior=0.0, sft_budget_scales=()))

    c.rollout = config_dict.ConfigDict(dict(
        mode="budget", budgets=(512, 1024, 2048, 2560), rollouts_per_prompt=16,
        max_prompt_len=1024, max_response_len=4096, temperature=1.0, top_p=1.0, top_k=0,
        # prefix_in_response: the pre-filled budget text counts in the length n (HBPO's code);
        # prefix_loss: it also gets the policy loss (HBPO's code), although the policy never
        # sampled it. Both default to the code's behaviour.
        prefix_in_response=True, prefix_loss=True, hard_budget_cap=False, system_prompt="",
        max_batch=0))  # rows per sampler call (0: all); bounds the KV cache

    c.objective = config_dict.ConfigDict(dict(
        name="hbpo", beta=4.0, l_max=4096, reward_variant="code", format_reward=-1.0,
        wrong_reward=0.0, intra_weight=1.0))

    c.loss = config_dict.ConfigDict(dict(
        clip_low=0.2, clip_high=0.28, dual_clip=3.0, kl_coef=0.0, aggregation="token-mean"))

    c.optim = config_dict.ConfigDict(dict(
        learning_rate=1e-6, schedule="constant", warmup_steps=0, weight_decay=0.01,
        b1=0.9, b2=0.999, grad_clip=1.0))

    c.train = config_dict.ConfigDict(dict(
        steps=629, prompts_per_step=64, mini_batches=4, micro_batch_size=16, ppo_epochs=1,
        log_every=1, checkpoint_every=20, keep_checkpoints=3, max_consecutive_skips=5,
        recompute_old_logprobs="auto", export_hf=True))

    c.grading = config_dict.ConfigDict(dict(workers=4, timeout_s=5.0))
    c.eval = config_dict.ConfigDict(dict(every=0, temperature=0.6, top_p=0.95,
                                         max_response_len=32768, samples=1, before_after=False,
                                         # prompting modes (evaluation.evaluate; "fixed" = each budget)
                                         modes=("natural", "efficiency", "fixed"),
                                         # keep a "before" already in <workdir>/results.json (copied
                                         # from a run with the same starting policy), not re-evaluate
                                         reuse_before=False))
    # Benchmarks (launch/eval.py, and every `eval.every` steps): eval_sets specs such as
    # "math500:/data/math500.jsonl", "champ", "rg:basic_arithmetic", "tiny" (empty: the task's
    # eval set); eval.modes may also name "fixed:N" and "l1[:N]"; max_problems 0 = all;
    # batch_size: problems per sampler call; max_response_len 0 = rollout.max_response_len.
    c.eval.benchmarks = ()
    c.eval.max_problems = 0
    c.eval.batch_size = 256
    return c


def samples_per_budget(config) -> int:
    """Rollouts per (prompt, budget) subgroup: rollout.rollouts_per_prompt / len(rollout.budgets)."""
    return config.rollout.rollouts_per_prompt // len(config.rollout.budgets)


def model_config(config) -> ModelConfig:
    """The ModelConfig of `config.model` (checked; the key names are reported as model.<field>)."""
    fields = dict(config.model)
    fields["eos_token_ids"] = tuple(fields.get("eos_token_ids", ()))
    try:
        return ModelConfig(**fields)
    except TypeError as e:
        raise ConfigError(f"model: {e}.") from None


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(config, num_devices: int | None = None) -> None:
    """Checks every value a run depends on before anything is compiled.

    num_devices: the devices the mesh must cover (default: jax.device_count()).
    """
    if config.model_path == "" or "vocab_size" in config.model:
        model_config(config)  # with a model_path, config.json is checked when it is read

    r = config.rollout
    _require(r.mode in ROLLOUT_MODES, f"rollout.mode must be one of {ROLLOUT_MODES}, got {r.mode!r}.")
    budgets = tuple(r.budgets)
    _require(len(budgets) > 0, "rollout.budgets must not be empty.")
    _require(all(isinstance(b, int) and b > 0 for b in budgets),
             f"rollout.budgets must be positive integers, got {budgets}.")
    _require(list(budgets) == sorted(set(budgets)),
             f"rollout.budgets must be strictly increasing, got {budgets}.")
    _require(budgets[-1] < r.max_response_len,
             f"rollout.budgets holds {budgets[-1]}, not below rollout.max_response_len "
             f"(L_max = {r.max_response_len}).")
    _require(r.rollouts_per_prompt >= len(budgets) and r.rollouts_per_prompt % len(budgets) == 0,
             f"rollout.rollouts_per_prompt ({r.rollouts_per_prompt}) must be a positive multiple of the "
             f"{len(budgets)} budgets in rollout.budgets.")
    _require(r.max_prompt_len > 0 and r.max_response_len > 0,
             "rollout.max_prompt_len and rollout.max_response_len must be positive.")
    _require(r.temperature > 0, f"rollout.temperature must be positive for RL, got {r.temperature}.")
    _require(0 < r.top_p <= 1, f"rollout.top_p must be in (0, 1], got {r.top_p}.")
    _require(r.top_k >= 0, f"rollout.top_k must be ≥ 0 (0 = off), got {r.top_k}.")
    _require(r.max_batch >= 0, f"rollout.max_batch must be ≥ 0 (0 = all rows at once), got {r.max_batch}.")

    sft_budgets = tuple(config.task.get("sft_budgets", ()))
    _require(all(isinstance(b, int) and b > 0 for b in sft_budgets),
             f"task.sft_budgets must be positive integers, got {sft_budgets}.")
    prior = config.task.get("sft_budget_prior", 0.0)
    _require(0.0 <= prior <= 1.0, f"task.sft_budget_prior must be in [0, 1], got {prior}.")
    scales = tuple(config.task.get("sft_budget_scales", ()))
    if scales and config.task.get("name", "") == "arithmetic":  # only the synthetic task reads them
        n_budgets = len(set(sft_budgets or budgets))
        _require(len(scales) == n_budgets and all(0.0 <= x <= 1.0 for x in scales),
                 f"task.sft_budget_scales needs one scale in [0, 1] per budget ({n_budgets}), got {scales}.")
    validate_eval(config)

    o = config.objective
    _require(o.l_max == r.max_response_len,
             f"objective.l_max ({o.l_max}) must equal rollout.max_response_len ({r.max_response_len}).")
    _require(o.reward_variant in ("code", "paper"),
             f"objective.reward_variant must be 'code' or 'paper', got {o.reward_variant!r}.")
    _require(o.beta > 0, f"objective.beta must be positive, got {o.beta}.")

    loss = config.loss
    _require(0 <= loss.clip_low < 1, f"loss.clip_low must be in [0, 1), got {loss.clip_low}.")
    _require(loss.clip_high >= 0, f"loss.clip_high must be ≥ 0, got {loss.clip_high}.")
    _require(loss.dual_clip is None or loss.dual_clip > 1,
             f"loss.dual_clip must be > 1 or None, got {loss.dual_clip}.")
    _require(loss.kl_coef >= 0, f"loss.kl_coef must be ≥ 0, got {loss.kl_coef}.")
    _require(loss.aggregation in AGGREGATIONS,
             f"loss.aggregation must be one of {AGGREGATIONS}, got {loss.aggregation!r}.")

    opt = config.optim
    _require(opt.learning_rate > 0, f"optim.learning_rate must be positive, got {opt.learning_rate}.")
    _require(opt.schedule in SCHEDULES, f"optim.schedule must be one of {SCHEDULES}, got {opt.schedule!r}.")
    _require(opt.warmup_steps >= 0, f"optim.warmup_steps must be ≥ 0, got {opt.warmup_steps}.")
    _require(opt.grad_clip is None or opt.grad_clip > 0, f"optim.grad_clip must be positive, got {opt.grad_clip}.")

    t = config.train
    _require(t.steps >= 1, f"train.steps must be at least 1, got {t.steps}.")
    _require(t.prompts_per_step >= 1, f"train.prompts_per_step must be at least 1, got {t.prompts_per_step}.")
    _require(t.mini_batches >= 1 and t.prompts_per_step % t.mini_batches == 0,
             f"train.prompts_per_step ({t.prompts_per_step}) must be divisible by train.mini_batches "
             f"({t.mini_batches}).")
    group = r.rollouts_per_prompt
    mini_batch_rows = t.prompts_per_step // t.mini_batches * group
    _require(t.micro_batch_size >= 1 and mini_batch_rows % t.micro_batch_size == 0,
             f"train.micro_batch_size ({t.micro_batch_size}) must divide the {mini_batch_rows} "
             "sequences of a mini-batch.")

    m = config.mesh
    _require(len(tuple(m.shape)) == len(tuple(m.axes)),
             f"mesh.shape {tuple(m.shape)} and mesh.axes {tuple(m.axes)} must have the same length.")
    if num_devices is None:
        import jax
        num_devices = jax.device_count()
    try:
        shape = sharding.resolve_mesh_shape(tuple(m.shape), num_devices)
    except sharding.MeshError as e:
        raise ConfigError(str(e)) from None
    batch_axes = dict(sharding.rules_from_config(m)).get("batch", ())
    batch_ways = math.prod(s for s, a in zip(shape, m.axes) if a in batch_axes)
    rows = t.prompts_per_step * group
    _require(rows % batch_ways == 0 and t.micro_batch_size % batch_ways == 0,
             f"train.micro_batch_size ({t.micro_batch_size}) and the {rows} rollouts per step must be "
             f"divisible by the {batch_ways} data-parallel ways of mesh.shape {shape}.")


def validate_eval(config) -> None:
    """The eval section (benchmark specs are checked for syntax only; files are read later)."""
    from hbpo_jax import eval_sets, evaluation

    e = config.eval
    _require(e.every >= 0, f"eval.every must be ≥ 0 (0 = off), got {e.every}.")
    _require(e.samples >= 1, f"eval.samples must be at least 1, got {e.samples}.")
    _require(e.temperature >= 0, f"eval.temperature must be ≥ 0 (0 = greedy), got {e.temperature}.")
    _require(0 < e.top_p <= 1, f"eval.top_p must be in (0, 1], got {e.top_p}.")
    _require(e.max_response_len >= 0, f"eval.max_response_len must be ≥ 0, got {e.max_response_len}.")
    modes = tuple(e.get("modes", ("natural",)))
    try:
        evaluation.parse_modes(modes, tuple(config.rollout.budgets))
    except ValueError as err:
        raise ConfigError(f"eval.modes: {err}") from None
    _require(e.get("max_problems", 0) >= 0, f"eval.max_problems must be ≥ 0 (0 = all), got {e.get('max_problems')}.")
    _require(e.get("batch_size", 1) >= 1, f"eval.batch_size must be at least 1, got {e.get('batch_size')}.")
    benchmarks = tuple(e.get("benchmarks", ()))
    for spec in benchmarks:
        try:
            eval_sets.parse_spec(spec)
        except ValueError as err:
            raise ConfigError(f"eval.benchmarks: {err}") from None
    _require(e.every == 0 or benchmarks or config.task.name == "arithmetic",
             "eval.every > 0 needs eval.benchmarks (or a task with an eval set, task.name).")
