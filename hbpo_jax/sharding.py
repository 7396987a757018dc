"""The device mesh and the logical-axis rule table.

Parameters carry logical axis names (`embed`, `vocab`, `heads`, ...); a rule table, set in the
config, maps each name to zero or more mesh axes (`data`, `fsdp`, `tensor`). A mesh axis that does
not divide a dimension is dropped for that dimension (e.g. 2 KV heads over 4-way tensor
parallelism stay replicated), so any model runs on any mesh.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axes. Batch over data and fsdp (FSDP shards the batch too), weights over
# fsdp on their hidden dimension and over tensor on heads / MLP / vocabulary (Megatron-style).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("layers", None),  # the stacked decoder layers' leading axis: every device holds all L of its shard
    ("cache_seq", None),
    ("seq", None),
)

Rules = Sequence[tuple[str, Any]]


class MeshError(ValueError):
    """The mesh in the config does not fit the devices; the message names the key."""


def resolve_mesh_shape(shape: Sequence[int], num_devices: int, key: str = "mesh.shape", *,
                       slices: int = 1, axis_names: Sequence[str] = MESH_AXES) -> tuple[int, ...]:
    """The global mesh shape: `shape` with one -1 replaced by what is left of the devices.

    Over several slices (multislice: chips joined by the data-centre network, DCN) `shape` is the
    mesh of one slice, laid on num_devices // slices chips, and its `data` axis is repeated across
    the slices: only data parallelism, whose one gradient all-reduce per step tolerates DCN's
    bandwidth, crosses a slice boundary; FSDP and tensor collectives stay on the slice's ICI.
    """
    shape = [int(s) for s in shape]
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise MeshError(f"{key} must hold positive sizes and at most one -1, got {tuple(shape)}.")
    if slices > 1:
        if "data" not in axis_names or num_devices % slices:
            raise MeshError(f"{key}: {num_devices} devices in {slices} slices need a `data` mesh axis and "
                            f"an equal number of devices per slice.")
        one = resolve_mesh_shape(shape, num_devices // slices, f"{key} (one of {slices} slices)")
        data = list(axis_names).index("data")
        return tuple(n * slices if i == data else n for i, n in enumerate(one))
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise MeshError(f"{key}={tuple(shape)} cannot be completed to {num_devices} devices.")
        shape[shape.index(-1)] = num_devices // known
    if math.prod(shape) != num_devices:
        raise MeshError(f"{key}={tuple(shape)} needs {math.prod(shape)} devices, but {num_devices} are present.")
    return tuple(shape)


def num_slices(devices: Sequence[jax.Device]) -> int:
    """How many TPU slices `devices` span (1 on CPU, GPU and a single slice)."""
    return len({getattr(d, "slice_index", 0) for d in devices})


def make_mesh(shape: Sequence[int] = (1, -1, 1), axis_names: Sequence[str] = MESH_AXES,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over `devices` (default: all, across processes) with one -1 meaning "the rest".

    Devices of several TPU slices get a hybrid mesh: `shape` per slice, `data` across slices
    (see resolve_mesh_shape)."""
    devices = list(jax.devices() if devices is None else devices)
    if len(shape) != len(axis_names):
        raise MeshError(f"mesh.shape {tuple(shape)} and mesh.axes {tuple(axis_names)} differ in length.")
    slices = num_slices(devices)
    full = resolve_mesh_shape(shape, len(devices), slices=slices, axis_names=axis_names)
    from jax.experimental import mesh_utils
    if slices > 1:
        data = list(axis_names).index("data")
        per_slice = tuple(n // slices if i == data else n for i, n in enumerate(full))
        across = tuple(slices if i == data else 1 for i in range(len(full)))
        array = mesh_utils.create_hybrid_device_mesh(per_slice, across, devices, allow_split_physical_axes=True)
    else:
        try:
            array = mesh_utils.create_device_mesh(full, devices=devices, allow_split_physical_axes=True)
        except Exception:  # non-TPU topologies mesh_utils cannot map: plain order is fine there
            array = np.asarray(devices).reshape(full)
    # Auto axes: classic GSPMD propagation (jax.make_mesh would default to Explicit in new jax).
    return Mesh(array, tuple(axis_names), axis_types=(jax.sharding.AxisType.Auto,) * len(full))


def mesh_from_config(mesh_cfg) -> Mesh:
    """mesh_cfg: a ConfigDict (or mapping) with `shape` and `axes`."""
    return make_mesh(tuple(mesh_cfg["shape"]), tuple(mesh_cfg["axes"]))


def rules_from_config(mesh_cfg) -> Rules:
    """The config's `mesh.rules` (or DEFAULT_RULES), normalised (see normalize_rules)."""
    return normalize_rules(mesh_cfg.get("rules") if hasattr(mesh_cfg, "get") else None)


def normalize_rules(rules: Rules | None = None) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """A rule table with every entry as (name, tuple of mesh axes): hashable, so it can key a
    compilation cache. None or empty: DEFAULT_RULES."""
    return tuple((str(name), as_mesh_axes(axes)) for name, axes in (rules or DEFAULT_RULES))


def as_mesh_axes(axes) -> tuple[str, ...]:
    """One rule's mesh axes as a tuple: None -> (), "fsdp" -> ("fsdp",), ("data", "fsdp") as is."""
    if axes is None:
        return ()
    if isinstance(axes, str):
        return (axes,)
    return tuple(axes)


def logical_to_spec(logical_axes: Sequence[str | None], rules: Rules, mesh: Mesh | None = None,
                    shape: Sequence[int] | None = None) -> P:
    """The PartitionSpec for one array.

    Mesh axes absent from `mesh` or of size 1, already used by an earlier dimension, or (given
    `shape`) not dividing the dimension are left out, so the result is always a valid sharding.
    """
    table = {name: as_mesh_axes(axes) for name, axes in rules}
    used: set[str] = set()
    spec = []
    for dim, name in enumerate(logical_axes):
        chosen = []
        size = 1
        for axis in table.get(name, ()) if name is not None else ():
            if axis in used or (mesh is not None and mesh.shape.get(axis, 1) == 1):
                continue  # absent or size-1 mesh axes add nothing to a spec
            axis_size = mesh.shape[axis] if mesh is not None else 1
            if shape is not None and shape[dim] % (size * axis_size):
                continue
            chosen.append(axis)
            size *= axis_size
        used.update(chosen)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    return P(*spec)


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def state_shardings(state: nnx.State, mesh: Mesh, rules: Rules) -> nnx.State:
    """Same tree as `state` (NNX Variables), each value replaced by its NamedSharding."""
    def one(var):
        axes = var.get_metadata().get("logical_axes")
        shape = var.get_value().shape
        if axes is None or len(axes) != len(shape):
            raise ValueError(f"parameter of shape {shape} has logical axes {axes!r}")
        return var.replace(NamedSharding(mesh, logical_to_spec(axes, rules, mesh, shape)))
    return jax.tree.map(one, state, is_leaf=_is_variable)


def state_specs(state: nnx.State, rules: Rules, mesh: Mesh | None = None) -> dict:
    """Flat {path: PartitionSpec} for inspection and tests."""
    out = {}
    for path, var in jax.tree_util.tree_leaves_with_path(state, is_leaf=_is_variable):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        out[name] = logical_to_spec(var.get_metadata()["logical_axes"], rules, mesh, var.get_value().shape)
    return out


def decode_rules(rules: Rules) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """The rule table for weights that decode: the mesh axes that split the rows (the `batch`
    rule's: data, fsdp) are taken off every other logical axis, so each device holds whole weights
    (split only over `tensor`) and decodes its own rows without an all-gather per token."""
    table = normalize_rules(rules)
    batch_axes = set(dict(table).get("batch", ()))
    return tuple((name, axes if name == "batch" else tuple(a for a in axes if a not in batch_axes))
                 for name, axes in table)


def decode_weights(state: nnx.State, mesh: Mesh | None, rules: Rules, dtype) -> nnx.State:
    """The policy's parameters as the rollout reads them, made once per rollout: floating arrays
    cast to `dtype` (the compute dtype; bfloat16 halves what every decode step reads) and laid out
    by decode_rules. FSDP-sharded weights would otherwise be all-gathered at every decoded token.
    Works on arrays and on ShapeDtypeStructs (planning). Without a mesh: the cast only."""
    to = lambda x: jnp.dtype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype  # noqa: E731
    cast = lambda x: x.astype(to(x))  # noqa: E731
    if mesh is None:
        return jax.tree.map(cast, state)
    shardings = state_shardings(state, mesh, decode_rules(rules))
    if all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(state)):
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, to(x), sharding=s), state, shardings)
    return jax.jit(lambda st: jax.tree.map(cast, st), out_shardings=shardings)(state)


def create_sharded(make_module, mesh: Mesh | None, rules: Rules = DEFAULT_RULES):
    """Builds `make_module()` (an NNX module factory) with every parameter created in place on
    its shard: the init runs under jit with the rule table's output shardings, so no device or
    host ever holds the full unsharded model. Without a mesh it is a plain call."""
    if mesh is None:
        return make_module()
    graphdef, abstract = nnx.split(nnx.eval_shape(make_module))
    shardings = state_shardings(abstract, mesh, rules)
    state = jax.jit(lambda: nnx.split(make_module())[1], out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def batch_sharding(mesh: Mesh, rules: Rules, ndim: int, shape: Sequence[int] | None = None) -> NamedSharding:
    """Sharding for a batch-major array [batch, ...]: the batch over the `batch` rule's axes."""
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), rules, mesh, shape))



# ----------------------------------------------------------------------------- multi-process I/O
# Every process holds the same host arrays (the same prompts, the same gathered rollouts), so a
# host value can be placed on a global mesh by each process writing its own shards.

def put(x, sharding: jax.sharding.Sharding):
    """jax.device_put(x, sharding), also when `sharding` spans other processes' devices and x is a
    process-local jax.Array (e.g. a PRNG key): it goes through the host. x must be equal on every
    process (numpy, Python numbers or local jax.Arrays)."""
    if (sharding.is_fully_addressable or not isinstance(x, jax.Array)
            or not x.is_fully_addressable):
        return jax.device_put(x, sharding)
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        data = jax.device_put(np.asarray(jax.random.key_data(x)), sharding)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    return jax.device_put(np.asarray(x), sharding)


def to_host(x) -> np.ndarray:
    """The whole value of a (possibly multi-process) jax.Array as numpy, on every process.

    Fully addressable or fully replicated arrays are read locally; others are all-gathered over
    processes (a collective: every process must call it, in the same order)."""
    if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
