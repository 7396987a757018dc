"""The embedded default: the whole HBPO pipeline at toy scale on a CPU, no downloads.

It builds its own tokenizer and a synthetic arithmetic task (hbpo_jax.tasks), warm-starts a small
Qwen2 by supervised fine-tuning, then trains it with HBPO, budgets scaled to the task.
"""
from ml_collections import config_dict

from hbpo_jax import config as config_lib


def get_config(arg: str | None = None):
    config = config_lib.base_config()
    config.name = "hbpo-tiny"
    # vocab_size is the tokenizer's; the task's tokenizer is built with exactly this size.
    config.model = config_dict.ConfigDict(dict(
        vocab_size=256, hidden_size=128, intermediate_size=384, num_layers=3, num_heads=4,
        num_kv_heads=2, head_dim=32, rope_theta=10000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=True, max_position_embeddings=512, bos_token_id=None,
        eos_token_ids=(), dtype="float32", param_dtype="float32", attention_impl="xla",
        remat="none"))
    config.data.path = ""  # empty: the synthetic task
    k = config.task
    k.name = "arithmetic"
    k.tokenizer_vocab_size = 192
    k.train_problems = 4096
    k.eval_problems = 384
    k.sft_examples = 8000
    k.sft_steps = 400
    k.sft_batch_size = 32
    k.sft_lr = 3e-3
    k.sft_max_len = 256

    r = config.rollout
    r.budgets = (32, 64, 128, 160)
    r.samples_per_budget = 2
    r.max_prompt_len = 64
    r.max_response_len = 256
    config.objective.l_max = 256

    t = config.train
    t.steps = 25
    t.prompts_per_step = 16
    t.mini_batches = 2
    t.micro_batch_size = 64
    t.checkpoint_every = 10
    t.keep_checkpoints = 2

    o = config.optim
    o.learning_rate = 3e-4
    o.weight_decay = 0.0
    e = config.eval
    e.before_after = True
    e.temperature = 0.0
    e.top_p = 1.0
    e.samples = 1
    config.mesh.shape = (1, -1, 1)
    config.grading.workers = 1
    if arg:
        raise ValueError(f"configs/tiny.py takes no argument, got {arg!r}.")
    return config
