"""Supervised warm start: chat-formatted examples to arrays, and a jitted masked-LM train loop.

The loss is next-token cross-entropy on response tokens only (the generated part of the assistant
turn and its EOS); the prompt, any pre-filled prefix and padding get no loss. The model is split
once (`nnx.split`); the train step is a pure jitted function of (params, optimizer state, batch)
that donates the state it replaces.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx


def _unpack(example) -> tuple[list[dict], str, str]:
    if len(example) == 2:
        messages, response = example
        return messages, response, ""
    messages, response, prefix = example
    if not response.startswith(prefix):
        raise ValueError(f"response does not start with its prefix {prefix!r}")
    return messages, response, prefix


def tokenize_sft(tokenizer, examples: Sequence, max_len: int) -> dict[str, np.ndarray]:
    """Chat-formats and tokenises SFT examples, right-padded to max_len.

    examples: (messages, response) pairs or (messages, response, prefix) triples
      (tasks.arithmetic.SFTExample); the prompt is the chat template with the generation prompt,
      `prefix` is the start of the response that rollouts pre-fill, and the tokenizer's EOS is
      appended after the response.
    Returns numpy arrays, each [N, max_len]:
      input_ids int32 (padding: the pad id), loss_mask float32 (1 on tokens to be predicted: the
      response after the prefix, and EOS), attention_mask int32 (1 on tokens, 0 on padding).
    Raises ValueError when a sequence is longer than max_len or when the tokens of prompt + prefix
    are not a prefix of the tokens of prompt + response (the rollout would then see other tokens).
    """
    parts = [_unpack(ex) for ex in examples]
    prompts = [tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False)
               for m, _, _ in parts]
    eos = tokenizer.eos_token
    heads = tokenizer([p + pre for p, (_, _, pre) in zip(prompts, parts)], add_special_tokens=False)
    fulls = tokenizer([p + r + eos for p, (_, r, _) in zip(prompts, parts)], add_special_tokens=False)
    n = len(parts)
    input_ids = np.full((n, max_len), tokenizer.pad_token_id, np.int32)
    loss_mask = np.zeros((n, max_len), np.float32)
    attention_mask = np.zeros((n, max_len), np.int32)
    for i, (head, full) in enumerate(zip(heads["input_ids"], fulls["input_ids"])):
        if len(full) > max_len:
            raise ValueError(f"example {i} has {len(full)} tokens, more than max_len={max_len}.")
        if full[:len(head)] != head:
            raise ValueError(f"example {i}: the prompt and prefix tokenise differently when the "
                             f"response follows; start the response after the prefix with a space "
                             f"or a newline.")
        input_ids[i, :len(full)] = full
        loss_mask[i, len(head):len(full)] = 1.0
        attention_mask[i, :len(full)] = 1
    return {"input_ids": input_ids, "loss_mask": loss_mask, "attention_mask": attention_mask}


def masked_lm_loss(logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy over masked targets.

    logits: float32 [B, T, V] (position t predicts token t + 1); input_ids: int32 [B, T];
    loss_mask: float [B, T], 1 where token t is a target. Returns a float32 scalar.
    """
    targets = input_ids[:, 1:]
    weights = loss_mask[:, 1:].astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1].astype(jnp.float32), targets)
    return jnp.sum(ce * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def make_optimizer(lr: float, steps: int, *, warmup_steps: int | None = None,
                   weight_decay: float = 0.01, grad_clip: float = 1.0) -> optax.GradientTransformation:
    """AdamW (betas 0.9, 0.95) with linear warm-up then cosine decay to lr / 10, global-norm
    clipping, and weight decay on matrices only (not norms or biases)."""
    warmup = max(1, min(steps // 10, 100)) if warmup_steps is None else warmup_steps
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1), lr * 0.1)
    decay_mask = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)  # noqa: E731
    return optax.chain(optax.clip_by_global_norm(grad_clip),
                       optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=weight_decay,
                                   mask=decay_mask))


@dataclasses.dataclass
class SFTResult:
    """graphdef and state: the trained model (`model()` merges them); losses: float32 [steps]."""

    graphdef: Any
    state: Any
    losses: np.ndarray
    seconds: float

    def model(self):
        return nnx.merge(self.graphdef, self.state)


def _make_step(graphdef, optimizer):
    def loss_fn(params, batch):
        model = nnx.merge(graphdef, params)
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"])
        return masked_lm_loss(logits, batch["input_ids"], batch["loss_mask"])

    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))


def _batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator, group: int):
    """Index batches for one epoch. group > 1: rows are shuffled, then sorted by length within
    windows of group * batch_size rows, so a batch holds similar lengths (less padding), and the
    batches are shuffled again."""
    order = rng.permutation(len(lengths))
    n = len(order) // batch_size * batch_size
    if group > 1:
        window = group * batch_size
        order = np.concatenate([c[np.argsort(lengths[c], kind="stable")]
                                for c in np.split(order[:n], range(window, n, window))])
    batches = order[:n].reshape(-1, batch_size)
    return [np.sort(b) for b in batches[rng.permutation(len(batches))]]


def sft_train(model, data: dict[str, np.ndarray], *, steps: int, lr: float, batch_size: int,
              seed: int = 0, warmup_steps: int | None = None, weight_decay: float = 0.01,
              grad_clip: float = 1.0, bucket: int = 64, group_by_length: int = 8, mesh=None,
              rules=None, log_every: int = 50,
              log: Callable[[str], None] | None = print) -> SFTResult:
    """Fine-tunes `model` on tokenize_sft's arrays for `steps` AdamW steps.

    model: an NNX module (e.g. models.Qwen2) or its (graphdef, state) from nnx.split. It is not
    modified; the result holds the new state. data: tokenize_sft's dict ([N, T] arrays). Batches
    of `batch_size` rows are drawn without replacement (reshuffled each epoch, seeded by `seed`);
    with group_by_length > 1, rows of similar length are batched together (see _batches), and each
    batch is cut to its longest row rounded up to a multiple of `bucket` (one compilation per
    distinct length; bucket=0: every batch keeps the full T).
    mesh (+ rules, default sharding.DEFAULT_RULES): batches are placed batch-sharded on it; the
    parameters keep the sharding they come with.
    log: called with a progress line every `log_every` steps (None: silent).
    """
    graphdef, state = nnx.split(model) if isinstance(model, nnx.Module) else model
    n, full_len = data["input_ids"].shape
    if n < batch_size:
        raise ValueError(f"sft: {n} examples are fewer than batch_size={batch_size}.")
    arrays = {k: np.asarray(data[k]) for k in ("input_ids", "loss_mask", "attention_mask")}
    lengths = arrays["attention_mask"].sum(axis=1)
    place = lambda b: b  # noqa: E731
    if mesh is not None:
        from hbpo_jax import sharding
        rules = rules or sharding.DEFAULT_RULES
        place = lambda b: jax.device_put(  # noqa: E731
            b, sharding.batch_sharding(mesh, rules, 2, b["input_ids"].shape))

    optimizer = make_optimizer(lr, steps, warmup_steps=warmup_steps, weight_decay=weight_decay,
                               grad_clip=grad_clip)
    params = jax.tree.map(jnp.copy, state)  # the caller's state survives the donation
    opt_state = jax.jit(optimizer.init)(params)
    train_step = _make_step(graphdef, optimizer)

    rng = np.random.default_rng(seed)
    epoch: list[np.ndarray] = []
    losses = []
    start = time.perf_counter()
    for i in range(steps):
        if not epoch:
            epoch = _batches(lengths, batch_size, rng, group_by_length)
        idx = epoch.pop()
        t = full_len if not bucket else min(full_len, -(-int(lengths[idx].max()) // bucket) * bucket)
        batch = {k: v[idx, :t] for k, v in arrays.items()}
        params, opt_state, loss = train_step(params, opt_state, place(batch))
        losses.append(loss)
        if log is not None and log_every and ((i + 1) % log_every == 0 or i + 1 == steps):
            log(f"sft step {i + 1}/{steps}: loss {float(loss):.4f} "
                f"({time.perf_counter() - start:.1f}s)")
    losses = np.asarray(jax.device_get(losses), np.float32)
    return SFTResult(graphdef, params, losses, time.perf_counter() - start)
