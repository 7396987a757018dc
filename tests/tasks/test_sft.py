"""Supervised warm start: masking, the loss, and a short training run that must lower the loss."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hbpo_jax import sharding
from hbpo_jax.models import ModelConfig, Qwen2
from hbpo_jax.tasks import arithmetic as A
from hbpo_jax.tasks import sft
from hbpo_jax.tasks import tokenizer as T


@pytest.fixture(scope="module")
def tok():
    return T.build_tokenizer(A.corpus_texts(300, 0), vocab_size=128)


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_tokenize_sft_masks_response_only(tok):
    examples = A.sft_examples(40, 2)
    data = sft.tokenize_sft(tok, examples, max_len=256)
    assert data["input_ids"].shape == data["loss_mask"].shape == data["attention_mask"].shape == (40, 256)
    assert data["input_ids"].dtype == np.int32 and data["loss_mask"].dtype == np.float32
    for i, ex in enumerate(examples):
        prompt = tok.apply_chat_template(ex.messages, add_generation_prompt=True, tokenize=False)
        head = _ids(tok, prompt + ex.prefix)
        target = _ids(tok, ex.response[len(ex.prefix):] + tok.eos_token)
        n = len(head) + len(target)
        row, mask = data["input_ids"][i], data["loss_mask"][i]
        assert list(row[len(head):n]) == target and row[n - 1] == tok.eos_token_id
        assert mask[:len(head)].sum() == 0 and mask[len(head):n].all() and mask[n:].sum() == 0
        assert data["attention_mask"][i, :n].all() and not data["attention_mask"][i, n:].any()
        assert (row[n:] == tok.pad_token_id).all()
    # pairs work too: the whole response is trained
    pair = sft.tokenize_sft(tok, [(examples[0].messages, examples[0].response)], 256)
    prompt = tok.apply_chat_template(examples[0].messages, add_generation_prompt=True, tokenize=False)
    assert pair["loss_mask"][0].sum() == len(_ids(tok, examples[0].response + tok.eos_token))
    assert pair["loss_mask"][0, len(_ids(tok, prompt))] == 1


def test_tokenize_sft_errors(tok):
    ex = A.sft_examples(1, 0)[0]
    with pytest.raises(ValueError, match="max_len"):
        sft.tokenize_sft(tok, [ex], max_len=10)
    glued = (ex.messages, "<think> I will answer the question with 32 tokens!", "<think> I will answer the question with 32 tok")
    with pytest.raises(ValueError, match="tokenise differently"):
        sft.tokenize_sft(tok, [glued], max_len=256)


def test_masked_lm_loss_ignores_unmasked_positions():
    key1, key2 = jax.random.split(jax.random.key(0))
    logits = jax.random.normal(key1, (2, 5, 7))
    ids = jnp.array([[1, 2, 3, 4, 5], [6, 5, 4, 3, 2]], jnp.int32)
    mask = jnp.array([[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]], jnp.float32)
    loss = sft.masked_lm_loss(logits, ids, mask)
    logp = jax.nn.log_softmax(logits, -1)
    want = -np.mean([logp[0, 1, 3], logp[0, 2, 4], logp[1, 0, 5], logp[1, 1, 4], logp[1, 2, 3], logp[1, 3, 2]])
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    # logits that predict unmasked tokens (row 0, positions 3 and 4) do not matter
    noisy = logits.at[0, 3:].set(jax.random.normal(key2, (2, 7)) * 10)
    np.testing.assert_allclose(sft.masked_lm_loss(noisy, ids, mask), loss, rtol=1e-6)


def _tiny(tok):
    cfg = ModelConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_layers=1,
                      num_heads=2, num_kv_heads=1, tie_word_embeddings=True)
    return cfg, sft.tokenize_sft(tok, A.sft_examples(64, 1, difficulties=(1, 2)), max_len=128)


@pytest.mark.slow
def test_sft_train_lowers_loss(tok):
    cfg, data = _tiny(tok)
    model = Qwen2(cfg, rngs=nnx.Rngs(0))
    before = jax.tree.map(np.asarray, nnx.state(model))
    res = sft.sft_train(model, data, steps=30, lr=1e-2, batch_size=8, seed=0, warmup_steps=3,
                        bucket=0, log=None)
    assert res.losses.shape == (30,) and np.isfinite(res.losses).all()
    assert res.losses[-5:].mean() < 0.6 * res.losses[:3].mean(), res.losses
    # the caller's model is untouched; the result merges into a working model
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, nnx.state(model)))
    batch = {k: jnp.asarray(v[:8]) for k, v in data.items()}
    loss = sft.masked_lm_loss(res.model()(batch["input_ids"], attention_mask=batch["attention_mask"]),
                              batch["input_ids"], batch["loss_mask"])
    assert float(loss) < 0.6 * res.losses[:3].mean()


@pytest.mark.slow
def test_sft_train_sharded_matches_unsharded(tok):
    cfg, data = _tiny(tok)
    mesh = sharding.make_mesh((1, -1, 1))
    kwargs = dict(steps=3, lr=1e-2, batch_size=8, seed=1, warmup_steps=1, bucket=64, log=None)
    plain = sft.sft_train(Qwen2(cfg, rngs=nnx.Rngs(0)), data, **kwargs)
    model = sharding.create_sharded(lambda: Qwen2(cfg, rngs=nnx.Rngs(0)), mesh)
    sharded = sft.sft_train(model, data, mesh=mesh, **kwargs)
    np.testing.assert_allclose(sharded.losses, plain.losses, rtol=1e-4)
    assert sharded.losses[-1] < sharded.losses[0]
    emb = sharded.state["embed"][...]
    assert emb.sharding.spec == sharding.logical_to_spec(("vocab", "embed"), sharding.DEFAULT_RULES, mesh, emb.shape)
