"""The decoder (Qwen2, Qwen3, Llama by config.json's model_type) in Flax NNX, with Hugging Face
folders in and out (hbpo_jax.models.gguf: GGUF files to such folders)."""
from hbpo_jax.errors import ConfigError
from hbpo_jax.models.config import ModelConfig
from hbpo_jax.models.hf import Pretrained, WeightsError, load_pretrained, save_pretrained
from hbpo_jax.models.qwen2 import Decoder, KVCache, Qwen2
from hbpo_jax.models.safetensors_io import SafetensorsError


def create_model(cfg: ModelConfig, *, seed: int = 0, mesh=None, rules=None) -> Qwen2:
    """A randomly initialised decoder of cfg's family, created already sharded when a mesh is given."""
    from flax import nnx

    from hbpo_jax import sharding
    return sharding.create_sharded(lambda: Qwen2(cfg, rngs=nnx.Rngs(seed)), mesh,
                                   rules or sharding.DEFAULT_RULES)


__all__ = ["ConfigError", "Decoder", "KVCache", "ModelConfig", "Pretrained", "Qwen2", "SafetensorsError",
           "WeightsError", "create_model", "load_pretrained", "save_pretrained"]
