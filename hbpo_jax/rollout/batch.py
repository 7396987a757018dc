"""Rollouts: the rows of hbpo_jax.rollout.prompting's layout (chat-template prompt, pre-filled budget
prefix) sampled in one batch by an engine, and laid out as a RolloutBatch.

With `prefix_in_response` (default, as in HBPO's code) the pre-filled tokens are response tokens:
counted in `lengths`, inside `response_mask`, outside `sampled_mask` (the sampler did not draw them).
Their log-probabilities come from the refilling engine's prefill (`scored_mask`); the static
sampler does not score them, so the trainer recomputes them when they take the loss.

The engine (settings.ENGINES) is "static" (chunks of rows, static.py) or "refill" (slots refilled
as rows end, refill.py); both draw the same tokens for the same key (a row's randomness is its own).
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hbpo_jax import sharding
from hbpo_jax.rollout import next_token as sampling
from hbpo_jax.rollout import refill as engine_lib
from hbpo_jax.rollout import static as sampler
from hbpo_jax.rollout.prompting import BUDGETED, PromptLayout, build_prompts, default_eos_ids
from hbpo_jax.rollout.settings import ENGINES, RolloutSettings


@dataclasses.dataclass
class RolloutBatch:
    """One rollout batch (numpy arrays; R rows, P prompt width, N = settings.max_response_len).

    prompt_ids: int32 [R, P] left-padded; prompt_mask: int32 [R, P], 1 on tokens. The prompt is the
      chat template, plus the prefix when it is not counted in the response.
    response_ids: int32 [R, N], prefix tokens first when counted, then sampled tokens, then pad.
    response_mask: bool [R, N], the counted response tokens (loss mask); lengths: int32 [R], its sum.
    sampled_mask: bool [R, N], tokens the sampler drew; scored_mask: bool [R, N], tokens whose
      `logprobs` are the sampling policy's: the sampled ones, and the counted pre-filled prefix
      when the refill engine scored it; logprobs: float32 [R, N], the full log_softmax(logits / T)
      at those tokens, 0 elsewhere.
    prefix_lengths: int32 [R]; budgets: int32 [R] (0 for natural / efficiency); prompt_index:
      int32 [R]; stop_reason: int32 [R] (sampler.STOP_EOS / STOP_LIMIT).
    texts: R strings, prefix text + generated text (special tokens kept, the final EOS dropped).
    group_shape: (prompts, budgets, samples); R = their product.
    """

    prompt_ids: np.ndarray
    prompt_mask: np.ndarray
    response_ids: np.ndarray
    response_mask: np.ndarray
    sampled_mask: np.ndarray
    logprobs: np.ndarray
    lengths: np.ndarray
    prefix_lengths: np.ndarray
    budgets: np.ndarray
    prompt_index: np.ndarray
    stop_reason: np.ndarray
    texts: list
    group_shape: tuple
    scored_mask: np.ndarray | None = None  # None: = sampled_mask

    def __post_init__(self):
        if self.scored_mask is None:
            self.scored_mask = self.sampled_mask


def _gather_shifted(src: np.ndarray, shift: np.ndarray, width: int, fill):
    """out[r, c] = src[r, c - shift[r]] where 0 ≤ c - shift[r] < src.shape[1], else fill."""
    col = np.arange(width)[None, :] - shift[:, None]
    ok = (col >= 0) & (col < src.shape[1])
    return np.where(ok, np.take_along_axis(src, np.clip(col, 0, src.shape[1] - 1), axis=1), fill)


def budget_rollouts(policy, tokenizer, problems: Sequence[str], settings: RolloutSettings, *,
                    key: jax.Array, mesh=None, rules=None, prompt_budgets: Sequence[int] | None = None,
                    eos_ids: Sequence[int] | None = None, pad_id: int | None = None,
                    on_texts=None) -> RolloutBatch:
    """Builds the prompts (`build_prompts`), samples the rows, and lays out the responses (see
    RolloutBatch for shapes).

    policy: an nnx model or (graphdef, state). settings: how to prompt and sample (row r samples
      with fold_in(key, r), r its index among all rows, so neither max_batch nor the engine
      changes a token). prompt_budgets: l1 / l1_max: one budget per problem instead of
      settings.budgets (build_prompts). eos_ids: default `default_eos_ids`; pad_id: default the
      tokenizer's pad id, else the first EOS.
    on_texts: called as rows finish, on_texts(rows int [k], prompt_index int [k], texts [k] str),
      every row once, with the text RolloutBatch.texts will hold (to grade rows while the others decode): the refill
      engine calls it per decode segment, the rest (static engine, rows with no room) after
      sampling, before this returns.
    """
    s = settings
    budgets = None if prompt_budgets is not None else (tuple(s.budgets) or None)
    layout = build_prompts(tokenizer, problems, budgets=budgets, samples_per_budget=s.samples_per_budget,
                           mode=s.mode, system_prompt=s.system_prompt, prompt_budgets=prompt_budgets)
    if eos_ids is None:
        from flax import nnx
        cfg = policy.cfg if isinstance(policy, nnx.Module) else sampler.graphdef_cfg(*policy)
        eos_ids = default_eos_ids(tokenizer, cfg)
    if pad_id is None:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (list(eos_ids) or [0])[0]
    n, prefix_in_response = int(s.max_response_len), s.prefix_in_response
    pfx = np.fromiter(map(len, layout.prefix_tokens), np.int32, count=len(layout.prefix_tokens))
    counted = pfx if prefix_in_response else np.zeros_like(pfx)
    if prefix_in_response and pfx.max(initial=0) > n:
        raise ValueError(f"max_response_len={n} is shorter than the pre-filled prefix ({pfx.max()} tokens).")
    limits = n - counted
    if s.hard_budget_cap and s.mode in BUDGETED:
        limits = np.minimum(limits, layout.budgets - counted)
    limits = np.clip(limits, 0, n).astype(np.int32)

    sampler_settings = sampler.SamplerSettings(n, tuple(eos_ids), pad_id, s.temperature, s.top_p, s.top_k,
                                               s.prompt_bucket)
    known: dict[int, str] = {}  # row -> its text, made as it finished

    def on_rows(rows, toks, lens, why):
        texts = _texts(tokenizer, [layout.prefix_tokens[r] for r in rows], toks, lens, why)
        known.update(zip(map(int, rows), texts))
        on_texts(rows, layout.prompt_index[rows], texts)
    got = sample_rows(policy, layout, limits, sampler_settings, engine=s.engine, max_batch=s.max_batch, key=key,
                      mesh=sharding.decode_mesh(mesh, s.decode_tensor_parallel), rules=rules, kv_tokens=s.kv_tokens,
                      page_size=s.page_size,
                      on_rows=on_rows if on_texts is not None else None)
    tokens, logp, sampled_len, reason, prefix_logp = got[:5]
    rest = [r for r in range(len(limits)) if r not in known]
    if rest:
        texts = _texts(tokenizer, [layout.prefix_tokens[r] for r in rest], tokens[rest], sampled_len[rest],
                       reason[rest])
        known.update(zip(rest, texts))
        if on_texts is not None:
            on_texts(np.asarray(rest), layout.prompt_index[rest], texts)

    # prefix + sampled tokens, right-padded: the text the grader sees, and the counted response.
    width = n + int(pfx.max(initial=0))
    prefix_arr, _ = _right_pad(layout.prefix_tokens, pad_id, max(int(pfx.max(initial=0)), 1))
    col = np.arange(width)[None, :]
    joined = np.where(col < pfx[:, None], np.pad(prefix_arr, ((0, 0), (0, width - prefix_arr.shape[1])),
                                                 constant_values=pad_id),
                      _gather_shifted(tokens, pfx, width, pad_id))
    joined_len = pfx + sampled_len
    if prefix_in_response:
        response_ids = joined[:, :n]
        lengths = joined_len
        sampled_mask = (col[:, :n] >= pfx[:, None]) & (col[:, :n] < joined_len[:, None])
        logprobs = np.where(sampled_mask, _gather_shifted(logp, pfx, n, 0.0), 0.0).astype(np.float32)
        scored_mask = sampled_mask
        if prefix_logp is not None:  # the engine scored the prefix: its log-probs lead the response
            in_prefix = col[:, :n] < pfx[:, None]
            logprobs = np.where(in_prefix, _gather_shifted(prefix_logp, np.zeros_like(pfx), n, 0.0), logprobs)
            scored_mask = sampled_mask | in_prefix
        prompt_ids, prompt_mask = sampler.pad_prompts(layout.prompt_tokens, pad_id, s.prompt_bucket)
    else:
        response_ids = tokens
        lengths = sampled_len
        sampled_mask = scored_mask = col[:, :n] < sampled_len[:, None]
        logprobs = logp.astype(np.float32)
        full_prompts = [p + x for p, x in zip(layout.prompt_tokens, layout.prefix_tokens)]
        prompt_ids, prompt_mask = sampler.pad_prompts(full_prompts, pad_id, s.prompt_bucket)
    response_mask = col[:, :n] < lengths[:, None]

    texts = [known[r] for r in range(len(limits))]
    return RolloutBatch(
        prompt_ids=prompt_ids, prompt_mask=prompt_mask,
        response_ids=np.where(response_mask, response_ids, pad_id).astype(np.int32),
        response_mask=response_mask, sampled_mask=sampled_mask, logprobs=logprobs,
        lengths=lengths.astype(np.int32), prefix_lengths=pfx, budgets=layout.budgets,
        prompt_index=layout.prompt_index, stop_reason=reason, texts=texts,
        group_shape=layout.group_shape, scored_mask=scored_mask)


def _texts(tokenizer, prefixes, tokens, lengths, reason) -> list[str]:
    """The grader's text of rows: prefix + generated tokens (special tokens kept, a final EOS
    dropped). prefixes: k token lists; tokens: int [k, N]; lengths, reason: int [k]."""
    ids = [list(p) + np.asarray(t[:n - (r == sampler.STOP_EOS)]).tolist()
           for p, t, n, r in zip(prefixes, tokens, lengths, reason)]
    return tokenizer.batch_decode(ids, skip_special_tokens=False)


def expected_lengths(budgets: np.ndarray, cap: int) -> np.ndarray:
    """A row's expected response length for the refill engine's queue: its budget, or the cap
    for a row without one (natural, efficiency). int [R]."""
    return np.where(np.asarray(budgets) > 0, np.minimum(budgets, cap), cap)


class SampledRows(NamedTuple):
    """What an engine drew for a layout's rows (numpy): tokens, logprobs [R, N] (generated tokens
    only), lengths, stop_reason [R]; prefix_logprobs [R, F - 1] (refill engine; None for static);
    slot_steps: the decode slot-steps paid (rows in a call x loop steps it ran, summed);
    engine_stats: the refill engine's EngineStats (KV pool bytes, pages), None for static."""

    tokens: np.ndarray
    logprobs: np.ndarray
    lengths: np.ndarray
    stop_reason: np.ndarray
    prefix_logprobs: np.ndarray | None
    slot_steps: int
    engine_stats: Any = None


def sample_rows(policy, layout: PromptLayout, limits, settings: sampler.SamplerSettings, *,
                engine: str, max_batch: int = 0, key, mesh=None, rules=None,
                kv_tokens: int = 0, page_size: int = 16, on_rows=None) -> SampledRows:
    """Samples a layout's rows (prompt + pre-filled prefix, `limits` int [R] new tokens each) with
    `engine` (ENGINES). Row r draws with fold_in(key, r), so both engines give the same tokens.

    static: chunks of max_batch rows (0: one call), prompt and prefix prefilled per row, each chunk
      until its longest row ends; every chunk has the same shape (the last is padded with rows that
      stop at once), so one compilation serves them all.
    refill: max_batch decode slots (0: one per row); each distinct prompt prefilled once, rows
      admitted longest expected first (`expected_lengths`), prefix log-probs scored; kv_tokens:
      its KV page pool in tokens (0: max_batch x the longest row; less: pages on demand, preemption)
      in pages of page_size tokens.
      on_rows: refill only, the engine's on_retire (rows handed over as they end; RefillEngine.run).
    Both read the weights in the compute dtype, laid out for decoding (sharding.decode_weights).
    """
    graphdef, state = sampler.split_model(policy)
    state = sharding.decode_weights(state, mesh, rules or sharding.DEFAULT_RULES,
                                    sampler.graphdef_cfg(graphdef, state).compute_dtype)
    rows = len(layout.prompt_tokens)
    if engine == "refill":
        prompt_ids: dict = {}
        row_prompt = np.array([prompt_ids.setdefault(tuple(p), len(prompt_ids)) for p in layout.prompt_tokens],
                              np.int32)
        eng = engine_lib.get_engine(graphdef, state, settings, slots=min(max_batch or rows, rows), mesh=mesh,
                                    rules=rules, kv_tokens=kv_tokens, page_size=page_size)
        order = np.lexsort((np.arange(rows), -expected_lengths(layout.budgets, settings.max_new_tokens)))
        out, stats = eng.run(state, [list(p) for p in prompt_ids], row_prompt, layout.prefix_tokens, limits,
                             key=key, order=order, on_retire=on_rows)
        return SampledRows(*out, slot_steps=stats.slot_steps, engine_stats=stats)
    if engine != "static":
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}.")
    full_prompts = [p + x for p, x in zip(layout.prompt_tokens, layout.prefix_tokens)]
    ids, mask = sampler.pad_prompts(full_prompts, settings.pad_id, settings.prompt_bucket)
    smp = sampler.get_sampler(graphdef, state, settings, mesh=mesh, rules=rules)
    chunk = rows if max_batch <= 0 or max_batch >= rows else int(max_batch)
    keys = sampling.row_keys(key, rows)  # typed [R]: by the row's global index, not its chunk slot
    outs, slot_steps = [], 0
    for start in range(0, rows, chunk):
        sl = slice(start, start + chunk)
        c_ids, c_mask, c_limits, c_keys = ids[sl], mask[sl], limits[sl], keys[sl]
        short = chunk - c_ids.shape[0]
        if short:  # pad with copies of the first row that stop at once (limit 0)
            c_ids = np.concatenate([c_ids, np.repeat(ids[:1], short, 0)])
            c_mask = np.concatenate([c_mask, np.repeat(mask[:1], short, 0)])
            c_limits = np.concatenate([c_limits, np.zeros(short, c_limits.dtype)])
            c_keys = jnp.concatenate([c_keys, jnp.repeat(keys[:1], short, 0)])
        out = smp(state, c_ids, c_mask, key=c_keys, limits=c_limits)
        got = (out.tokens, out.logprobs, out.lengths, out.stop_reason)
        outs.append([sharding.to_host(x)[: chunk - short] for x in got])  # all rows, on every process
        slot_steps += chunk * int(sharding.to_host(out.num_steps))
    tokens, logp, lengths, reason = (np.concatenate(parts) for parts in zip(*outs))
    return SampledRows(tokens, logp, lengths.astype(np.int32), reason.astype(np.int32), None, slot_steps)


def _right_pad(rows: Sequence[Sequence[int]], pad_id: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """int32 [R, width] right-padded ids and their lengths [R]."""
    lens = np.fromiter(map(len, rows), np.int64, count=len(rows))
    out = np.full((len(rows), width), pad_id, np.int32)
    mask = np.arange(width)[None, :] < lens[:, None]
    out[mask] = np.fromiter((t for r in rows for t in r), np.int32, count=int(lens.sum()))
    return out, lens


__all__ = ["RolloutBatch", "SampledRows", "budget_rollouts", "expected_lengths", "sample_rows"]
