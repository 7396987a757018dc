"""LoRA training: the loss with fresh adapters (B = 0) is the base model's exactly; updates
change the adapters only (the base bitwise unchanged, optimizer state on adapters alone); the
policy gains adapters the same way whatever it came from."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hbpo_jax import loss as loss_lib
from hbpo_jax import sharding
from hbpo_jax.models import ModelConfig, create_model, lora
from hbpo_jax.policy import Policy, with_adapters
from hbpo_jax.spec import LoRASpec
from hbpo_jax.train import update as trainer
from tests.helpers import LOSS_KW, UPDATE_P, micro_split, optim_config, update_batch

P = UPDATE_P

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2)
SPEC = LoRASpec(rank=4, alpha=8.0, base_dtype="float32")


def _policy(spec=SPEC, mesh=None):
    graphdef, params = nnx.split(create_model(CFG, seed=0, mesh=mesh))
    plain = Policy(graphdef, params, None, [], [])
    return plain, with_adapters(plain, spec, seed=3, mesh=mesh)


def _loss(graphdef, params, batch):
    logp, _ = trainer.response_logprobs(nnx.merge(graphdef, params), batch["tokens"], batch["attention_mask"], P)
    loss, _ = loss_lib.policy_loss(logp, batch["old_logp"], batch["advantages"], batch["response_mask"],
                                   **dict(LOSS_KW))
    return loss


def test_loss_with_fresh_adapters_is_the_base_models_exactly():
    plain, adapted = _policy()
    batch = jax.tree.map(jnp.asarray, update_batch())
    assert float(_loss(adapted.graphdef, adapted.params, batch)) == float(_loss(plain.graphdef, plain.params, batch))
    a, _ = lora.split(adapted.params)
    b_leaves = [x for p, x in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(a)) if p[-1].key == "b"]
    assert b_leaves and all(not np.asarray(x).any() for x in b_leaves)


def test_updates_train_the_adapters_only():
    _, policy = _policy()
    adapters, frozen = lora.split(policy.params)
    frozen_before = [np.asarray(x).copy() for x in jax.tree.leaves(frozen)]
    adapters_before = [np.asarray(x).copy() for x in jax.tree.leaves(adapters)]
    optimizer = trainer.make_optimizer(optim_config(), 10)
    state = trainer.init_state(jax.tree.map(jnp.copy, adapters), optimizer)  # the update donates it
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim]
    assert sum(x.size for x in moments) == 2 * sum(x.size for x in jax.tree.leaves(adapters))  # Adam mu, nu
    batch = micro_split(update_batch(), 2)
    losses = []
    for _ in range(3):
        state, metrics = trainer.update(policy.graphdef, state, batch, optimizer=optimizer, prompt_len=P,
                                        temperature=1.0, loss_kwargs=LOSS_KW, frozen=frozen)
        losses.append(float(metrics["loss"]))
    assert int(state.step) == 3 and np.all(np.isfinite(losses)) and losses[-1] != losses[0]
    for before, after in zip(frozen_before, jax.tree.leaves(frozen)):
        assert np.array_equal(before, np.asarray(after))  # the base bitwise unchanged
    changed = [not np.array_equal(b, np.asarray(a)) for b, a in zip(adapters_before, jax.tree.leaves(state.params))]
    assert all(changed)  # A and B of every adapter moved
    # The pieces path (length-grouped micro-batches) trains the same adapters the same way.
    state2 = trainer.init_state(lora.split(policy.params)[0], optimizer)
    state2, _ = trainer.update_pieces(policy.graphdef, state2, [batch], optimizer=optimizer, prompt_len=P,
                                      temperature=1.0, loss_kwargs=LOSS_KW, frozen=frozen)
    assert int(state2.step) == 1


def test_adapters_are_created_on_the_mesh_and_the_base_cast():
    mesh = sharding.make_mesh((1, -1, 1))
    spec = LoRASpec(rank=2, alpha=4.0, targets=("q", "down"), base_dtype="bfloat16")
    plain, adapted = _policy(spec, mesh)
    adapters, base = lora.split(adapted.params)
    assert {x.dtype for x in jax.tree.leaves(base)} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(adapters)} == {jnp.dtype(jnp.float32)}
    assert all(x.sharding.mesh.shape == mesh.shape for x in jax.tree.leaves(adapters))
    assert len(jax.tree.leaves(adapters)) == 4
    assert with_adapters(plain, LoRASpec(), seed=0) is plain  # rank 0: off
