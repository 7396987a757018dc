"""What several test files share: a character tokenizer with ChatML and think specials, and the
small model and rows that the engine, the static sampler and the paged kernels are compared on."""
import numpy as np
import pytest
import tokenizers
import transformers
from flax import nnx
from tokenizers import decoders, models

from hbpo_jax.models import ModelConfig, create_model
from hbpo_jax.rollout import batch as rollout
from hbpo_jax.rollout.settings import RolloutSettings


def char_tokenizer():
    """One token per character plus ChatML and think specials (101 ids)."""
    specials = ["<pad>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    tk = tokenizers.Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(specials + chars)}, merges=[]))
    tk.add_special_tokens([tokenizers.AddedToken(s, special=True, normalized=False) for s in specials])
    tk.decoder = decoders.Fuse()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<|im_end|>")
    tok.chat_template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
                         "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}"
                         "{{ '<|im_start|>assistant\\n' }}{% endif %}")
    return tok


CFG = ModelConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2)
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [3], [40, 41, 42, 43]]
N = 40


@pytest.fixture(scope="module")
def model():
    m = create_model(CFG, seed=3)
    m.lm_head[...] = m.lm_head[...] * 15.0  # sharp logits: greedy margins above float noise
    return nnx.split(m)


@pytest.fixture(scope="module")
def rows():
    """24 rows over the 4 prompts: a random prefix of 0-4 tokens each and limits of 0-39."""
    rng = np.random.default_rng(0)
    row_prompt = rng.integers(0, len(PROMPTS), 24)
    prefixes = [rng.integers(1, 99, rng.integers(0, 5)).tolist() for _ in range(24)]
    return row_prompt, prefixes, rng.integers(0, N, 24)


def rollouts(model, tok, problems, *, key, **settings):
    """budget_rollouts with RolloutSettings(**settings), the static engine unless one is named."""
    settings = {"engine": "static", **settings}
    settings["budgets"] = tuple(settings.get("budgets") or ())
    return rollout.budget_rollouts(model, tok, problems, RolloutSettings(**settings), key=key)
