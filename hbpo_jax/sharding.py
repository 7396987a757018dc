"""The device mesh and the logical-axis rule table.

Parameters carry logical axis names (`embed`, `vocab`, `heads`, ...); a rule table, set in the
config, maps each name to zero or more mesh axes (`data`, `fsdp`, `tensor`). A mesh axis that does
not divide a dimension is dropped for that dimension (e.g. 2 KV heads over 4-way tensor
parallelism stay replicated), so any model runs on any mesh.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import os
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
# Weights are stored that way; for their matmuls each layer's weights are gathered whole over
# fsdp (gathered_rules, gather_weights), so no matmul is split on its contracting dimension.
# Activations (the `act_*` names, with `batch`) follow MaxText's decoder: rows over data and
# fsdp, hidden / heads / MLP features over tensor.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("act_seq", None),
    ("act_embed", "tensor"),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
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

# XLA TPU flags of the update's layout, set here and only here (libtpu reads LIBTPU_INIT_ARGS when
# it loads: importing hbpo_jax before jax first touches a TPU, or a TPU topology, is enough).
# - No windowed einsum for reduce-scatter: with each layer's weights gathered whole, a weight
#   gradient dW = x^T dy whose result is reduce-scattered would otherwise become a 16-step
#   collective-permute ring computing 1/16 of dW per step, re-reading the whole dy from HBM at
#   every step (the 2-layer cut on v5p:2x2x4: 7 such loops per layer pass); without it each dW is
#   one full-K matmul whose output is written once, then reduced.
TPU_FLAGS = ("--xla_tpu_enable_windowed_einsum_for_reduce_scatter=false",)


def _set_tpu_flags() -> None:
    args = os.environ.get("LIBTPU_INIT_ARGS", "")
    missing = [f for f in TPU_FLAGS if f.split("=")[0] not in args]
    if missing:
        os.environ["LIBTPU_INIT_ARGS"] = " ".join([args, *missing]).strip()


_set_tpu_flags()


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


def decode_mesh_shape(shape: Sequence[int], axis_names: Sequence[str], k: int, slices: int = 1) -> tuple[int, ...]:
    """The decode mesh's shape for tensor-parallel decode over groups of k chips: the same chips
    with `tensor` = k and the rest of them on `data`. MeshError when k does not divide a slice's
    chips or the mesh already splits weights over `tensor` (or lacks the axes)."""
    shape, names = tuple(int(x) for x in shape), tuple(axis_names)
    if not {"data", "tensor"} <= set(names):
        raise MeshError(f"tensor-parallel decode needs `data` and `tensor` mesh axes, the mesh has {names}.")
    n = math.prod(shape)
    if shape[names.index("tensor")] != 1:
        raise MeshError(f"the mesh {dict(zip(names, shape))} already splits the weights over `tensor`.")
    if k < 1 or (n // slices) % k:
        raise MeshError(f"groups of {k} chips do not divide the {n // slices} chips of a slice.")
    return tuple(n // k if a == "data" else k if a == "tensor" else 1 for a in names)


def decode_mesh(mesh: Mesh | None, k: int) -> Mesh | None:
    """The mesh a rollout decodes on: `mesh` itself for k = 1; for k > 1 the same chips regrouped
    (decode_mesh_shape: data = chips / k, tensor = k), so that decode_weights splits each decode
    weight over a group's k chips by heads, MLP columns and vocabulary (the rule table's `tensor`
    axes) and each group decodes its share of the rows. Consecutive chips of the mesh's device
    order form a group: neighbours on the ICI (create_device_mesh's order), within one slice. The
    device order is kept, so arrays move between the two meshes by resharding alone."""
    if mesh is None or k == 1:
        return mesh
    shape = decode_mesh_shape(tuple(mesh.shape.values()), mesh.axis_names, k, num_slices(mesh.devices.flat))
    return Mesh(mesh.devices.reshape(shape), mesh.axis_names, axis_types=(jax.sharding.AxisType.Auto,) * len(shape))


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


# ----------------------------------------------------------------------------- inside the model
# The update and the log-prob pass trace the model under `logical_rules(rules)`; the model then
# pins its activations (`constrain`) and gathers each layer's weights (`gather_weights`) on the
# mesh its arrays carry in their types (under jit, sharding-in-types: no mesh is threaded through
# the calls). Outside such a context (the sampler, CPU tests without a mesh) both are identities.

_RULES: contextvars.ContextVar = contextvars.ContextVar("hbpo_logical_rules", default=None)


@contextlib.contextmanager
def logical_rules(rules: Rules | None):
    """Within it, `constrain` and `gather_weights` apply `rules` (None: DEFAULT_RULES). Entered
    at trace time inside a jitted function whose static arguments include the rules, so a
    compiled program never depends on a context it was not keyed on."""
    token = _RULES.set(normalize_rules(rules))
    try:
        yield
    finally:
        _RULES.reset(token)


def active_rules() -> tuple | None:
    """The rule table of the enclosing `logical_rules`, or None."""
    return _RULES.get()


def array_mesh(x):
    """The (abstract) mesh x is laid on: jax's mesh context, else the mesh in x's type (under jit);
    None without one, or for a mesh of one device."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        mesh = getattr(getattr(jax.typeof(x), "sharding", None), "mesh", None)
    if mesh is None or getattr(mesh, "empty", True) or math.prod(mesh.shape.values()) == 1:
        return None
    if any(kind == jax.sharding.AxisType.Manual for kind in mesh.axis_types):
        return None  # inside a shard_map: shapes are local
    return mesh


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """x pinned to the layout `logical_axes` names (one name per dimension) under the active rule
    table; names the table lacks leave their dimension to XLA. Identity outside `logical_rules`."""
    rules, mesh = active_rules(), array_mesh(x)
    if rules is None or mesh is None:
        return x
    table = dict(rules)
    spec = list(logical_to_spec(logical_axes, rules, mesh, x.shape))
    spec = [P.UNCONSTRAINED if name is not None and name not in table else s
            for name, s in zip(logical_axes, spec)]
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(*spec)))


def gathered_rules(rules: Rules) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """The layout a weight takes for its matmuls: the stored rules with the batch axes (data,
    fsdp) taken off (decode_rules): whole over fsdp, still split over tensor."""
    return decode_rules(rules)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _gather(w, whole, stored):
    # Pinned to its stored layout first: otherwise the gathered layout propagates backwards
    # through the layer scan's slice, and XLA gathers every layer's weights before the loop.
    return jax.lax.with_sharding_constraint(jax.lax.with_sharding_constraint(w, stored), whole)


def _gather_fwd(w, whole, stored):
    return _gather(w, whole, stored), None


def _gather_bwd(whole, stored, _, g):
    # The cotangent of a gathered weight holds each chip's partial sum over its rows: pinned
    # straight to the stored layout it is a reduce-scatter by meaning (the transpose of a plain
    # constraint would ask for an all-reduce to the gathered layout, then a slice). What XLA's
    # TPU pipeline emits is still an all-reduce and a slice: its reduce-scatter decomposer
    # rewrites every reduce-scatter so, even an explicit psum_scatter (docs/tpu_plan.md).
    return (jax.lax.with_sharding_constraint(g, stored),)


_gather.defvjp(_gather_fwd, _gather_bwd)


def gather_weight(w: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """One weight as its matmuls read it: all-gathered over the batch axes (FSDP) from its stored
    layout, its gradient summed back into the stored layout (_gather_bwd). logical_axes: one name
    per dimension of w (a leading "layers" of a stacked parameter is dropped when w is one layer's
    slice). Identity outside `logical_rules` or when nothing is gathered."""
    rules, mesh = active_rules(), array_mesh(w)
    if rules is None or mesh is None:
        return w
    axes = tuple(logical_axes)[-w.ndim:] if w.ndim else ()
    stored = logical_to_spec(axes, rules, mesh, w.shape)
    whole = logical_to_spec(axes, gathered_rules(rules), mesh, w.shape)
    if stored == whole:
        return w
    return _gather(w, NamedSharding(mesh, whole), NamedSharding(mesh, stored))


def gather_weights(state, dtype=None):
    """gather_weight on every parameter of an NNX state (one layer's, in the layer scan), each
    first cast to `dtype` (the compute dtype its matmuls cast it to anyway) when given."""
    def one(var):
        w = var.get_value()
        if dtype is not None and jnp.issubdtype(w.dtype, jnp.floating):
            w = w.astype(dtype)
        return var.replace(gather_weight(w, var.get_metadata().get("logical_axes") or ()))
    return jax.tree.map(one, state, is_leaf=_is_variable)


def param_shardings(params: nnx.State, rules: Rules | None = None) -> nnx.State | None:
    """Under jit: the stored layout of each parameter of `params` (NamedShardings on the mesh its
    arrays carry, per `rules`, default DEFAULT_RULES), for pinning values that must keep it (the
    gradient accumulator, the new parameters). With Auto mesh axes the arrays' types carry the
    mesh but not the layout, so it comes from the logical axes. None without a mesh."""
    leaves = jax.tree.leaves(params)
    mesh = array_mesh(leaves[0]) if leaves else None
    if mesh is None:
        return None
    return state_shardings(params, mesh, normalize_rules(rules))
