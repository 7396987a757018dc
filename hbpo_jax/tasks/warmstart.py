"""The tiny run's world: its tokenizer, problems, and a supervised warm start cached in the workdir.

`arithmetic_policy(config, workdir, mesh, rules)` builds (or restores) the warm start in
`<workdir>/warmstart/` with the settings it was built from in `sft_settings.json`; a cache built
from other settings is refused rather than silently reused.
"""
from __future__ import annotations

import json
import logging

import jax
from flax import nnx

from hbpo_jax import checkpoint, files
from hbpo_jax import config as config_lib
from hbpo_jax.models import create_model
from hbpo_jax.policy import Policy
from hbpo_jax.tasks import arithmetic, sft
from hbpo_jax.tasks import tokenizer as tokenizer_lib

log = logging.getLogger(__name__)

SETTINGS_FILE = "sft_settings.json"
EVAL_SEED_OFFSET = 3  # the eval problems are make_dataset(eval_problems, seed + 3)


def eval_records(config) -> list:
    """The task's eval problems (level = difficulty), as the loop and launch/eval.py use them."""
    return arithmetic.make_dataset(config.task.eval_problems, config.seed + EVAL_SEED_OFFSET)


def settings(config, budgets, model_cfg) -> dict:
    """What a warm start is built from, flat and JSON-normalised: "task.<key>" for the task's data
    and SFT settings, "model.<key>" for the architecture, and "seed"."""
    task = {k: v for k, v in config.task.to_dict().items() if k.startswith(("sft_", "tokenizer_")) or k == "name"}
    task["sft_budgets"] = budgets  # the budgets actually used (sft_budgets or rollout.budgets)
    model = {k: v for k, v in model_cfg.to_hf().items() if k not in ("dtype", "torch_dtype")}
    flat = {**{f"task.{k}": v for k, v in task.items()}, **{f"model.{k}": v for k, v in model.items()},
            "seed": config.seed}
    return json.loads(json.dumps(flat))  # tuples as lists, as they come back from the file


def check_settings(warm: str, wanted: dict) -> None:
    """Refuses a cached warm start built from other settings (a changed SFT setting needs a fresh
    workdir); a setting added since the cache was written counts at its base-config default."""
    path = files.join(warm, SETTINGS_FILE)
    if not files.exists(path):
        log.warning("warm start: %s has no %s (an older cache); using it as it is", warm, SETTINGS_FILE)
        return
    defaults = json.loads(json.dumps({f"task.{k}": v for k, v in config_lib.base_config().task.to_dict().items()}))
    cached = {**{k: v for k, v in defaults.items() if k in wanted}, **files.read_json(path)}
    diff = [f"{k}: cached {cached.get(k)!r}, config {v!r}" for k, v in sorted(wanted.items()) if cached.get(k) != v]
    if diff:
        raise config_lib.ConfigError(f"{warm} was built with other settings ({'; '.join(diff)}). Use a new --workdir, "
                         f"or delete {warm} to rebuild the warm start there.")


def arithmetic_policy(config, workdir: str, mesh, rules) -> Policy:
    """The tokenizer (built for the task's texts), the warm-started model, train and eval problems."""
    t, r = config.task, config.rollout
    budgets = tuple(t.get("sft_budgets", ())) or tuple(r.budgets)
    tokenizer = tokenizer_lib.build_tokenizer(
        arithmetic.corpus_texts(seed=config.seed, budgets=budgets),
        vocab_size=t.tokenizer_vocab_size, workdir=workdir,
        whole_words=tuple(str(b) for b in budgets) if t.tokenizer_whole_budgets else ())
    # The task's tokenizer decides the vocabulary (rounded up to a multiple of 8).
    model_cfg = config_lib.model_config(config).replace(
        vocab_size=-(-len(tokenizer) // 8) * 8, eos_token_ids=(tokenizer.eos_token_id,))
    warm = files.join(workdir, "warmstart")
    wanted = settings(config, budgets, model_cfg)
    if files.isdir(files.join(warm, "params")):
        check_settings(warm, wanted)
        log.info("warm start: restoring the cached SFT model from %s", warm)
        model = checkpoint.restore_params(warm, mesh=mesh, rules=rules, dtype=model_cfg.param_dtype)
    else:
        model = _supervised(config, tokenizer, model_cfg, budgets, mesh, rules)
        checkpoint.save_params(warm, model)
        if jax.process_index() == 0:
            files.write_json(files.join(warm, SETTINGS_FILE), wanted)
    graphdef, params = nnx.split(model)
    train = arithmetic.make_dataset(t.train_problems, config.seed + 2)
    return Policy(graphdef, params, tokenizer, train, eval_records(config), cache_dir=warm)


def _supervised(config, tokenizer, model_cfg, budgets, mesh, rules):
    t = config.task
    examples = arithmetic.sft_examples(t.sft_examples, config.seed + 1, budgets=budgets,
                                       budget_prior=t.get("sft_budget_prior", 0.0),
                                       budget_scales=tuple(t.get("sft_budget_scales", ())))
    arrays = sft.tokenize_sft(tokenizer, examples, t.sft_max_len)
    model = create_model(model_cfg, seed=config.seed, mesh=mesh, rules=rules)
    result = sft.sft_train(model, arrays, steps=t.sft_steps, lr=t.sft_lr, batch_size=t.sft_batch_size,
                           seed=config.seed, mesh=mesh, rules=rules, log=log.info)
    log.info("warm start: %d SFT steps in %.0fs, final loss %.3f", t.sft_steps, result.seconds,
             float(result.losses[-10:].mean()))
    return result.model()
