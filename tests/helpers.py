"""What several test files share: a character tokenizer with ChatML and think specials, the
small model and rows that the engine, the static sampler and the paged kernels are compared on
(served as the `model` and `rows` fixtures by tests/conftest.py), small random transformers
models with their logits (the reference nobody here wrote), and random update batches."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
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


def sharp_model():
    """(graphdef, state) of the CFG model with its LM head scaled x15: sharp logits, greedy margins
    above float noise (the `model` fixture of tests/conftest.py)."""
    m = create_model(CFG, seed=3)
    m.lm_head[...] = m.lm_head[...] * 15.0
    return nnx.split(m)


def random_rows():
    """24 rows over the 4 PROMPTS: a random prefix of 0-4 tokens each and limits of 0-39 (the
    `rows` fixture of tests/conftest.py): (row_prompt int [24], prefixes, limits int [24])."""
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


# ----------------------------------------------------------------------------- update batches

UPDATE_P, UPDATE_N = 5, 7  # prompt and response tokens of update_batch's rows


def update_batch(rows=8, seed=0):
    """A random update batch for a 64-token vocabulary: tokens int32 [rows, P + N] (row 0
    left-padded by 2), attention_mask, response_mask bool [rows, N] (random lengths), old_logp,
    advantages [rows]."""
    p, n = UPDATE_P, UPDATE_N
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, 64, size=(rows, p + n)).astype(np.int32)
    attn = np.ones((rows, p + n), np.int32)
    attn[0, :2] = 0  # left padding
    lengths = rng.integers(1, n + 1, size=rows)
    resp = np.arange(n)[None] < lengths[:, None]
    attn[:, p:] = resp
    return dict(tokens=tokens, attention_mask=attn, response_mask=resp,
                old_logp=rng.normal(-4.0, 0.3, size=(rows, n)).astype(np.float32),
                advantages=rng.normal(size=rows).astype(np.float32))


def micro_split(batch, micro):
    """update_batch's rows as `micro` micro-batches [micro, rows / micro, ...] with token-mean
    weights, as jax arrays."""
    from hbpo_jax.train import update as trainer
    rows = batch["tokens"].shape[0]
    out = {k: v.reshape((micro, rows // micro) + v.shape[1:]) for k, v in batch.items()}
    out["weight"] = trainer.micro_weights(out["response_mask"], "token-mean")
    return jax.tree.map(jnp.asarray, out)


def optim_config(lr=1e-2):
    """A constant-rate AdamW section without weight decay."""
    return ml_collections.ConfigDict(dict(learning_rate=lr, schedule="constant", warmup_steps=0,
                                          weight_decay=0.0, b1=0.9, b2=0.999, grad_clip=1.0))


LOSS_KW = tuple(dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0, aggregation="token-mean").items())
