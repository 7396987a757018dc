"""Qwen3 and Llama in the one decoder, against transformers' own Qwen3ForCausalLM and
LlamaForCausalLM on small random checkpoints (float32): logits, HF folders both ways, the cached
decode paths (KV cache, the static sampler, the paged engine), and the config's refusals."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from hbpo_jax.models import ConfigError, KVCache, ModelConfig, load_pretrained, save_pretrained
from hbpo_jax.models.qwen2 import Decoder, Qwen2
from hbpo_jax.rollout import refill as engine
from hbpo_jax.rollout import static as sampler
from tests.helpers import hf_logits, random_model

LLAMA3_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=64)  # wavelengths 16..64 blended: all three regimes at D 64

# name: (family, transformers config fields). hidden/heads differs from head_dim in qwen3-hd64.
FAMILIES = {
    "qwen3-hd64-tied": ("qwen3", dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                      tie_word_embeddings=True)),
    "qwen3-hd16-bias-untied": ("qwen3", dict(hidden_size=48, num_attention_heads=3, num_key_value_heads=1,
                                             head_dim=16, attention_bias=True, rope_theta=1e6)),
    "llama-hd64-llama3-untied": ("llama", dict(hidden_size=128, num_attention_heads=2, num_key_value_heads=1,
                                               rope_theta=500000.0, rope_scaling=LLAMA3_ROPE)),
    "llama-hd128-tied-bias": ("llama", dict(hidden_size=256, num_attention_heads=2, num_key_value_heads=2,
                                            tie_word_embeddings=True, attention_bias=True)),
}
CLASSES = {"qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
           "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM)}


def family_model(family: str, seed: int = 0, **kw):
    """transformers' model of `family` with every parameter random (biases and norms too, the
    q/k norms included, so each is tested)."""
    config_cls, model_cls = CLASSES[family]
    base = dict(vocab_size=97, intermediate_size=80, num_hidden_layers=2, rms_norm_eps=1e-6,
                max_position_embeddings=256, eos_token_id=3, bos_token_id=1, tie_word_embeddings=False)
    base.update(kw)
    return random_model(model_cls, config_cls(**base), seed)


def _load(tmp_path, hf, **kw):
    hf.save_pretrained(tmp_path)
    return load_pretrained(str(tmp_path), with_tokenizer=False, **kw).model


@pytest.mark.parametrize("name", list(FAMILIES))
def test_logits_match_transformers_and_round_trip(tmp_path, name):
    family, fields = FAMILIES[name]
    hf = family_model(family, **fields)
    model = _load(tmp_path / "hf", hf)
    cfg = model.cfg
    assert cfg.model_type == family and isinstance(model, Decoder)
    assert cfg.head_dim == fields.get("head_dim", fields["hidden_size"] // fields["num_attention_heads"])
    assert cfg.num_params() == sum(p.numel() for p in hf.parameters())
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 97, size=(3, 13))
    mask = np.ones_like(ids)
    mask[1, :5] = 0  # left padding
    ours = np.asarray(model(jnp.asarray(ids, jnp.int32), attention_mask=jnp.asarray(mask)))
    ref = hf_logits(hf, ids, mask)
    real = mask.astype(bool)
    diff = np.abs(ours[real] - ref[real]).max()
    assert diff <= 1e-4, diff
    print(f"{name}: max |Δlogit| vs transformers {diff:.2e}")
    # Every parameter carries logical axes; the q/k norms are stacked [L, D].
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        axes = var.get_metadata()["logical_axes"]
        assert len(axes) == var.get_value().ndim, path
    if family == "qwen3":
        assert model.layers.attn.q_norm.scale.get_metadata()["logical_axes"] == ("layers", "head_dim")

    # Ours out -> transformers' own class of the family in -> the same logits.
    save_pretrained(model, str(tmp_path / "ours"))
    written = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert written["model_type"] == family and written["architectures"] == [CLASSES[family][1].__name__]
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "ours"),
                                                             attn_implementation="eager").eval()
    assert type(back) is CLASSES[family][1]
    np.testing.assert_allclose(hf_logits(back, ids, mask)[real], ref[real], atol=1e-5, rtol=0)
    assert load_pretrained(str(tmp_path / "ours"), with_tokenizer=False).config == cfg


def test_llama3_rope_frequencies_equal_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    hf = transformers.LlamaConfig(hidden_size=128, num_attention_heads=2, rope_theta=500000.0,
                                  rope_scaling=dict(LLAMA3_ROPE), max_position_embeddings=1024)
    cfg = ModelConfig.from_hf(hf.to_dict())
    ref, scale = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    assert scale == 1.0 and cfg.rope_type == "llama3"
    ours, default = cfg.rope_inv_freq(), cfg.replace(rope_type="default").rope_inv_freq()
    np.testing.assert_allclose(ours, ref.numpy(), rtol=1e-6, atol=0)
    # All three regimes occur: kept (high frequencies), divided by the factor, blended between.
    np.testing.assert_array_equal(ours[:3], default[:3])
    np.testing.assert_allclose(ours[-4:], default[-4:] / 8.0, rtol=1e-6)
    assert ((ours < default) & (ours > default / 8.0)).any()


def _greedy_reference(hf, prompts, new):
    out = []
    for p in prompts:
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              max_new_tokens=new, do_sample=False, pad_token_id=0)
        out.append(ref[0, len(p):].tolist())
    return out


@pytest.mark.slow  # ~40 s on the 2-core machine: a KV-cache loop, the sampler and the engine, per family
@pytest.mark.parametrize("name", ["qwen3-hd64-tied", "llama-hd64-llama3-untied"])
def test_cached_decode_paths_match_the_full_forward_and_transformers(tmp_path, name):
    """The KV cache (prefill + one-token steps) gives the full forward's logits; the static
    sampler and the paged refilling engine give transformers' greedy tokens."""
    family, fields = FAMILIES[name]
    hf = family_model(family, seed=5, **dict(fields, eos_token_id=None))
    with torch.no_grad():
        hf.lm_head.weight.mul_(8.0) if not hf.config.tie_word_embeddings else hf.model.embed_tokens.weight.mul_(3.0)
    model = _load(tmp_path, hf)

    ids = jnp.asarray(np.random.default_rng(3).integers(0, 97, size=(2, 10)), jnp.int32)
    mask = jnp.ones_like(ids).at[1, :3].set(0)
    full = model(ids, attention_mask=mask)
    cache = KVCache.init(model.cfg, batch=2, max_len=16)
    prefill, cache = model.forward(ids[:, :7], attention_mask=mask[:, :7], cache=cache)
    positions = jnp.cumsum(mask, axis=1) - 1
    steps = [prefill]
    for t in range(7, 10):
        step, cache = model.forward(ids[:, t:t + 1], positions=positions[:, t:t + 1], cache=cache)
        steps.append(step)
    real = np.asarray(mask, bool)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(steps, axis=1))[real], np.asarray(full)[real], atol=1e-5)

    prompts = [[11, 12, 13, 14, 15], [21, 22, 23], [31, 32, 33, 34, 35, 36, 37]]
    new = 10
    want = _greedy_reference(hf, prompts, new)
    pad_ids, pad_mask = sampler.pad_prompts(prompts)
    out = sampler.generate(model, pad_ids, pad_mask, key=jax.random.key(0), max_new_tokens=new, temperature=0.0)
    assert np.asarray(out.tokens).tolist() == want
    graphdef, state = nnx.split(model)
    eng = engine.RefillEngine(graphdef, model.cfg, sampler.SamplerSettings(max_new_tokens=new, temperature=0.0),
                              slots=2, admit=1)
    paged_out, _ = eng.run(state, prompts, np.arange(3), [[]] * 3, np.full(3, new), key=jax.random.key(0))
    assert [paged_out.tokens[i].tolist() for i in range(3)] == want


def _hf_json(family, **kw):
    config_cls, _ = CLASSES[family]
    base = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1)
    base.update(kw)
    return config_cls(**base).to_dict()


@pytest.mark.parametrize("family,changes,match", [
    ("llama", dict(rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64)),
     "rope_type 'yarn' is not supported"),
    ("llama", dict(rope_scaling=dict(rope_type="linear", factor=2.0)), "rope_type 'linear' is not supported"),
    ("llama", dict(mlp_bias=True), "mlp_bias=true is not supported"),
    ("llama", dict(hidden_act="gelu"), "hidden_act 'gelu' is not supported"),
    ("llama", dict(pretraining_tp=2), "pretraining_tp 2 is not supported"),
    ("qwen3", dict(use_sliding_window=True, sliding_window=16, max_window_layers=0),
     "use_sliding_window=true is not supported"),
    ("qwen3", dict(rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                     original_max_position_embeddings=64)), "rope_type 'llama3' is not supported"),
])
def test_unsupported_features_are_refused_in_one_sentence(family, changes, match):
    with pytest.raises(ConfigError, match=match) as e:
        ModelConfig.from_hf(_hf_json(family, **changes), source="x/config.json")
    assert str(e.value).startswith("x/config.json: ") and str(e.value).count(". ") == 0


def test_family_defaults_and_switches():
    qwen3 = ModelConfig.from_hf({k: v for k, v in _hf_json("qwen3").items() if k != "head_dim"})
    assert qwen3.head_dim == 128  # transformers' Qwen3Config default, not hidden / heads
    assert qwen3.qk_norm and not qwen3.qkv_bias and not qwen3.o_bias
    llama = ModelConfig.from_hf(_hf_json("llama", attention_bias=True))
    assert llama.qkv_bias and llama.o_bias and not llama.qk_norm and llama.head_dim == 16
    qwen2 = ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2, num_kv_heads=1)
    assert qwen2.model_type == "qwen2" and qwen2.qkv_bias and not qwen2.o_bias and Decoder is Qwen2
    with pytest.raises(ConfigError, match="model.model_type must be one of"):
        qwen2.replace(model_type="mistral")
    with pytest.raises(ConfigError, match="attention_bias must be False for qwen2"):
        qwen2.replace(attention_bias=True)
    qwen2_json = transformers.Qwen2Config(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                          num_attention_heads=2, num_key_value_heads=1).to_dict()
    exported = ModelConfig.from_hf(dict(qwen2_json, attention_bias=True))  # as some exporters write it
    assert exported.qkv_bias and not exported.o_bias  # transformers' Qwen2 ignores attention_bias too
    with pytest.raises(ConfigError, match="model_type 'gemma' is not supported"):
        ModelConfig.from_hf(dict(_hf_json("llama"), model_type="gemma"))


# ------------------------------------------------------------------------------ the TPU kernels at D 64

QWEN3_D64 = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=64, model_type="qwen3", attention_impl="xla")


def test_splash_at_head_dim_64_matches_the_xla_path():
    """The splash kernel (TPU interpret mode on the CPU) for a Qwen3 with D 64 (half a lane tile):
    the logits of the XLA path, left padding included."""
    model = Decoder(QWEN3_D64, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    state = jax.tree.map(lambda x: x * 4, state)  # peaked attention: masking errors would show
    ids = jnp.asarray(np.random.default_rng(0).integers(1, 64, size=(2, 11)), jnp.int32)
    mask = jnp.ones_like(ids).at[0, :4].set(0)
    xla = nnx.merge(graphdef, state)(ids, attention_mask=mask)
    splash_graphdef = nnx.split(Decoder(QWEN3_D64.replace(attention_impl="splash"), rngs=nnx.Rngs(0)))[0]
    got = nnx.merge(splash_graphdef, state)(ids, attention_mask=mask)
    real = np.asarray(mask, bool)
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(xla)[real], atol=1e-5)


def test_paged_kernel_at_head_dim_64_is_refused_in_one_sentence():
    """jax 0.10.2's paged-attention kernel does not lower for D 64 on a TPU (checked by compiling
    for v5e); the cache refuses it up front, and the engine's TPU default is the XLA path there."""
    from hbpo_jax.models import paged
    with pytest.raises(ValueError, match="needs a head_dim that is a multiple of 128, got 64"):
        paged.PagedKVCache.init(QWEN3_D64, 2, 2, 8, 4, impl="kernel")
    paged.PagedKVCache.init(QWEN3_D64.replace(head_dim=128), 2, 2, 8, 4, impl="kernel")


@pytest.mark.slow  # ~15 s: a TPU compile of the forward and backward
def test_splash_at_head_dim_64_compiles_for_a_tpu_topology(monkeypatch):
    pytest.importorskip("libtpu")
    monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compiling only: share libtpu's lock
    from jax.experimental import topologies
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from hbpo_jax import sharding as shd
    from hbpo_jax.plan import programs as plan
    devices = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2").devices
    mesh = shd.make_mesh((1, 2, 2), devices=devices)
    cfg = QWEN3_D64.replace(hidden_size=256, dtype="bfloat16", attention_impl="auto")
    graphdef, params = plan.abstract_params(cfg, mesh, shd.DEFAULT_RULES)
    ids = jax.ShapeDtypeStruct((4, 200), jnp.int32, sharding=NamedSharding(mesh, P(("data", "fsdp"))))

    def loss(params, ids):
        return nnx.merge(graphdef, params)(ids).astype(jnp.float32).mean()

    with jax.default_matmul_precision("default"):  # Mosaic rejects "highest" for bfloat16 tiles
        compiled = jax.jit(jax.grad(loss)).lower(params, ids).compile()
    text = compiled.as_text()
    assert "splash_mha_fwd" in text and "splash_mha_dkv" in text
