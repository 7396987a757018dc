"""What several test files share: a character tokenizer with ChatML and think specials, the
small model and rows that the engine, the static sampler and the paged kernels are compared on,
and small random transformers models with their logits (the reference nobody here wrote)."""
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


# ----------------------------------------------------------------------------- transformers references


def hf_config(**kw) -> transformers.Qwen2Config:
    base = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                num_attention_heads=6, num_key_value_heads=2, rope_theta=10000.0, rms_norm_eps=1e-6,
                tie_word_embeddings=False, max_position_embeddings=256, eos_token_id=3, bos_token_id=1)
    base.update(kw)
    return transformers.Qwen2Config(**base)


def hf_model(seed: int = 0, **kw) -> transformers.Qwen2ForCausalLM:
    """A Qwen2ForCausalLM with every parameter random (biases and norms too, so they are tested)."""
    return random_model(transformers.Qwen2ForCausalLM, hf_config(**kw), seed)


def random_model(model_cls, cfg, seed: int = 0):
    """transformers' `model_cls` of `cfg` (eager attention) with every parameter drawn from `seed`:
    norm weights near 1, the rest small, so biases and norms are tested too."""
    import torch  # only the transformers references need it
    torch.manual_seed(seed)
    cfg._attn_implementation = "eager"
    model = model_cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.05 * torch.randn_like(p))
    return model


def hf_logits(model, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
    """float32 logits [B, T, V]; with a left-padding mask, positions are counted over the mask."""
    import torch
    ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long)
    kwargs = {}
    if attention_mask is not None:
        mask = torch.as_tensor(np.asarray(attention_mask), dtype=torch.long)
        kwargs = dict(attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
    with torch.no_grad():
        return model(ids, **kwargs).logits.float().numpy()
