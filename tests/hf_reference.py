"""Builds small random transformers Qwen2 models: the reference nobody here wrote."""
import numpy as np
import torch
import transformers


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
    ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long)
    kwargs = {}
    if attention_mask is not None:
        mask = torch.as_tensor(np.asarray(attention_mask), dtype=torch.long)
        kwargs = dict(attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
    with torch.no_grad():
        return model(ids, **kwargs).logits.float().numpy()
