"""Decoder settings (Qwen2, Qwen3, Llama), and their translation to and from Hugging Face config.json.

One decoder serves the three families; what differs is read from config.json's model_type into a
few switches (ModelConfig.qkv_bias / o_bias / qk_norm, rope_type):

  qwen2   biases on q, k, v (never on o); no q/k norm
  qwen3   per-head RMSNorm of q and k (over D, before the rotation); biases on q, k, v and o only
          with attention_bias (false in every released Qwen3)
  llama   like qwen3 without the q/k norm; rope_scaling "llama3" (Llama 3.1+) rescales the
          rotary frequencies (rope_inv_freq)
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from hbpo_jax.errors import ConfigError

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
ATTENTION_IMPLS = ("auto", "xla", "dot_product", "cudnn", "splash")
REMAT_POLICIES = ("none", "full", "dots", "auto")
SUPPORTED_MODEL_TYPES = ("qwen2", "qwen3", "llama")
ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM"}
ROPE_TYPES = ("default", "llama3")
# The projections a LoRA adapter may sit on: attention q, k, v, o and the MLP's gate, up, down.
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
# What a config.json may leave out, per family: transformers' own defaults for that class.
_HF_DEFAULTS = {
    "qwen2": dict(rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=32768),
    "qwen3": dict(rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=32768, head_dim=128),
    "llama": dict(rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=2048),
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Decoder shape and numerics (Qwen2, Qwen3 or Llama: `model_type`).

    `dtype` is the compute dtype, `param_dtype` the storage dtype of the weights. Attention
    scores, softmax, RMSNorm statistics and logits are always computed in float32.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int = 0  # 0: hidden_size // num_heads (Qwen3 states its own, e.g. 128 at hidden 1024 / 16 heads)
    model_type: str = "qwen2"  # "qwen2" | "qwen3" | "llama": the family's switches (module docstring)
    attention_bias: bool = False  # qwen3 / llama: biases on q, k, v and o (qwen2: q, k, v always)
    rope_theta: float = 10000.0
    # "default", or "llama3": the inverse frequencies rescaled by rope_factor between the two
    # wavelengths original_max_position_embeddings / {high,low}_freq_factor (rope_inv_freq).
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position_embeddings: int = 8192
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
    # Rematerialise each decoder layer in the backward pass: "full" (keep only each layer's input),
    # "dots" (keep the matmul outputs too), "auto" (per the chip compiled for: qwen2.resolve_remat).
    remat: str = "none"
    # One lax.scan over the stacked layers (compiled once for any depth), or a Python loop over the
    # same weights (faster for a few layers on a CPU; compile time grows with depth): qwen2.run_layers.
    scan_layers: bool = True
    # LoRA adapters (models/lora.py) on the projections named in lora_targets (LORA_TARGETS), of
    # rank lora_rank (0: none), scaled by lora_alpha / lora_rank. Training state only: never in
    # config.json (an export merges the adapters into the weights).
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ()

    def __post_init__(self):
        if not self.head_dim:
            object.__setattr__(self, "head_dim", self.hidden_size // max(self.num_heads, 1))
        object.__setattr__(self, "eos_token_ids", tuple(int(i) for i in self.eos_token_ids))
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
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
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(f"{where}.model_type must be one of {SUPPORTED_MODEL_TYPES}, got {self.model_type!r}.")
        if not isinstance(self.attention_bias, bool):
            raise ConfigError(f"{where}.attention_bias must be True or False, got {self.attention_bias!r}.")
        if self.attention_bias and self.model_type == "qwen2":
            raise ConfigError(f"{where}.attention_bias must be False for qwen2 (its q, k, v biases are "
                              "always there and o has none).")
        if self.rope_type not in ROPE_TYPES:
            raise ConfigError(f"{where}.rope_type must be one of {ROPE_TYPES}, got {self.rope_type!r}.")
        if self.rope_type == "llama3" and not (
                self.rope_factor > 0 and self.rope_original_max_position_embeddings > 0
                and self.rope_high_freq_factor > self.rope_low_freq_factor > 0):
            raise ConfigError(
                f"{where}: llama3 rope scaling needs rope_factor > 0, original_max_position_embeddings "
                f"> 0 and high_freq_factor > low_freq_factor > 0, got factor {self.rope_factor}, "
                f"low {self.rope_low_freq_factor}, high {self.rope_high_freq_factor}, original "
                f"{self.rope_original_max_position_embeddings}.")
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
        if not isinstance(self.lora_rank, int) or self.lora_rank < 0:
            raise ConfigError(f"{where}.lora_rank must be an integer ≥ 0 (0 = no adapters), got {self.lora_rank!r}.")
        bad = [t for t in self.lora_targets if t not in LORA_TARGETS]
        if bad or (self.lora_rank and not self.lora_targets):
            raise ConfigError(f"{where}.lora_targets must be a non-empty subset of {LORA_TARGETS}, got "
                              f"{self.lora_targets!r}.")
        for i in self.eos_token_ids:
            if not 0 <= i < self.vocab_size:
                raise ConfigError(f"{where}.eos_token_ids holds {i}, outside the vocabulary of {self.vocab_size}.")

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    @property
    def weight_dtype(self):
        return DTYPES[self.param_dtype]

    @property
    def qkv_bias(self) -> bool:
        """q, k and v projections carry biases (qwen2 always; the others with attention_bias)."""
        return self.model_type == "qwen2" or self.attention_bias

    @property
    def o_bias(self) -> bool:
        """The output projection carries a bias (qwen3 / llama with attention_bias)."""
        return self.model_type != "qwen2" and self.attention_bias

    @property
    def qk_norm(self) -> bool:
        """q and k are RMS-normalised per head over D before the rotation (qwen3)."""
        return self.model_type == "qwen3"

    def rope_inv_freq(self) -> np.ndarray:
        """float32 [D/2]: the rotary inverse frequencies theta^(-2i/D), with llama3 scaling applied
        when rope_type is "llama3". In float32 throughout, as transformers computes them, so both
        sides rotate by the same angles.

        llama3 (Llama 3.1's long-context recipe): a frequency whose wavelength 2π/f is longer than
        original / low_freq_factor is divided by rope_factor; one shorter than original /
        high_freq_factor is kept; in between it is blended, with weight s = (original / wavelength
        - low) / (high - low) on the kept frequency and 1 - s on the divided one.
        """
        f32 = np.float32
        d = self.head_dim
        inv = f32(1.0) / (f32(self.rope_theta) ** (np.arange(0, d, 2).astype(f32) / f32(d)))
        if self.rope_type == "llama3":
            original, factor = f32(self.rope_original_max_position_embeddings), f32(self.rope_factor)
            low, high = f32(self.rope_low_freq_factor), f32(self.rope_high_freq_factor)
            wavelen = f32(2 * math.pi) / inv
            long_waves = wavelen > original / low
            scaled = np.where(long_waves, inv / factor, inv)
            s = (original / wavelen - low) / (high - low)
            blended = (f32(1) - s) * scaled / factor + s * scaled
            middle = ~(wavelen < original / high) & ~long_waves
            inv = np.where(middle, blended, scaled)
        return inv.astype(f32)

    @property
    def lora_scale(self) -> float:
        """alpha / rank, the factor on every adapter's x A B (0 without adapters)."""
        return self.lora_alpha / self.lora_rank if self.lora_rank else 0.0

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        """Parameter count, as transformers counts it (tied embeddings counted once)."""
        e, m, h, k, d = (self.hidden_size, self.intermediate_size, self.num_heads,
                         self.num_kv_heads, self.head_dim)
        attn = e * h * d + 2 * e * k * d + h * d * e
        attn += (h * d + 2 * k * d) * self.qkv_bias + e * self.o_bias + 2 * d * self.qk_norm
        layer = attn + 3 * e * m + 2 * e
        embed = self.vocab_size * e * (1 if self.tie_word_embeddings else 2)
        return embed + self.num_layers * layer + e

    # ----------------------------------------------------------------- Hugging Face

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], *, source: str = "config.json", **overrides) -> "ModelConfig":
        """Builds a config from a Hugging Face config.json dict (transformers 4 or 5 layout) of a
        Qwen2, Qwen3 or Llama model; anything this decoder does not compute is refused in one
        sentence naming the key."""
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"{source}: model_type {model_type!r} is not supported; hbpo-jax implements "
                f"{SUPPORTED_MODEL_TYPES} ({', '.join(ARCHITECTURES.values())}).")
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in hf]
        if missing:
            raise ConfigError(f"{source}: missing required key {missing[0]!r}.")
        defaults = _HF_DEFAULTS[model_type]
        # transformers 5 keeps rotary settings in rope_parameters; 4.x in rope_theta/rope_scaling.
        rope = dict(hf.get("rope_scaling") or {})
        rope.update(hf.get("rope_parameters") or {})
        rope_type = rope.get("rope_type", rope.get("type")) or "default"
        if rope_type not in ROPE_TYPES or (rope_type == "llama3" and model_type != "llama"):
            raise ConfigError(f"{source}: rope_type {rope_type!r} is not supported for {model_type} "
                              f"(supported: 'default', and 'llama3' for llama).")
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise ConfigError(f"{source}: partial_rotary_factor {rope['partial_rotary_factor']!r} is not "
                              "supported (only a full rotation, 1.0).")
        if hf.get("use_sliding_window"):
            raise ConfigError(f"{source}: use_sliding_window=true is not supported.")
        if any(t != "full_attention" for t in hf.get("layer_types") or ()):
            raise ConfigError(f"{source}: layer_types other than 'full_attention' (sliding windows) are "
                              "not supported.")
        if hf.get("mlp_bias"):
            raise ConfigError(f"{source}: mlp_bias=true is not supported.")
        if hf.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{source}: hidden_act {hf['hidden_act']!r} is not supported (only 'silu').")
        if (hf.get("pretraining_tp") or 1) != 1:
            raise ConfigError(f"{source}: pretraining_tp {hf['pretraining_tp']!r} is not supported (only 1).")
        eos = hf.get("eos_token_id")
        eos = () if eos is None else (tuple(eos) if isinstance(eos, (list, tuple)) else (eos,))
        kwargs = dict(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            head_dim=hf.get("head_dim") or defaults.get("head_dim", 0),
            model_type=model_type,
            # transformers' Qwen2 ignores attention_bias (q, k, v biases always, none on o); some
            # exporters write it anyway.
            attention_bias=bool(hf.get("attention_bias", False)) if model_type != "qwen2" else False,
            rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", defaults["rope_theta"]))),
            rms_norm_eps=float(hf.get("rms_norm_eps", defaults["rms_norm_eps"])),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_position_embeddings=hf.get("max_position_embeddings", defaults["max_position_embeddings"]),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos,
        )
        if rope_type == "llama3":
            absent = [k for k in ("factor", "low_freq_factor", "high_freq_factor",
                                  "original_max_position_embeddings") if k not in rope]
            if absent:
                raise ConfigError(f"{source}: llama3 rope scaling is missing {absent[0]!r}.")
            kwargs.update(rope_type="llama3", rope_factor=float(rope["factor"]),
                          rope_low_freq_factor=float(rope["low_freq_factor"]),
                          rope_high_freq_factor=float(rope["high_freq_factor"]),
                          rope_original_max_position_embeddings=int(rope["original_max_position_embeddings"]))
        kwargs.update(overrides)
        try:
            return cls(**kwargs)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    def rope_parameters(self) -> dict[str, Any]:
        """The rotary settings as config.json states them (rope_parameters / rope_scaling)."""
        rope: dict[str, Any] = {"rope_type": self.rope_type, "rope_theta": self.rope_theta}
        if self.rope_type == "llama3":
            rope.update(factor=self.rope_factor, low_freq_factor=self.rope_low_freq_factor,
                        high_freq_factor=self.rope_high_freq_factor,
                        original_max_position_embeddings=self.rope_original_max_position_embeddings)
        return rope

    def to_hf(self) -> dict[str, Any]:
        """A config.json dict that transformers' class for model_type (Qwen2ForCausalLM,
        Qwen3ForCausalLM, LlamaForCausalLM) loads (4.x and 5.x keys)."""
        eos = list(self.eos_token_ids)
        rope = self.rope_parameters()
        hf = {
            "architectures": [ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
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
            "rope_parameters": rope,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "attention_dropout": 0.0,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
            "torch_dtype": self.param_dtype,
            "dtype": self.param_dtype,
        }
        if self.model_type in ("qwen2", "qwen3"):
            hf["use_sliding_window"] = False
        if self.model_type in ("qwen3", "llama"):
            hf["attention_bias"] = self.attention_bias
        if self.model_type == "llama":
            hf["mlp_bias"] = False
        if self.rope_type != "default":  # transformers 4.x reads the scaling from rope_scaling
            hf["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
        return hf
