"""Qwen2 architecture settings, and their translation to and from Hugging Face config.json."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

from hbpo_jax.errors import ConfigError

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
ATTENTION_IMPLS = ("auto", "xla", "dot_product", "cudnn", "splash")
REMAT_POLICIES = ("none", "full", "dots")
SUPPORTED_MODEL_TYPES = ("qwen2",)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Qwen2 decoder shape and numerics.

    `dtype` is the compute dtype, `param_dtype` the storage dtype of the weights. Attention
    scores, softmax, RMSNorm statistics and logits are always computed in float32.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int = 0  # 0: hidden_size // num_heads
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    dtype: str = "float32"
    param_dtype: str = "float32"
    # xla: einsum attention on every platform; cudnn/dot_product: jax.nn; splash: the Pallas TPU
    # kernel without a cache and for a prefill into an empty cache, XLA over a filled cache
    # (decode), interpret mode off TPU; auto: like splash, with the kernel chosen per platform
    # (splash on TPU, cudnn on GPU for 16-bit compute, xla elsewhere; models/splash.py).
    attention_impl: str = "auto"
    remat: str = "none"  # rematerialise each decoder layer in the backward pass
    # One lax.scan over the stacked layers (compiled once for any depth), or a Python loop over the
    # same weights (faster for a few layers on a CPU; compile time grows with depth): qwen2.run_layers.
    scan_layers: bool = True

    def __post_init__(self):
        if not self.head_dim:
            object.__setattr__(self, "head_dim", self.hidden_size // max(self.num_heads, 1))
        object.__setattr__(self, "eos_token_ids", tuple(int(i) for i in self.eos_token_ids))
        self.validate()

    def validate(self, where: str = "model") -> None:
        """Raises ConfigError with one sentence naming the first bad key."""
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                    "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{where}.{key} must be a positive integer, got {value!r}.")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"{where}.num_heads ({self.num_heads}) must be a multiple of {where}.num_kv_heads "
                f"({self.num_kv_heads}) for grouped-query attention.")
        if self.head_dim % 2:
            raise ConfigError(f"{where}.head_dim must be even for rotary embeddings, got {self.head_dim}.")
        if not self.rope_theta > 0:
            raise ConfigError(f"{where}.rope_theta must be positive, got {self.rope_theta!r}.")
        if not 0 < self.rms_norm_eps < 1:
            raise ConfigError(f"{where}.rms_norm_eps must be in (0, 1), got {self.rms_norm_eps!r}.")
        for key in ("dtype", "param_dtype"):
            if getattr(self, key) not in DTYPES:
                raise ConfigError(f"{where}.{key} must be one of {sorted(DTYPES)}, got {getattr(self, key)!r}.")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ConfigError(
                f"{where}.attention_impl must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}.")
        if not isinstance(self.scan_layers, bool):
            raise ConfigError(f"{where}.scan_layers must be True or False, got {self.scan_layers!r}.")
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"{where}.remat must be one of {REMAT_POLICIES}, got {self.remat!r}.")
        for i in self.eos_token_ids:
            if not 0 <= i < self.vocab_size:
                raise ConfigError(f"{where}.eos_token_ids holds {i}, outside the vocabulary of {self.vocab_size}.")

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    @property
    def weight_dtype(self):
        return DTYPES[self.param_dtype]

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        """Parameter count, as transformers counts it (tied embeddings counted once)."""
        e, m, h, k, d = (self.hidden_size, self.intermediate_size, self.num_heads,
                         self.num_kv_heads, self.head_dim)
        attn = e * h * d + h * d + 2 * (e * k * d + k * d) + h * d * e
        layer = attn + 3 * e * m + 2 * e
        embed = self.vocab_size * e * (1 if self.tie_word_embeddings else 2)
        return embed + self.num_layers * layer + e

    # ----------------------------------------------------------------- Hugging Face

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], *, source: str = "config.json", **overrides) -> "ModelConfig":
        """Builds a config from a Hugging Face config.json dict (transformers 4 or 5 layout)."""
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"{source}: model_type {model_type!r} is not supported; hbpo-jax implements "
                f"{SUPPORTED_MODEL_TYPES} (Qwen2ForCausalLM).")
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in hf]
        if missing:
            raise ConfigError(f"{source}: missing required key {missing[0]!r}.")
        # transformers 5 keeps rotary settings in rope_parameters; 4.x in rope_theta/rope_scaling.
        rope = hf.get("rope_parameters") or {}
        scaling = hf.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
        if rope_type not in ("default", None):
            raise ConfigError(f"{source}: rope_type {rope_type!r} is not supported (only 'default').")
        if hf.get("use_sliding_window"):
            raise ConfigError(f"{source}: use_sliding_window=true is not supported.")
        eos = hf.get("eos_token_id")
        eos = () if eos is None else (tuple(eos) if isinstance(eos, (list, tuple)) else (eos,))
        kwargs = dict(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            head_dim=hf.get("head_dim") or 0,
            rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_position_embeddings=hf.get("max_position_embeddings", 32768),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos,
        )
        kwargs.update(overrides)
        try:
            return cls(**kwargs)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    def to_hf(self) -> dict[str, Any]:
        """A config.json dict that transformers' Qwen2ForCausalLM loads (4.x and 5.x keys)."""
        eos = list(self.eos_token_ids)
        return {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "use_sliding_window": False,
            "attention_dropout": 0.0,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
            "torch_dtype": self.param_dtype,
            "dtype": self.param_dtype,
        }
