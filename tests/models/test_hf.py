"""Hugging Face folders in and out: transformers' files load, ours load in transformers, bad
folders get one clear error naming the file, tensor or key."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from conftest import xla_flags
from flax import nnx

from hbpo_jax.errors import ConfigError
from hbpo_jax.models import SafetensorsError, WeightsError, create_model, load_pretrained, save_pretrained
from hbpo_jax.models.safetensors_io import SafetensorsFile, save_file
from tests.helpers import hf_logits, hf_model

IDS = np.random.default_rng(0).integers(0, 97, size=(2, 9))


def _params(model):
    return jax.tree.leaves(nnx.state(model, nnx.Param))


def test_sharded_checkpoint_with_index_loads(tmp_path):
    hf = hf_model()
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    model = load_pretrained(str(tmp_path)).model
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(IDS, jnp.int32))), hf_logits(hf, IDS), atol=1e-4)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("max_shard_bytes", [2**40, 30_000])
def test_save_load_round_trip_is_exact(tmp_path, dtype, max_shard_bytes):
    hf = hf_model(tie_word_embeddings=True)
    hf.save_pretrained(tmp_path / "src")
    first = load_pretrained(str(tmp_path / "src"), dtype=dtype).model
    save_pretrained(first, str(tmp_path / "out"), max_shard_bytes=max_shard_bytes)
    second = load_pretrained(str(tmp_path / "out"), dtype=dtype).model
    for a, b in zip(_params(first), _params(second)):
        assert a.dtype == b.dtype == jnp.dtype(dtype)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_transformers_loads_what_we_save(tmp_path):
    from hbpo_jax.models import ModelConfig
    cfg = ModelConfig(vocab_size=97, hidden_size=48, intermediate_size=80, num_layers=2, num_heads=6,
                      num_kv_heads=2, eos_token_ids=(3,))
    model = create_model(cfg, seed=3)
    save_pretrained(model, str(tmp_path), max_shard_bytes=40_000)
    hf = transformers.Qwen2ForCausalLM.from_pretrained(str(tmp_path), attn_implementation="eager").eval()
    np.testing.assert_allclose(hf_logits(hf, IDS), np.asarray(model(jnp.asarray(IDS, jnp.int32))), atol=1e-4)


def test_tokenizer_files_are_loaded_when_present(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1, "b": 2}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    hf_model(vocab_size=3, eos_token_id=2, bos_token_id=0).save_pretrained(tmp_path)
    assert load_pretrained(str(tmp_path)).tokenizer is None
    fast.save_pretrained(tmp_path)
    loaded = load_pretrained(str(tmp_path)).tokenizer
    assert loaded("a b a")["input_ids"] == [1, 2, 1]


# ------------------------------------------------------------------------------ bad folders

@pytest.fixture
def folder(tmp_path):
    hf_model().save_pretrained(tmp_path)
    return tmp_path


def _rewrite_weights(folder, edit):
    path = folder / "model.safetensors"
    st = SafetensorsFile(path)
    tensors = {k: np.array(st[k]) for k in st.keys()}
    edit(tensors)
    os.remove(path)
    save_file(path, tensors)


def test_missing_folder_and_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pretrained(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_pretrained(str(tmp_path))


def test_missing_tensor_is_named(folder):
    _rewrite_weights(folder, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(WeightsError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load_pretrained(str(folder))


def test_wrong_shape_is_named(folder):
    def edit(t):
        t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"][:-1]
    _rewrite_weights(folder, edit)
    with pytest.raises(WeightsError, match=r"k_proj\.weight.*shape"):
        load_pretrained(str(folder))


def test_unexpected_tensor_is_named(folder):
    _rewrite_weights(folder, lambda t: t.update({"model.layers.7.mlp.up_proj.weight": np.zeros(3, np.float32)}))
    with pytest.raises(WeightsError, match=r"layers\.7"):
        load_pretrained(str(folder))


def test_other_architecture_is_refused(folder):
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "gemma2"  # qwen2, qwen3 and llama are read (tests/test_model_families.py)
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="config.json.*gemma2"):
        load_pretrained(str(folder))


def test_out_of_range_config_value_names_the_key(folder):
    cfg = json.loads((folder / "config.json").read_text())
    cfg["num_key_value_heads"] = 4  # 6 heads are not a multiple of 4
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="config.json.*num_kv_heads"):
        load_pretrained(str(folder))


def test_truncated_weights_file_is_named(folder):
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(SafetensorsError, match="model.safetensors.*truncated"):
        load_pretrained(str(folder))


def test_garbage_weights_file_is_named(folder):
    (folder / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(SafetensorsError, match="model.safetensors"):
        load_pretrained(str(folder))


def test_pickle_weights_are_refused(tmp_path):
    hf = hf_model()
    hf.config.save_pretrained(tmp_path)
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(WeightsError, match="safetensors only"):
        load_pretrained(str(tmp_path))


@pytest.mark.slow
def test_convert_script_round_trips(tmp_path):
    import subprocess
    import sys
    hf = hf_model()
    hf.save_pretrained(tmp_path / "hf")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, XLA_FLAGS=xla_flags(1), JAX_PLATFORMS="cpu")
    for args in (["--to=orbax", f"--src={tmp_path / 'hf'}", f"--dst={tmp_path / 'orbax'}"],
                 ["--to=hf", f"--src={tmp_path / 'orbax'}", f"--dst={tmp_path / 'back'}"]):
        done = subprocess.run([sys.executable, os.path.join(root, "launch", "convert.py"), *args],
                              capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
    back = transformers.Qwen2ForCausalLM.from_pretrained(str(tmp_path / "back")).eval()
    np.testing.assert_allclose(hf_logits(back, IDS), hf_logits(hf, IDS), atol=1e-6)


def test_orbax_params_restore_onto_a_mesh(tmp_path):
    from hbpo_jax import checkpoint, sharding
    hf_model(num_attention_heads=8, num_key_value_heads=4, hidden_size=64,
             vocab_size=128).save_pretrained(tmp_path / "hf")
    checkpoint.hf_to_orbax(str(tmp_path / "hf"), str(tmp_path / "orbax"))
    mesh = sharding.make_mesh((1, 2, 4))
    model = checkpoint.restore_params(str(tmp_path / "orbax"), mesh=mesh)
    q = model.layers.attn.q_proj.get_value()  # [L, E, H, D]: every layer's, stacked
    assert tuple(q.sharding.spec)[:3] == (None, "fsdp", "tensor")
    plain = load_pretrained(str(tmp_path / "hf")).model
    np.testing.assert_array_equal(np.asarray(q), np.asarray(plain.layers.attn.q_proj.get_value()))
