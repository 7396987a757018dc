"""Orbax checkpoints of a policy: its parameters plus the config.json that describes them.

Layout of a params checkpoint folder:
    <dir>/config.json   the model's Hugging Face config (ModelConfig.to_hf)
    <dir>/params/       an Orbax StandardCheckpointer tree of the parameters
Restoring reads each parameter straight onto its shard of the given mesh.

Every Orbax write here commits with a `commit_success.txt` file written last into the checkpoint
folder (Orbax's COMMIT_FILE atomicity), never by renaming a temporary folder: GCS has no
directory rename and gcsfuse refuses it on ordinary buckets. Folders are `gs://` or local paths
(etils.epath); Orbax's own log lines below WARNING are kept off the console (`quiet_orbax_logs`).
"""
from __future__ import annotations

import logging
import os

import jax
import orbax.checkpoint as ocp
from flax import nnx

from hbpo_jax import files
from hbpo_jax import sharding as sharding_lib
from hbpo_jax.errors import WorkdirError
from hbpo_jax.models.config import ModelConfig
from hbpo_jax.models.hf import read_hf_config
from hbpo_jax.models.qwen2 import Qwen2

log = logging.getLogger(__name__)

# Write in place and commit with commit_success.txt; still read checkpoints an older version of
# this package committed by renaming (they have no commit file).
ATOMICITY = ocp.options.AtomicityOptions(mode=ocp.options.AtomicityMode.COMMIT_FILE,
                                         allow_legacy_atomic_rename=True)


# A full disk, in Orbax's (tensorstore's) words.
DISK_FULL = ("RESOURCE_EXHAUSTED", "No space left on device", "Disk quota exceeded")


class _BelowWarningFromOrbax(logging.Filter):
    """Drops Orbax's INFO/DEBUG records (a real run printed ~20 lines per checkpoint save), and its
    error records of a full disk: each of its threads logged the same traceback (a thousand lines
    for one save), and the training loop reports it in one sentence (HBPO_VERBOSE=1 keeps them)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if f"{os.sep}orbax{os.sep}" not in record.pathname:
            return True
        if record.levelno < logging.WARNING:
            return False
        if os.environ.get("HBPO_VERBOSE", "") in ("", "0") and record.exc_info:
            error = record.exc_info[1]
            return not any(marker in f"{record.getMessage()} {error}" for marker in DISK_FULL)
        return True


def quiet_orbax_logs() -> None:
    """Keeps Orbax's INFO logs (absl logging, one logger "absl") off the console; its warnings and
    errors still show. Idempotent."""
    absl_logger = logging.getLogger("absl")
    if not any(isinstance(f, _BelowWarningFromOrbax) for f in absl_logger.filters):
        absl_logger.addFilter(_BelowWarningFromOrbax())


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
    directory = _absolute(directory)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    checkpointer = ocp.StandardCheckpointer(atomicity_options=ATOMICITY)
    checkpointer.save(_orbax_path(directory) / "params", params, force=True)
    checkpointer.wait_until_finished()
    if jax.process_index() == 0:
        files.write_json(files.join(directory, "config.json"), model.cfg.to_hf())


def restore_params(directory: str, *, mesh=None, rules=sharding_lib.DEFAULT_RULES,
                   dtype: str | None = None, **config_overrides) -> Qwen2:
    """A Qwen2 with the parameters saved by save_params, placed on `mesh` when given.

    dtype: parameter dtype to restore into (default: as saved)."""
    directory = _absolute(directory)
    hf = read_hf_config(directory)
    overrides = dict(config_overrides)
    if dtype:
        overrides.setdefault("param_dtype", dtype)
        overrides.setdefault("dtype", dtype)
    elif hf.get("dtype") or hf.get("torch_dtype"):
        overrides.setdefault("param_dtype", hf.get("dtype") or hf.get("torch_dtype"))
    cfg = ModelConfig.from_hf(hf, source=files.join(directory, "config.json"), **overrides)
    params_dir = files.join(directory, "params")
    if not files.isdir(params_dir):
        raise FileNotFoundError(f"{params_dir}: no parameters in the checkpoint folder.")
    graphdef, state, targets = abstract_params(cfg, mesh, rules)
    restored = ocp.StandardCheckpointer(atomicity_options=ATOMICITY).restore(_orbax_path(params_dir), targets)
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

    directory: a local path or "gs://bucket/...". Saves commit with a commit file (ATOMICITY), so
    nothing here renames a folder.
    """

    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
        self.directory = _absolute(directory)
        self._manager = ocp.CheckpointManager(
            _orbax_path(self.directory),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                                 create=True, atomicity_options=ATOMICITY))

    def save(self, step: int, state, meta: dict) -> None:
        """Starts saving (returns before the write ends when async); every process must call."""
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def restore_latest(self, abstract_state):
        """(step, state, meta) of the newest checkpoint that restores, or None when there is none.

        abstract_state: the TrainState tree of jax.ShapeDtypeStruct with shardings to restore into.
        A checkpoint that fails to restore is set aside (`set_aside`: copied to `damaged-<step>`
        for inspection, then deleted, out of the way of the step's next save) and the one before
        it is tried. A checkpoint whose arrays are readable but of other shapes or another tree
        than `abstract_state` is not damaged: a WorkdirError says so and nothing is moved.
        """
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
                if is_mismatch(e):
                    first = str(e).strip().splitlines()[0][:300]
                    raise WorkdirError(
                        f"checkpoint {self.directory}/{step} holds a state of other shapes than this run's "
                        f"model ({first}); resume with the model it was trained with, or use a new "
                        "--workdir.") from None
                log.warning("checkpoint %s/%d cannot be restored (%s: %s); trying an older one.",
                            self.directory, step, type(e).__name__, str(e)[:300])
                damaged.append(step)
        if damaged:
            if jax.process_index() == 0:
                for step in damaged:
                    set_aside(self.directory, step)
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


# Orbax's words for a readable checkpoint that does not fit the requested tree (not damage).
_MISMATCH = ("not compatible with the stored shape", "tree structures do not match")


def is_mismatch(error: BaseException) -> bool:
    """True when a restore failed because the checkpoint is of another model, not damaged."""
    return any(marker in str(error) for marker in _MISMATCH)


def set_aside(directory: str, step: int) -> str:
    """Moves checkpoint `<directory>/<step>` to `<directory>/damaged-<step>` by copying its files
    and deleting the original (no folder rename: see the module docstring). Orbax lists only
    integer folder names, so the copy is never restored or deleted by max_to_keep. A previous
    `damaged-<step>` is replaced. Returns the copy's path."""
    src, dst = files.join(directory, str(step)), files.join(directory, f"damaged-{step}")
    files.rmtree(dst)
    try:
        files.copytree(src, dst)
    except OSError as e:  # keeping a copy is a courtesy; clearing the step is what matters
        log.warning("could not keep a copy of damaged checkpoint %s (%s); deleting it.", src, e)
    files.rmtree(src)
    return dst


def _orbax_path(directory):
    """The path Orbax is given for a folder: an epath.Path (tests replace this function to send
    a fake gs:// folder's checkpoints to the local folder standing in for it; Orbax's arrays go
    through tensorstore's own GCS driver, which epath's test mocks cannot reach)."""
    return files.path(directory)


def _absolute(directory) -> str:
    """A local path made absolute (Orbax wants one); a remote path as it is."""
    return os.path.abspath(directory) if files.is_local(directory) else os.fspath(directory)
