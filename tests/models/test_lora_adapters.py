"""LoRA adapters in the decoder (models/lora.py): a fresh adapter (B = 0) changes nothing, the
base keeps its random draws, and an export merges W + scale A B into a folder whose logits in
transformers equal ours with the adapters."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from hbpo_jax.errors import ConfigError
from hbpo_jax.models import ModelConfig, Qwen2, lora, save_pretrained
from hbpo_jax.models.config import LORA_TARGETS

CFG = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                  num_kv_heads=2, eos_token_ids=(1,))
LORA = dict(lora_rank=4, lora_alpha=8.0, lora_targets=LORA_TARGETS)
IDS = np.random.default_rng(0).integers(0, 97, size=(2, 9))


def _randomize_b(model, seed=1):
    """Every adapter's B drawn at random (a trained adapter), so each adapter changes the output."""
    graphdef, state = nnx.split(model)
    adapters, base = lora.split(state)
    pure = nnx.to_pure_dict(adapters)
    keys = iter(jax.random.split(jax.random.key(seed), len(jax.tree.leaves(pure))))
    pure = jax.tree_util.tree_map_with_path(
        lambda path, x: 0.3 * jax.random.normal(next(keys), x.shape, x.dtype) if path[-1].key == "b" else x, pure)
    nnx.replace_by_pure_dict(adapters, pure)
    return nnx.merge(graphdef, lora.join(base, adapters))


def test_fresh_adapters_change_nothing_and_keep_the_base():
    base = Qwen2(CFG, rngs=nnx.Rngs(0))
    adapted = Qwen2(CFG.replace(**LORA), rngs=nnx.Rngs(0))
    _, base_state = nnx.split(base)
    _, adapter_base = lora.split(nnx.split(adapted)[1])
    for x, y in zip(jax.tree.leaves(base_state), jax.tree.leaves(adapter_base)):
        assert np.array_equal(np.asarray(x), np.asarray(y))  # the same random draws
    np.testing.assert_array_equal(np.asarray(adapted(IDS)), np.asarray(base(IDS)))
    shapes = {"/".join(str(getattr(k, "key", k)) for k in p): v.shape
              for p, v in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(lora.split(nnx.split(adapted)[1])[0]))}
    assert shapes["layers/attn/q_lora/a"] == (2, 32, 4) and shapes["layers/attn/q_lora/b"] == (2, 4, 4, 8)
    assert shapes["layers/attn/o_lora/a"] == (2, 4, 8, 4) and shapes["layers/mlp/down_lora/b"] == (2, 4, 32)
    assert len(shapes) == 2 * len(LORA_TARGETS)


def test_adapters_change_the_output_by_scale_x_a_b():
    """One target (up): the model's output equals the base's with W_up + scale A B."""
    cfg = CFG.replace(lora_rank=2, lora_alpha=6.0, lora_targets=("up",))
    model = _randomize_b(Qwen2(cfg, rngs=nnx.Rngs(0)))
    up, a, b = model.layers.mlp.up_proj[...], model.layers.mlp.up_lora.a[...], model.layers.mlp.up_lora.b[...]
    merged = Qwen2(CFG, rngs=nnx.Rngs(0))
    merged.layers.mlp.up_proj[...] = up + 3.0 * jnp.einsum("ler,lrm->lem", a, b)
    np.testing.assert_allclose(np.asarray(model(IDS)), np.asarray(merged(IDS)), atol=2e-5, rtol=1e-5)
    assert not np.allclose(np.asarray(model(IDS)), np.asarray(Qwen2(CFG, rngs=nnx.Rngs(0))(IDS)), atol=1e-3)


def test_bad_lora_fields_are_one_sentence():
    with pytest.raises(ConfigError, match="lora_targets"):
        CFG.replace(lora_rank=4, lora_targets=("qkv",))
    with pytest.raises(ConfigError, match="lora_rank"):
        CFG.replace(lora_rank=-1)


def test_export_merges_and_transformers_agrees(tmp_path):
    """save_pretrained of an adapted model: config.json without LoRA, weights W + scale A B;
    transformers' Qwen2ForCausalLM (float32) gives our adapted model's logits within 1e-4."""
    model = _randomize_b(Qwen2(CFG.replace(**LORA), rngs=nnx.Rngs(0)))
    ours = np.asarray(model(IDS))
    save_pretrained(model, str(tmp_path))
    config = (tmp_path / "config.json").read_text()
    assert "lora" not in config
    hf = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(torch.tensor(IDS)).logits.numpy()
    assert np.abs(theirs - ours).max() <= 1e-4
    base = np.asarray(Qwen2(CFG, rngs=nnx.Rngs(0))(IDS))
    assert np.abs(base - ours).max() > 1e-2  # the adapters were merged, not dropped
