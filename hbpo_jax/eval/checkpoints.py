"""Loading a policy to evaluate from any checkpoint a run leaves:

  * a Hugging Face folder (config.json + safetensors; e.g. a run's `export/`),
  * a params checkpoint (checkpoint.save_params: config.json + params/; e.g. `warmstart/`),
  * a training-checkpoint step folder (`<workdir>/checkpoints/<step>`: its params only), or
  * a run's workdir (its newest training checkpoint), or
  * a Hugging Face Hub id `org/name[@revision]` (models.hub: downloaded once into the HF cache).

The tokenizer is the checkpoint's own, else the first one found in the run's workdir, the
model_path, or the folders above the checkpoint (a tiny run keeps its tokenizer in
`<workdir>/tokenizer-<hash>/`).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Sequence

import jax

from hbpo_jax import checkpoint as ckpt_lib
from hbpo_jax import files, sharding
from hbpo_jax.models import load_pretrained
from hbpo_jax.models.config import ModelConfig
from hbpo_jax.models.hf import load_tokenizer, read_hf_config
from hbpo_jax.models.hub import resolve_model_path

log = logging.getLogger(__name__)


@dataclasses.dataclass
class LoadedPolicy:
    graphdef: Any
    params: Any  # nnx.State on the mesh
    tokenizer: Any
    cfg: ModelConfig
    kind: str  # "hf", "params", "train_step"
    path: str


def _is_hf(path: str) -> bool:
    return files.exists(files.join(path, "config.json")) and any(
        files.exists(files.join(path, n)) for n in ("model.safetensors", "model.safetensors.index.json"))


def _latest_step(checkpoints: str) -> str:
    steps = sorted((int(p.name) for p in files.path(checkpoints).iterdir() if p.name.isdigit()
                    and (p / "state").is_dir()), reverse=True)
    if not steps:
        raise FileNotFoundError(f"{checkpoints}: no training checkpoints (step folders with state/).")
    return files.join(checkpoints, str(steps[0]))


def find_tokenizer(folders: Sequence[str]):
    """The first tokenizer in `folders` (tokenizer.json there, else one `tokenizer-*/` below);
    None when there is none."""
    for folder in folders:
        if not folder or not files.isdir(folder):
            continue
        if files.exists(files.join(folder, "tokenizer.json")):
            return load_tokenizer(folder)
        found = sorted(files.path(folder).glob("tokenizer-*/tokenizer.json"), key=lambda p: p.stat().mtime)
        if found:
            if len(found) > 1:
                log.warning("%s holds %d tokenizers; using the newest, %s.", folder, len(found), found[-1])
            return load_tokenizer(os.fspath(found[-1].parent))
    return None


def _train_step_params(step_dir: str, cfg: ModelConfig, mesh, rules):
    """The params of a TrainCheckpointer step folder, restored alone onto the mesh."""
    import orbax.checkpoint as ocp
    from flax import nnx

    graphdef, state, targets = ckpt_lib.abstract_params(cfg, mesh, rules)
    # The TrainState stores each nnx variable as {"value": array}.
    item = {"params": jax.tree.map(lambda x: {"value": x}, targets)}
    restored = ocp.PyTreeCheckpointer().restore(
        files.path(step_dir) / "state", args=ocp.args.PyTreeRestore(
            item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True))
    params = jax.tree.map(lambda v: v["value"], restored["params"],
                          is_leaf=lambda v: isinstance(v, dict) and set(v) == {"value"})
    nnx.replace_by_pure_dict(state, params)
    return graphdef, state


def load_policy(checkpoint: str, model_spec, *, workdir: str | None = None, mesh=None,
                rules=sharding.DEFAULT_RULES) -> LoadedPolicy:
    """Loads a policy from any checkpoint kind of the module docstring; raises FileNotFoundError
    naming the path when it is none of them or no tokenizer is found."""
    from flax import nnx

    path = resolve_model_path(os.fspath(checkpoint))  # a hub id: its snapshot in the HF cache
    path = os.path.abspath(path) if files.is_local(path) else path
    if not files.isdir(path):
        raise FileNotFoundError(f"checkpoint {checkpoint!r} does not exist.")
    m, model_path = model_spec.fields, model_spec.path  # spec.ModelSpec
    dtype = m.get("param_dtype", "float32")
    if files.isdir(files.join(path, "checkpoints")):  # a run's workdir
        workdir = workdir or path
        path = _latest_step(files.join(path, "checkpoints"))
    parents = [os.fspath(files.path(path).parent), os.fspath(files.path(path).parent.parent)]
    if files.isdir(files.join(path, "state")):
        run_dir = workdir or parents[1]
        warmstart = files.join(run_dir, "warmstart")
        if model_path and not files.exists(files.join(warmstart, "config.json")):
            model_path = resolve_model_path(model_path)
        source = next((d for d in (warmstart, model_path)
                       if d and files.exists(files.join(d, "config.json"))), None)
        if source is None:
            raise FileNotFoundError(f"{path}: a training checkpoint, but no model config.json in "
                                    f"{run_dir}/warmstart or model_path; pass --workdir.")
        cfg = ModelConfig.from_hf(read_hf_config(source), source=source, param_dtype=dtype,
                                  dtype=m.get("dtype") or dtype)
        graphdef, params = _train_step_params(path, cfg, mesh, rules)
        kind = "train_step"
    elif files.isdir(files.join(path, "params")):
        model = ckpt_lib.restore_params(path, mesh=mesh, rules=rules, dtype=dtype)
        cfg, kind = model.cfg, "params"
        graphdef, params = nnx.split(model)
    elif _is_hf(path):
        model, cfg, _ = load_pretrained(path, dtype=dtype, compute_dtype=m.get("dtype"), mesh=mesh,
                                        rules=rules, with_tokenizer=False)
        graphdef, params = nnx.split(model)
        kind = "hf"
    else:
        raise FileNotFoundError(f"{path}: not a Hugging Face folder, a params checkpoint (params/), a "
                                "training checkpoint (state/) or a run workdir (checkpoints/).")
    tokenizer = find_tokenizer([path, workdir, model_path, *parents])
    if tokenizer is None:
        raise FileNotFoundError(f"{path}: no tokenizer in the checkpoint, --workdir, model_path or the "
                                "folders above it.")
    return LoadedPolicy(graphdef, params, tokenizer, cfg, kind, path)
