"""Orbax checkpoints of a policy: its parameters plus the config.json that describes them.

Layout of a params checkpoint folder:
    <dir>/config.json   the model's Hugging Face config (ModelConfig.to_hf)
    <dir>/params/       an Orbax StandardCheckpointer tree of the parameters
Restoring reads each parameter straight onto its shard of the given mesh.
"""
from __future__ import annotations

import json
import os
import shutil

import jax
import orbax.checkpoint as ocp
from flax import nnx

from hbpo_jax import sharding as sharding_lib
from hbpo_jax.models.config import ModelConfig
from hbpo_jax.models.hf import read_hf_config
from hbpo_jax.models.qwen2 import Qwen2


def abstract_params(cfg: ModelConfig, mesh=None, rules=sharding_lib.DEFAULT_RULES):
    """(graphdef, abstract State, pure-dict of ShapeDtypeStruct with shardings) of a Qwen2."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Qwen2(cfg, rngs=nnx.Rngs(0))))
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, nnx.to_pure_dict(state))
    else:
        shardings = nnx.to_pure_dict(sharding_lib.state_shardings(state, mesh, rules))
    targets = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                           nnx.to_pure_dict(state), shardings)
    return graphdef, state, targets


def save_params(directory: str, model: Qwen2) -> None:
    """Writes model's parameters and config.json under `directory` (every process must call)."""
    directory = os.path.abspath(directory)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(directory, "params"), params, force=True)
    checkpointer.wait_until_finished()
    if jax.process_index() == 0:
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump(model.cfg.to_hf(), f, indent=2)


def restore_params(directory: str, *, mesh=None, rules=sharding_lib.DEFAULT_RULES,
                   dtype: str | None = None, **config_overrides) -> Qwen2:
    """A Qwen2 with the parameters saved by save_params, placed on `mesh` when given.

    dtype: parameter dtype to restore into (default: as saved)."""
    directory = os.path.abspath(directory)
    hf = read_hf_config(directory)
    overrides = dict(config_overrides)
    if dtype:
        overrides.setdefault("param_dtype", dtype)
        overrides.setdefault("dtype", dtype)
    elif hf.get("dtype") or hf.get("torch_dtype"):
        overrides.setdefault("param_dtype", hf.get("dtype") or hf.get("torch_dtype"))
    cfg = ModelConfig.from_hf(hf, source=os.path.join(directory, "config.json"), **overrides)
    params_dir = os.path.join(directory, "params")
    if not os.path.isdir(params_dir):
        raise FileNotFoundError(f"{params_dir}: no parameters in the checkpoint folder.")
    graphdef, state, targets = abstract_params(cfg, mesh, rules)
    restored = ocp.StandardCheckpointer().restore(params_dir, targets)
    nnx.replace_by_pure_dict(state, restored)
    return nnx.merge(graphdef, state)


def hf_to_orbax(src: str, dst: str, *, dtype: str = "float32", mesh=None) -> ModelConfig:
    """Converts a Hugging Face folder to a params checkpoint (tokenizer files travel along)."""
    from hbpo_jax.models.hf import load_pretrained
    model, cfg, tokenizer = load_pretrained(src, dtype=dtype, mesh=mesh)
    save_params(dst, model)
    if tokenizer is not None and jax.process_index() == 0:
        tokenizer.save_pretrained(dst)
    return cfg


def orbax_to_hf(src: str, dst: str, *, dtype: str | None = None, mesh=None) -> ModelConfig:
    """Converts a params checkpoint (save_params) to a folder transformers and vLLM load."""
    from hbpo_jax.models.hf import load_tokenizer, save_pretrained
    model = restore_params(src, mesh=mesh)
    save_pretrained(model, dst, dtype=dtype, tokenizer=load_tokenizer(src))
    return model.cfg


# ----------------------------------------------------------------------------- training runs

class TrainCheckpointer:
    """Checkpoints of a training run: the TrainState (params, optimizer state, counters) and a
    JSON `meta` dict (data-iterator state, RNG key, anything small), saved asynchronously every
    few steps, the last `keep` kept. Restoring falls back to older checkpoints when the newest
    is damaged (a truncated or deleted file), with a warning, instead of crashing or restarting.
    """

    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                                 create=True))

    def save(self, step: int, state, meta: dict) -> None:
        """Starts saving (returns before the write ends when async); every process must call."""
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def restore_latest(self, abstract_state):
        """(step, state, meta) of the newest checkpoint that restores, or None when there is none.

        abstract_state: the TrainState tree of jax.ShapeDtypeStruct with shardings to restore into.
        A checkpoint that fails to restore is renamed `damaged-<step>` (kept for inspection, out of
        the way of the step's next save) and the one before it is tried.
        """
        import logging
        log = logging.getLogger(__name__)
        self._manager.reload()
        damaged = []
        result = None
        for step in reversed(self.steps()):
            try:
                restored = self._manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
                result = step, restored.state, dict(restored.meta)
                break
            except Exception as e:  # a damaged checkpoint: try the one before it
                log.warning("checkpoint %s/%d cannot be restored (%s: %s); trying an older one.",
                            self.directory, step, type(e).__name__, str(e)[:300])
                damaged.append(step)
        if damaged:
            if jax.process_index() == 0:
                for step in damaged:
                    src = os.path.join(self.directory, str(step))
                    dst = os.path.join(self.directory, f"damaged-{step}")
                    shutil.rmtree(dst, ignore_errors=True)
                    os.replace(src, dst)
            if jax.process_count() > 1:
                from jax.experimental import multihost_utils
                multihost_utils.sync_global_devices("hbpo_jax.checkpoint.damaged")
            self._manager.reload()
        return result

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
