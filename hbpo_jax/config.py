"""Run configuration: the defaults every config file starts from.

Config files (configs/*.py) define `get_config(arg=None)` returning an ml_collections ConfigDict
built on `base_config()`. `hbpo_jax.spec.resolve(config)` validates it before anything compiles
(ConfigError, one sentence naming the key) and resolves it into the run's typed RunSpec. Keys
that default to None take the objective's recipe (objectives.OBJECTIVES) unless set.
"""
from __future__ import annotations

from ml_collections import config_dict

from hbpo_jax import sharding


def _unset(kind):
    """None unless the user sets it (then of type `kind`): the objective's value applies."""
    return config_dict.placeholder(kind)


def base_config() -> config_dict.ConfigDict:
    """Defaults: the paper's method (arXiv 2507.15844) at whatever scale the file sets."""
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

    # LoRA (rank 0: full fine-tuning): adapters of rank `rank` on the projections in `targets`
    # (q, k, v, o, gate, up, down), y = x W + (alpha / rank) (x A) B; only they train and take
    # optimizer state, the base stays frozen in base_dtype. Checkpoints hold the adapters; the
    # base is read again from model_path (or the warm start) on resume; the export merges them.
    c.lora = config_dict.ConfigDict(dict(rank=0, alpha=16.0, targets=("q", "k", "v", "o", "gate", "up", "down"),
                                         base_dtype="bfloat16"))

    c.mesh = config_dict.ConfigDict(dict(
        shape=(1, -1, 1), axes=sharding.MESH_AXES, rules=sharding.DEFAULT_RULES))

    # data.path: a local file / folder, a hub id, or "rg:<task>[,<task>...]": reasoning-gym's
    # procedural problems, generated offline from data.seed (max_rows of them, 0: RG_DEFAULT_SIZE;
    # the eval's rg: problems come from config.seed, so a different data.seed keeps them held out).
    c.data = config_dict.ConfigDict(dict(path="", field_map="deepscaler", split="train",
                                         shuffle=True, max_rows=0, seed=1))
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
        # Prompting of training rollouts (prompting.MODES); None: the objective's (HBPO: "budget").
        mode=_unset(str), budgets=(512, 1024, 2048, 2560), rollouts_per_prompt=16,
        max_prompt_len=1024, max_response_len=4096, temperature=1.0, top_p=1.0, top_k=0,
        # prefix_in_response: the pre-filled budget text counts in the length n (HBPO's code);
        # prefix_loss: it also gets the policy loss (HBPO's code), although the policy never
        # sampled it. Both default to the code's behaviour.
        prefix_in_response=True, prefix_loss=True, hard_budget_cap=False, system_prompt="",
        max_batch=0,  # rows decoding at once (0: all); bounds the KV cache
        # "static": chunks of max_batch rows, each until its longest row ends; "refill": max_batch
        # slots, each refilled from a queue when its row ends, every distinct prompt prefilled
        # once (hbpo_jax.rollout.refill). The same tokens for the same seed either way.
        engine="refill",
        # The refill engine's KV page pool in tokens, all devices together (0: max_batch slots x
        # the longest row, so no row waits; smaller: KV memory follows live tokens and a row is
        # admitted when the pages for its whole limit are free; hbpo_jax/models/paged.py).
        kv_tokens=0,
        # Tokens per KV page of the refill engine's pool (its attention reads whole pages; a
        # prompt's full pages are shared by its rows). 16: docs/rollout.md, "Page size".
        page_size=16,
        # Tensor-parallel decode: the rollout regroups the mesh's chips into groups of k that split
        # each decode weight by heads / MLP columns / vocabulary (sharding.decode_mesh), each group
        # decoding its share of the rows. 1: every chip holds the whole decode weights. For slices
        # where the longest row's decode steps, each reading the weights, set the step (v5e).
        decode_tensor_parallel=1,
        # The chat format (prompting.PROMPT_FORMATS): "template" (the model's chat template, with
        # rollout.system_prompt if set) or "r1_zero" (a system prompt asking for reasoning in
        # <think> </think> and a final \boxed{} answer; for instruct models that never think).
        prompt_format="template"))

    # objective.name picks a recipe from objectives.OBJECTIVES. The settings below are None = the
    # objective's default (HBPO: beta 4, reward_variant "code", format_reward -1, wrong_reward 0,
    # intra_weight 1); a value set for a setting the objective does not take is an error.
    # l_max None follows rollout.max_response_len.
    c.objective = config_dict.ConfigDict(dict(
        name="hbpo", l_max=_unset(int), beta=_unset(float), reward_variant=_unset(str),
        format_reward=_unset(float), wrong_reward=_unset(float), intra_weight=_unset(float)))

    # None = the objective's (HBPO: clip 0.2 / 0.28, dual clip 3, token-mean); dual_clip 0 = off.
    c.loss = config_dict.ConfigDict(dict(
        clip_low=_unset(float), clip_high=_unset(float), dual_clip=_unset(float), kl_coef=0.0,
        aggregation=_unset(str)))

    c.optim = config_dict.ConfigDict(dict(
        learning_rate=1e-6, schedule="constant", warmup_steps=0, weight_decay=0.01,
        b1=0.9, b2=0.999, grad_clip=1.0))

    c.train = config_dict.ConfigDict(dict(
        steps=629, prompts_per_step=64, mini_batches=4, micro_batch_size=16, ppo_epochs=1,
        log_every=1, checkpoint_every=20, keep_checkpoints=3, max_consecutive_skips=5,
        recompute_old_logprobs="auto", export_hf=True,
        # 0: every micro-batch of a step at one response width (the longest response, rounded).
        # w > 0: a mini-batch's rows grouped by length into micro-batches, each cut to its longest
        # row rounded up to a multiple of w, so the update pays for real tokens, not padding (at
        # most max_response_len / w widths, each compiled once). The same gradient either way.
        update_width_step=0,
        # True: rows packed by tokens instead (train/packing.py): each micro-batch a fixed budget
        # of micro_batch_size lanes of max prompt + max response tokens holding several rows, empty
        # micro-batches skipped: the update pays for real tokens and compiles once per run.
        pack_rows=False))

    # format: the answer-format policy (grading.FORMATS): "paper" (the answer after </think>; no
    # think block = format error) or "lenient" (also the last \boxed{} of a response that never
    # opened a think block; one opened and not closed is still a format error).
    c.grading = config_dict.ConfigDict(dict(workers=4, timeout_s=5.0, format="paper"))
    c.eval = config_dict.ConfigDict(dict(every=0, temperature=0.6, top_p=0.95,
                                         max_response_len=32768, samples=1, before_after=False,
                                         # prompting modes (prompting.parse_modes; "fixed" = each budget)
                                         modes=("natural", "efficiency", "fixed"),
                                         # keep a "before" already in <workdir>/results.json (copied
                                         # from a run with the same starting policy), not re-evaluate
                                         reuse_before=False,
                                         # also report a benchmark's own scorer beside ours
                                         # (reasoning-gym's score_answer on our extracted answer)
                                         dataset_score=True))
    # Benchmarks (launch/eval.py, and every `eval.every` steps): eval_sets specs such as
    # "math500:/data/math500.jsonl", "champ", "rg:basic_arithmetic", "tiny" (empty: the task's
    # eval set); eval.modes may also name "fixed:N" and "l1[:N]"; max_problems 0 = all;
    # batch_size: problems per sampler call; max_response_len 0 = rollout.max_response_len.
    c.eval.benchmarks = ()
    c.eval.max_problems = 0
    c.eval.batch_size = 256
    return c

