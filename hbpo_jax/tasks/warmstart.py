"""The tiny run's world: its tokenizer, problems, and a supervised warm start cached in the workdir.

`arithmetic_policy(spec, workdir, mesh, rules)` builds (or restores) the warm start in
`<workdir>/warmstart/` with the settings it was built from in `sft_settings.json`; a cache built
from other settings is refused rather than silently reused.
"""
from __future__ import annotations

import dataclasses
import json
import logging

import jax
from flax import nnx

from hbpo_jax import checkpoint, files
from hbpo_jax import config as config_lib
from hbpo_jax import spec as spec_lib
from hbpo_jax.errors import ConfigError
from hbpo_jax.models import create_model
from hbpo_jax.policy import Policy
from hbpo_jax.tasks import arithmetic, sft
from hbpo_jax.tasks import tokenizer as tokenizer_lib

log = logging.getLogger(__name__)

SETTINGS_FILE = "sft_settings.json"
EVAL_SEED_OFFSET = 3  # the eval problems are make_dataset(eval_problems, seed + 3)


def eval_records(task: spec_lib.TaskSpec, seed: int) -> list:
    """The task's eval problems (level = difficulty), as the loop and launch/eval.py use them."""
    return arithmetic.make_dataset(task.eval_problems, seed + EVAL_SEED_OFFSET)


def settings(task: spec_lib.TaskSpec, seed: int, model_cfg) -> dict:
    """What a warm start is built from, flat and JSON-normalised: "task.<key>" for the task's data
    and SFT settings (sft_budgets: the budgets actually used), "model.<key>" for the architecture,
    and "seed"."""
    task = {k: v for k, v in dataclasses.asdict(task).items() if k.startswith(("sft_", "tokenizer_")) or k == "name"}
    model = {k: v for k, v in model_cfg.to_hf().items() if k not in ("dtype", "torch_dtype")}
    flat = {**{f"task.{k}": v for k, v in task.items()}, **{f"model.{k}": v for k, v in model.items()},
            "seed": seed}
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
        raise ConfigError(f"{warm} was built with other settings ({'; '.join(diff)}). Use a new --workdir, "
                         f"or delete {warm} to rebuild the warm start there.")


def arithmetic_policy(spec: spec_lib.RunSpec, workdir: str, mesh, rules) -> Policy:
    """The tokenizer (built for the task's texts), the warm-started model, train and eval problems."""
    t, seed = spec.task, spec.seed
    budgets = t.sft_budgets
    tokenizer = tokenizer_lib.build_tokenizer(
        arithmetic.corpus_texts(seed=seed, budgets=budgets),
        vocab_size=t.tokenizer_vocab_size, workdir=workdir,
        whole_words=tuple(str(b) for b in budgets) if t.tokenizer_whole_budgets else ())
    # The task's tokenizer decides the vocabulary (rounded up to a multiple of 8).
    model_cfg = spec.model.config(vocab_size=-(-len(tokenizer) // 8) * 8, eos_token_ids=(tokenizer.eos_token_id,))
    warm = files.join(workdir, "warmstart")
    wanted = settings(t, seed, model_cfg)
    if files.isdir(files.join(warm, "params")):
        check_settings(warm, wanted)
        log.info("warm start: restoring the cached SFT model from %s", warm)
        model = checkpoint.restore_params(warm, mesh=mesh, rules=rules, dtype=model_cfg.param_dtype)
    else:
        model = _supervised(t, seed, tokenizer, model_cfg, mesh, rules)
        checkpoint.save_params(warm, model)
        if jax.process_index() == 0:
            files.write_json(files.join(warm, SETTINGS_FILE), wanted)
    graphdef, params = nnx.split(model)
    train = arithmetic.make_dataset(t.train_problems, seed + 2)
    return Policy(graphdef, params, tokenizer, train, eval_records(t, seed), cache_dir=warm)


def _supervised(t: spec_lib.TaskSpec, seed: int, tokenizer, model_cfg, mesh, rules):
    examples = arithmetic.sft_examples(t.sft_examples, seed + 1, budgets=t.sft_budgets,
                                       budget_prior=t.sft_budget_prior, budget_scales=t.sft_budget_scales)
    arrays = sft.tokenize_sft(tokenizer, examples, t.sft_max_len)
    model = create_model(model_cfg, seed=seed, mesh=mesh, rules=rules)
    result = sft.sft_train(model, arrays, steps=t.sft_steps, lr=t.sft_lr, batch_size=t.sft_batch_size,
                           seed=seed, mesh=mesh, rules=rules, log=log.info)
    log.info("warm start: %d SFT steps in %.0fs, final loss %.3f", t.sft_steps, result.seconds,
             float(result.losses[-10:].mean()))
    return result.model()
