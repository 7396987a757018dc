"""Hugging Face model folders in and out: config.json + safetensors (+ tokenizer files).

No torch, no pickle, no remote code. Loading reads one tensor at a time from a memory map and,
given a mesh, hands each device only its own shard (jax.make_array_from_callback), so a large model
is never held as one full host copy.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Callable, NamedTuple

import jax
import numpy as np
from flax import nnx

from hbpo_jax import files as _files  # `files` is a local name below
from hbpo_jax import sharding as sharding_lib
from hbpo_jax.errors import ConfigError
from hbpo_jax.models import lora
from hbpo_jax.models.config import DTYPES, ModelConfig
from hbpo_jax.models.qwen2 import Qwen2
from hbpo_jax.models.safetensors_io import SafetensorsFile, save_file

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_IGNORED = ("rotary_emb.inv_freq",)  # buffers some exporters write; recomputed here


class WeightsError(ValueError):
    """The weights in a model folder do not match its config; the message names file and tensor."""


class Pretrained(NamedTuple):
    model: Qwen2
    config: ModelConfig
    tokenizer: Any  # a transformers tokenizer, or None when the folder has no tokenizer files


# ----------------------------------------------------------------------------- name mapping
# Each entry: HF name, our parameter path, HF shape, converters HF layout <-> ours, and for a
# decoder layer's tensor its layer: our decoder parameters are stacked [L, ...] (qwen2.stack_layers),
# so HF's model.layers.{i}.X is row i of the one array at path ("layers", ...).

class _Entry(NamedTuple):
    hf_name: str
    path: tuple
    hf_shape: tuple[int, ...]
    to_ours: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]
    layer: int | None = None


def _layout(cfg: ModelConfig) -> list[_Entry]:
    e, m, h, k, d, v = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads,
                        cfg.head_dim, cfg.vocab_size)
    same = (lambda a: a, lambda a: a)
    transpose = (lambda a: a.T, lambda a: a.T)

    def in_proj(n):  # HF [n*d, e] <-> ours [e, n, d]
        return (lambda a: a.T.reshape(e, n, d), lambda a: a.reshape(e, n * d).T)

    def bias(n):  # HF [n*d] <-> ours [n, d]
        return (lambda a: a.reshape(n, d), lambda a: a.reshape(n * d))

    out_proj = (lambda a: a.T.reshape(h, d, e), lambda a: a.reshape(h * d, e).T)  # HF [e, h*d]
    entries = [_Entry("model.embed_tokens.weight", ("embed",), (v, e), *same)]
    for i in range(cfg.num_layers):
        p, hp = ("layers",), f"model.layers.{i}."
        attn = [
            _Entry(hp + "self_attn.q_proj.weight", p + ("attn", "q_proj"), (h * d, e), *in_proj(h)),
            _Entry(hp + "self_attn.k_proj.weight", p + ("attn", "k_proj"), (k * d, e), *in_proj(k)),
            _Entry(hp + "self_attn.v_proj.weight", p + ("attn", "v_proj"), (k * d, e), *in_proj(k)),
            _Entry(hp + "self_attn.o_proj.weight", p + ("attn", "o_proj"), (e, h * d), *out_proj),
        ]
        if cfg.qkv_bias:
            attn += [_Entry(hp + f"self_attn.{n}_proj.bias", p + ("attn", f"{n}_bias"), (heads * d,), *bias(heads))
                     for n, heads in (("q", h), ("k", k), ("v", k))]
        if cfg.o_bias:
            attn.append(_Entry(hp + "self_attn.o_proj.bias", p + ("attn", "o_bias"), (e,), *same))
        if cfg.qk_norm:  # Qwen3: one [D] scale per layer for all heads
            attn += [_Entry(hp + f"self_attn.{n}_norm.weight", p + ("attn", f"{n}_norm", "scale"), (d,), *same)
                     for n in ("q", "k")]
        entries += [entry._replace(layer=i) for entry in [
            _Entry(hp + "input_layernorm.weight", p + ("input_norm", "scale"), (e,), *same),
            *attn,
            _Entry(hp + "post_attention_layernorm.weight", p + ("post_attention_norm", "scale"), (e,), *same),
            _Entry(hp + "mlp.gate_proj.weight", p + ("mlp", "gate_proj"), (m, e), *transpose),
            _Entry(hp + "mlp.up_proj.weight", p + ("mlp", "up_proj"), (m, e), *transpose),
            _Entry(hp + "mlp.down_proj.weight", p + ("mlp", "down_proj"), (e, m), *transpose),
        ]]
    entries.append(_Entry("model.norm.weight", ("final_norm", "scale"), (e,), *same))
    if not cfg.tie_word_embeddings:
        entries.append(_Entry("lm_head.weight", ("lm_head",), (v, e), *transpose))
    return entries


def _by_path(layout: list[_Entry]) -> dict[tuple, list[_Entry]]:
    """The layout grouped per parameter: one entry, or a stacked parameter's L entries in layer
    order."""
    groups: dict[tuple, list[_Entry]] = {}
    for entry in layout:
        groups.setdefault(entry.path, []).append(entry)
    return groups


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _adapter(state, path):
    """The LoRA adapter (its a / b variables) of the projection weight at `path`, or None."""
    *parent, name = path
    if not name.endswith("_proj"):
        return None
    tree = _get(state, tuple(parent))
    key = name[:-len("_proj")] + "_lora"
    return tree[key] if key in tree else None


def _set(tree, path, value):
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


# ----------------------------------------------------------------------------- loading

def read_hf_config(path: str) -> dict:
    """config.json of a model folder (local or gs://, read through etils.epath)."""
    config_path = _files.join(path, "config.json")
    if not _files.isdir(path):
        raise FileNotFoundError(f"model folder {path!r} does not exist.")
    if not _files.exists(config_path):
        raise FileNotFoundError(f"{config_path}: no config.json in the model folder.")
    try:
        hf = json.loads(_files.read_text(config_path))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{config_path}: not valid JSON ({e}).") from None
    if not isinstance(hf, dict):
        raise ConfigError(f"{config_path}: expected a JSON object.")
    return hf


def _weight_files(path: str) -> dict[str, str]:
    """Maps each tensor name to the file that holds it."""
    index_path = os.path.join(path, INDEX_FILE)
    if os.path.isfile(index_path):
        try:
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise WeightsError(f"{index_path}: malformed index ({e!r}).") from None
        return {name: os.path.join(path, os.path.basename(file)) for name, file in weight_map.items()}
    single = os.path.join(path, SINGLE_FILE)
    if os.path.isfile(single):
        return {name: single for name in SafetensorsFile(single).keys()}
    if any(os.path.exists(os.path.join(path, n)) for n in ("pytorch_model.bin", "model.bin")):
        raise WeightsError(f"{path}: only pickle (.bin) weights found; hbpo-jax reads safetensors only.")
    raise FileNotFoundError(f"{path}: neither {SINGLE_FILE} nor {INDEX_FILE} found.")


def _cast(array: np.ndarray, dtype) -> np.ndarray:
    return np.asarray(array).astype(np.dtype(dtype), copy=False)


def load_pretrained(path: str, *, dtype: str = "float32", compute_dtype: str | None = None,
                    mesh: jax.sharding.Mesh | None = None, rules=sharding_lib.DEFAULT_RULES,
                    with_tokenizer: bool = True, **config_overrides) -> Pretrained:
    """Loads a Hugging Face Qwen2, Qwen3 or Llama folder (config.json's model_type).

    dtype: parameter dtype ("float32" or "bfloat16"); compute_dtype defaults to it.
    mesh / rules: place each parameter on its shard while loading (see hbpo_jax.sharding).
    config_overrides: ModelConfig fields such as attention_impl="cudnn" or remat="full".
    Returns Pretrained(model, config, tokenizer); tokenizer is None without tokenizer files.
    """
    path = _files.local_dir(path)  # a gs:// folder is downloaded once into a local cache
    cfg = ModelConfig.from_hf(read_hf_config(path), source=os.path.join(path, "config.json"),
                              param_dtype=dtype, dtype=compute_dtype or dtype, **config_overrides)
    files = _weight_files(path)
    opened: dict[str, SafetensorsFile] = {}

    def tensor(entry: _Entry) -> np.ndarray:
        file = files.get(entry.hf_name)
        if file is None:
            raise WeightsError(f"{path}: tensor {entry.hf_name!r} is missing from the weights.")
        if file not in opened:
            if not os.path.isfile(file):
                raise WeightsError(f"{file}: listed in the index for {entry.hf_name!r} but not found.")
            opened[file] = SafetensorsFile(file)
        st = opened[file]
        if entry.hf_name not in st:
            raise WeightsError(f"{file}: tensor {entry.hf_name!r} is missing.")
        if st.shape(entry.hf_name) != entry.hf_shape:
            raise WeightsError(f"{file}: tensor {entry.hf_name!r} has shape {st.shape(entry.hf_name)}, "
                               f"but config.json implies {entry.hf_shape}.")
        return st[entry.hf_name]

    layout = _layout(cfg)
    expected = {entry.hf_name for entry in layout}
    unused = [n for n in files if n not in expected and not n.endswith(_IGNORED)
              and not (cfg.tie_word_embeddings and n == "lm_head.weight")]
    if unused:
        raise WeightsError(f"{path}: tensors not in a {cfg.model_type} model of this config, e.g. {unused[0]!r} "
                           f"({len(unused)} in all).")

    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Qwen2(cfg, rngs=nnx.Rngs(0))))
    shardings = (sharding_lib.state_shardings(abstract, mesh, rules) if mesh is not None else None)
    param_dtype = np.dtype(DTYPES[cfg.param_dtype])
    values: dict = {}
    for param_path, entries in _by_path(layout).items():
        converted = [entry.to_ours(tensor(entry)) for entry in entries]  # lazy memmap views for plain transposes
        stacked = entries[0].layer is not None
        if mesh is None:
            array = jax.device_put(np.stack([_cast(a, param_dtype) for a in converted]) if stacked
                                   else _cast(converted[0], param_dtype))
        else:
            sh = _get(shardings, param_path).get_value()
            if stacked:  # idx[0] picks layers, the rest the shard of each
                shape = (len(converted),) + converted[0].shape
                read = lambda idx, c=converted: np.stack([_cast(a[idx[1:]], param_dtype) for a in c[idx[0]]])  # noqa: E731
            else:
                shape = converted[0].shape
                read = lambda idx, a=converted[0]: _cast(a[idx], param_dtype)  # noqa: E731
            array = jax.make_array_from_callback(shape, sh, read)
        _set(values, param_path, array)
    nnx.replace_by_pure_dict(abstract, values)
    model = nnx.merge(graphdef, abstract)
    return Pretrained(model, cfg, load_tokenizer(path) if with_tokenizer else None)


_GENERIC_TOKENIZERS = (None, "PreTrainedTokenizerFast", "TokenizersBackend")


def load_tokenizer(path: str):
    """The transformers tokenizer saved in `path`, or None when there are no tokenizer files.

    A folder whose tokenizer_config.json names a generic class (PreTrainedTokenizerFast, or
    TokenizersBackend as transformers 5 writes it) or none is loaded from tokenizer.json as is:
    AutoTokenizer would follow config.json's model_type and, in transformers 5, build a
    Qwen2Tokenizer with its own pre-tokenizer, which changes the ids of a custom vocabulary.
    """
    path = _files.local_dir(path)  # transformers reads local folders only
    if not any(os.path.isfile(os.path.join(path, n)) for n in ("tokenizer.json", "tokenizer_config.json")):
        return None
    import transformers
    tokenizer_class = None
    config_path = os.path.join(path, "tokenizer_config.json")
    if os.path.isfile(config_path):
        try:
            with open(config_path) as f:
                tokenizer_class = json.load(f).get("tokenizer_class")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
            raise ConfigError(f"{config_path}: not a valid tokenizer config ({e}).") from None
    if tokenizer_class in _GENERIC_TOKENIZERS and os.path.isfile(os.path.join(path, "tokenizer.json")):
        return transformers.PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
    return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)


# ----------------------------------------------------------------------------- saving

def save_pretrained(model: Qwen2, path: str, *, tokenizer=None, dtype: str | None = None,
                    max_shard_bytes: int = 4 * 1024**3) -> None:
    """Writes a folder that transformers' class of the model's family (Qwen2ForCausalLM,
    Qwen3ForCausalLM, LlamaForCausalLM: config.json's architectures) loads, and vLLM.

    dtype: weights dtype on disk (default: the model's param dtype). Tensors are fetched from the
    devices one at a time; above max_shard_bytes the weights are split into numbered files with
    an index. In a multi-process run every process must call this; process 0 writes. `path` may
    be gs://: the folder is written locally, then uploaded (files.staged_dir).
    """
    if jax.process_index() != 0:
        _save_pretrained(model, path, tokenizer=tokenizer, dtype=dtype, max_shard_bytes=max_shard_bytes)
        return
    with _files.staged_dir(path) as local:
        _save_pretrained(model, local, tokenizer=tokenizer, dtype=dtype, max_shard_bytes=max_shard_bytes)


def _save_pretrained(model: Qwen2, path: str, *, tokenizer, dtype, max_shard_bytes) -> None:
    """save_pretrained into a local folder (process 0 writes; the others join the fetches)."""
    cfg = model.cfg
    dtype_name = dtype or cfg.param_dtype
    if dtype_name not in DTYPES:
        raise ConfigError(f"save_pretrained dtype must be one of {sorted(DTYPES)}, got {dtype_name!r}.")
    out_dtype = np.dtype(DTYPES[dtype_name])
    state = nnx.state(model, nnx.Param)
    layout = _layout(cfg)
    writer = jax.process_index() == 0
    if writer:
        os.makedirs(path, exist_ok=True)

    def host(array, layer):
        if layer is not None:
            array = array[layer]  # on device: only this layer crosses to the host
        if not array.is_fully_addressable:
            from jax.experimental import multihost_utils
            array = multihost_utils.process_allgather(array, tiled=True)
        return np.asarray(jax.device_get(array))

    def fetch(entry):
        array = host(_get(state, entry.path).get_value(), entry.layer)
        adapter = _adapter(state, entry.path)
        if adapter is not None:  # LoRA: W + scale A B, written in the base's dtype (models/lora.py)
            a, b = (host(adapter[n].get_value(), entry.layer) for n in ("a", "b"))
            array = _cast(lora.merged_weight(array, a, b, cfg.lora_scale), array.dtype)
        return _cast(entry.to_hf(array), out_dtype)

    nbytes = {e.hf_name: int(np.prod(e.hf_shape)) * out_dtype.itemsize for e in layout}
    shards, current, size = [], [], 0
    for entry in layout:
        if current and size + nbytes[entry.hf_name] > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(entry)
        size += nbytes[entry.hf_name]
    shards.append(current)

    names = ([SINGLE_FILE] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map = {}
    for name, entries in zip(names, shards):
        # Every process joins the (collective) fetches; only the writer touches the disk.
        if writer:
            save_file(os.path.join(path, name), {e.hf_name: (lambda e=e: fetch(e)) for e in entries},
                      shapes={e.hf_name: e.hf_shape for e in entries},
                      dtypes={e.hf_name: out_dtype for e in entries}, metadata={"format": "pt"})
        else:
            for e in entries:
                fetch(e)
        weight_map.update({e.hf_name: name for e in entries})
    if not writer:
        return
    if len(shards) > 1:
        with open(os.path.join(path, INDEX_FILE), "w") as f:
            json.dump({"metadata": {"total_size": sum(nbytes.values())}, "weight_map": weight_map}, f, indent=2)
    hf_config = cfg.to_hf()
    hf_config["torch_dtype"] = hf_config["dtype"] = dtype_name
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)

