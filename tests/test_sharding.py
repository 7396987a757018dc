"""Parameters are created (and loaded) on their shards; the sharded forward equals the unsharded."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from hbpo_jax import sharding
from hbpo_jax.models import ModelConfig, create_model, load_pretrained
from tests.helpers import hf_model

# Head and MLP counts divisible by the 4 tensor ways; kv heads (2) are not: they stay replicated.
CFG = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=8,
                  num_kv_heads=2, head_dim=8)

EXPECTED = {  # the DEFAULT_RULES table applied by hand, on a fsdp=2 x tensor=4 mesh
    # (decoder parameters are stacked [L, ...]; the layer axis is never sharded)
    "embed": P("tensor", "fsdp"),
    "layers/attn/q_proj": P(None, "fsdp", "tensor", None),
    "layers/attn/q_bias": P(None, "tensor", None),
    "layers/attn/k_proj": P(None, "fsdp", None, None),
    "layers/attn/k_bias": P(None, None, None),
    "layers/attn/o_proj": P(None, "tensor", None, "fsdp"),
    "layers/mlp/gate_proj": P(None, "fsdp", "tensor"),
    "layers/mlp/down_proj": P(None, "tensor", "fsdp"),
    "layers/input_norm/scale": P(None, None),
    "final_norm/scale": P(None),
    "lm_head": P("fsdp", "tensor"),
}


@pytest.fixture(scope="module")
def mesh():
    assert jax.device_count() == 8, "tests/conftest.py sets 8 fake CPU devices"
    return sharding.make_mesh((1, 2, 4))


def _flat(model):
    return {"/".join(str(getattr(k, "key", k)) for k in path): var.get_value()
            for path, var in jax.tree_util.tree_leaves_with_path(
                nnx.state(model, nnx.Param), is_leaf=lambda x: isinstance(x, nnx.Variable))}


def _normalise(spec):
    spec = tuple(spec)
    while spec and spec[-1] is None:
        spec = spec[:-1]
    return spec


def test_parameters_follow_the_rule_table(mesh):
    model = create_model(CFG, mesh=mesh)
    params = _flat(model)
    for name, spec in EXPECTED.items():
        got = params[name].sharding
        assert got.mesh.shape == mesh.shape
        assert _normalise(got.spec) == _normalise(spec), name
    # Every parameter: the sharding is the rule table's spec for its logical axes.
    specs = sharding.state_specs(nnx.state(model, nnx.Param), sharding.DEFAULT_RULES, mesh)
    for name, array in params.items():
        assert _normalise(array.sharding.spec) == _normalise(specs[name]), name
    # Nothing is fully materialised on one device: the MLP kernels of both layers are split 8 ways.
    gate = params["layers/mlp/gate_proj"]
    assert gate.addressable_shards[0].data.shape == (2, 32, 24)


@pytest.mark.slow  # > 10 s on the 2-core machine
def test_sharded_forward_equals_unsharded(mesh):
    plain = create_model(CFG, seed=1)
    sharded = create_model(CFG, seed=1, mesh=mesh)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 128, size=(4, 10)), jnp.int32)
    graphdef, state = nnx.split(sharded)
    forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    out = forward(state, jax.device_put(ids, sharding.batch_sharding(mesh, sharding.DEFAULT_RULES, 2)))
    np.testing.assert_allclose(np.asarray(out), np.asarray(plain(ids)), atol=1e-5)


def test_load_pretrained_places_shards(mesh, tmp_path):
    hf = hf_model(num_attention_heads=8, num_key_value_heads=4, hidden_size=64, intermediate_size=96,
                  vocab_size=128, eos_token_id=3)
    hf.save_pretrained(tmp_path)
    sharded = load_pretrained(str(tmp_path), mesh=mesh).model
    plain = load_pretrained(str(tmp_path)).model
    params = _flat(sharded)
    assert _normalise(params["layers/attn/k_proj"].sharding.spec) == (None, "fsdp", "tensor")
    for name, array in _flat(plain).items():
        np.testing.assert_array_equal(np.asarray(params[name]), np.asarray(array))


def test_logical_to_spec_drops_axes_that_do_not_divide(mesh):
    rules = sharding.DEFAULT_RULES
    assert sharding.logical_to_spec(("batch", None), rules, mesh, (8, 3)) == P("fsdp", None)
    assert sharding.logical_to_spec(("batch", None), rules, mesh, (3, 3)) == P(None, None)
    assert sharding.logical_to_spec(("kv_heads",), rules, mesh, (6,)) == P(None)
    assert sharding.logical_to_spec(("kv_heads",), rules, mesh, (8,)) == P("tensor")
    # A mesh axis is used at most once per array.
    assert sharding.logical_to_spec(("mlp", "heads"), rules, mesh, (8, 8)) == P("tensor", None)


@pytest.mark.parametrize("shape,expected", [((1, -1, 1), (1, 8, 1)), ((2, -1, 2), (2, 2, 2)),
                                            ((-1, 4, 1), (2, 4, 1))])
def test_mesh_shape_resolves(shape, expected):
    assert tuple(sharding.make_mesh(shape).devices.shape) == expected


def test_decode_weights_are_whole_per_device_and_in_the_compute_dtype():
    rules = sharding.DEFAULT_RULES
    assert dict(sharding.decode_rules(rules))["embed"] == ()  # fsdp taken off
    assert dict(sharding.decode_rules(rules))["mlp"] == ("tensor",)
    assert dict(sharding.decode_rules(rules))["batch"] == ("data", "fsdp")
    mesh = sharding.make_mesh((1, 4, 2))
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4,
                      num_kv_heads=2, head_dim=8)
    model = create_model(cfg, seed=0, mesh=mesh, rules=rules)
    state = nnx.state(model)
    out = sharding.decode_weights(state, mesh, rules, jnp.bfloat16)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(out)):
        assert b.dtype == jnp.bfloat16 and "fsdp" not in str(b.sharding.spec), b.sharding
        np.testing.assert_array_equal(np.asarray(b, np.float32), np.asarray(a.astype(jnp.bfloat16), np.float32))
    specs = {str(x.sharding.spec) for x in jax.tree.leaves(out)}
    assert any("tensor" in s for s in specs)  # tensor parallelism is kept
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    planned = sharding.decode_weights(abstract, mesh, rules, jnp.bfloat16)
    assert [x.sharding for x in jax.tree.leaves(planned)] == [x.sharding for x in jax.tree.leaves(out)]


def test_mesh_shape_over_slices_is_per_slice_with_data_across():
    # Multislice: the shape describes one slice; `data` is repeated across the slices.
    assert sharding.resolve_mesh_shape((1, -1, 1), 32, slices=2) == (2, 16, 1)
    assert sharding.resolve_mesh_shape((-1, 4, 1), 32, slices=2) == (8, 4, 1)
    with pytest.raises(sharding.MeshError, match="one of 2 slices"):
        sharding.resolve_mesh_shape((1, 32, 1), 32, slices=2)
    with pytest.raises(sharding.MeshError, match="`data` mesh axis"):
        sharding.resolve_mesh_shape((-1, 1), 8, slices=2, axis_names=("fsdp", "tensor"))


def test_multislice_mesh_keeps_fsdp_inside_a_slice():
    pytest.importorskip("libtpu")
    from jax.experimental import topologies
    devices = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2", num_slices=2).devices
    assert sharding.num_slices(devices) == 2 and sharding.num_slices(jax.devices()) == 1
    mesh = sharding.make_mesh((1, -1, 1), devices=devices)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    slice_of = np.vectorize(lambda d: d.slice_index)(mesh.devices)
    assert (slice_of == np.arange(2)[:, None, None]).all()  # each data row is one slice


@pytest.mark.parametrize("shape,message", [((3, -1, 1), "cannot be completed"), ((2, 2, 1), "needs 4"),
                                           ((-1, -1, 1), "at most one -1"), ((0, 8, 1), "positive")])
def test_bad_mesh_shapes(shape, message):
    with pytest.raises(sharding.MeshError, match=message):
        sharding.make_mesh(shape)
