"""Rollouts: chat-template prompts with a pre-filled budget prefix, sampled in one batch.

Rows are laid out prompt-major, then budget, then sample ([prompts, budgets, samples] flattened),
so group statistics are reshapes to `group_shape`. Modes (the assistant turn's pre-filled prefix):

  budget      K budgets × M samples per prompt: "<think> I will answer the question with {b} tokens"
  fixed       one budget for all rows, same prefix
  efficiency  "<think> I will answer the question with minimal tokens" (budgets unused, recorded 0)
  natural     nothing pre-filled (budgets unused, recorded 0)
  l1          L1-Exact's prompt: the user message becomes problem + "\\n\\nThink for {b} tokens." and
              nothing is pre-filled (budgets recorded)
  l1_max      L1-Max's prompt: problem + "\\n\\nThink for maximum {b} tokens." (budgets recorded)

In training, l1 / l1_max draw one N per prompt (`prompt_budgets`), as L1 does (Aggarwal & Welleck
2025, arXiv 2503.04697), and every rollout of the prompt shares it.

Chat formats (`PROMPT_FORMATS`, config rollout.prompt_format): "template" renders the model's own
chat template (with rollout.system_prompt when set); "r1_zero" adds `R1_ZERO_SYSTEM`, a system
prompt that asks for reasoning in <think> </think> and a final \\boxed{} answer, for instruct
models that never think on their own. `system_prompt_for` resolves the two into the one system
prompt every prompt builder takes; the prefix rule below holds for both.

If the rendered template already ends in "<think>" (e.g. DeepSeek-R1-Distill's "<think>\\n"), the
prefix's own "<think>" is dropped (and the space after it when the template ends in a newline).
With `prefix_in_response` (default, as in HBPO's code) the pre-filled tokens are response tokens:
counted in `lengths`, inside `response_mask`, outside `sampled_mask` (the sampler did not draw them).
Their log-probabilities come from the refilling engine's prefill (`scored_mask`); the static
sampler does not score them, so the trainer recomputes them when they take the loss.

Engines (`ENGINES`, config rollout.engine): "static" samples chunks of max_batch rows, each until
its longest row ends (hbpo_jax.sampler); "refill" keeps max_batch decode slots busy, refilling a
slot when its row ends, and prefills each distinct prompt once (hbpo_jax.engine). Both draw the
same tokens for the same key (a row's randomness is its own).
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hbpo_jax import engine as engine_lib
from hbpo_jax import sampler, sampling, sharding

MODES = ("budget", "natural", "efficiency", "fixed", "l1", "l1_max")
ENGINES = ("static", "refill")
BUDGETED = ("budget", "fixed", "l1", "l1_max")  # modes whose rows carry a budget
THINK = "<think>"
BUDGET_PREFIX = "<think> I will answer the question with {budget} tokens"
EFFICIENCY_PREFIX = "<think> I will answer the question with minimal tokens"
L1_SUFFIX = "\n\nThink for {budget} tokens."
L1_MAX_SUFFIX = "\n\nThink for maximum {budget} tokens."
USER_SUFFIXES = {"l1": L1_SUFFIX, "l1_max": L1_MAX_SUFFIX}
PREFIXES = {"budget": BUDGET_PREFIX, "fixed": BUDGET_PREFIX, "efficiency": EFFICIENCY_PREFIX}
R1_ZERO_SYSTEM = (
    "You are a careful problem solver. Work through the problem step by step inside <think> and "
    "</think> tags. After </think>, state the final answer once, as \\boxed{ANSWER}. Layout: "
    "<think> your reasoning </think> The answer is \\boxed{ANSWER}.")
PROMPT_FORMATS = {"template": None, "r1_zero": R1_ZERO_SYSTEM}


def system_prompt_for(prompt_format: str, system_prompt: str | None = None) -> str | None:
    """The system prompt of a chat format: the user's own for "template" (None when empty), the
    preset's for "r1_zero". ValueError for an unknown format or a user prompt beside a preset."""
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"prompt format must be one of {tuple(PROMPT_FORMATS)}, got {prompt_format!r}.")
    preset = PROMPT_FORMATS[prompt_format]
    if preset is not None and system_prompt:
        raise ValueError(f"prompt format {prompt_format!r} brings its own system prompt; leave the "
                         "system prompt empty or use 'template'.")
    return preset or system_prompt or None


@dataclasses.dataclass(frozen=True)
class ModeSpec:
    """One prompting mode of an evaluation: `name` labels tables and scalars ("natural",
    "efficiency", "budget_<b>", "l1_<b>", "l1_max_<b>"); `mode` is one of MODES; `budget` 0 unless
    the mode is budgeted."""

    name: str
    mode: str
    budget: int = 0


def parse_modes(specs: Sequence[str], budgets: Sequence[int] = ()) -> list[ModeSpec]:
    """Mode specs -> ModeSpecs: "natural", "efficiency", "fixed:N" (also "budget:N", "budget_N"),
    "l1:N", "l1_max:N", and "fixed" / "l1" / "l1_max" alone for each of `budgets`. Raises
    ValueError naming the bad spec; duplicates are dropped."""
    out: list[ModeSpec] = []
    for spec in specs:
        text = str(spec).strip().lower().replace("budget_", "fixed:").replace("budget:", "fixed:")
        kind, _, arg = text.partition(":")
        if kind in ("natural", "efficiency") and not arg:
            new = [ModeSpec(kind, kind)]
        elif kind in ("fixed", "l1", "l1_max"):
            values = [arg] if arg else list(budgets)
            if not values or not all(str(v).isdigit() and int(v) > 0 for v in values):
                raise ValueError(f"eval mode {spec!r}: {kind} needs positive budgets ({kind}:N, or "
                                 "rollout.budgets for a bare name).")
            label = "budget" if kind == "fixed" else kind
            new = [ModeSpec(f"{label}_{int(v)}", kind, int(v)) for v in values]
        else:
            raise ValueError(f"eval mode {spec!r} is not one of natural, efficiency, fixed[:N], l1[:N], "
                             "l1_max[:N].")
        out += [m for m in new if m not in out]
    if not out:
        raise ValueError("no eval modes given.")
    return out
_DEFAULT_EOS_TOKENS = ("<|im_end|>", "<|endoftext|>")


@dataclasses.dataclass
class PromptLayout:
    """Token lists per row (R = prompts × budgets × samples), before any sampling.

    prompt_tokens: R lists, the rendered chat template (generation prompt included).
    prefix_tokens: R lists, the pre-filled assistant prefix (empty for natural / l1).
    prefix_texts: R strings, the prefix as text. budgets, prompt_index: int32 [R].
    group_shape: (prompts, budgets per prompt, samples per budget).
    """

    prompt_tokens: list
    prefix_tokens: list
    prefix_texts: list
    budgets: np.ndarray
    prompt_index: np.ndarray
    group_shape: tuple


@dataclasses.dataclass
class RolloutBatch:
    """One rollout batch (numpy arrays; R rows, P prompt width, N = max_new_tokens).

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


def assistant_prefix(rendered: str, prefix: str) -> str:
    """`prefix` without its leading "<think>" when the rendered prompt already ends with one."""
    if not prefix.startswith(THINK):
        return prefix
    tail = rendered.rstrip(" \n")
    if not tail.endswith(THINK):
        return prefix
    rest = prefix[len(THINK):]
    return rest.lstrip(" ") if rendered.endswith("\n") else rest


def _budgets_for(mode: str, budgets) -> list[int]:
    """The budgets a mode lays out per prompt (K of [P, K, M])."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
    if mode in ("natural", "efficiency"):
        return [0]
    values = [budgets] if np.isscalar(budgets) else list(budgets or ())
    if not values or any(int(b) <= 0 for b in values):
        raise ValueError(f"mode {mode!r} needs positive budgets, got {budgets!r}.")
    if mode == "fixed" and len(values) != 1:
        raise ValueError(f"mode 'fixed' takes one budget, got {budgets!r}.")
    return [int(b) for b in values]


def build_prompts(tokenizer, problems: Sequence[str], *, budgets=None, samples_per_budget: int = 1,
                  mode: str = "budget", system_prompt: str | None = None,
                  prompt_budgets: Sequence[int] | None = None) -> PromptLayout:
    """Renders and tokenizes every (problem, budget) once and lays out the rows [P, K, M].

    budgets: a sequence of ints (budget, l1, l1_max: K subgroups), one int (fixed), ignored for
      natural / efficiency.
    prompt_budgets: l1 / l1_max only, instead of `budgets`: one budget per problem (K = 1), the
      N that L1's training draws per prompt.
    """
    if prompt_budgets is not None:
        if mode not in USER_SUFFIXES or len(prompt_budgets) != len(problems):
            raise ValueError(f"prompt_budgets takes one budget per problem, in modes {tuple(USER_SUFFIXES)}.")
        per_problem = [[int(b)] for b in prompt_budgets]
        if any(b[0] <= 0 for b in per_problem):
            raise ValueError(f"prompt_budgets must be positive, got {list(prompt_budgets)}.")
    else:
        per_problem = [_budgets_for(mode, budgets)] * len(problems)
    if samples_per_budget < 1 or not problems:
        raise ValueError("need at least one problem and samples_per_budget ≥ 1.")
    rendered, prefixes = [], []
    for problem, ks in zip(problems, per_problem):
        for b in ks:
            user = problem + USER_SUFFIXES[mode].format(budget=b) if mode in USER_SUFFIXES else problem
            messages = ([{"role": "system", "content": system_prompt}] if system_prompt else [])
            messages.append({"role": "user", "content": user})
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            prefix = PREFIXES.get(mode, "").format(budget=b)
            rendered.append(text)
            prefixes.append(assistant_prefix(text, prefix))
    # Template and prefix are tokenized apart, so the prefix's tokens are exactly known.
    prompt_tok = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    nonempty = [p for p in prefixes if p]
    enc = iter(tokenizer(nonempty, add_special_tokens=False)["input_ids"] if nonempty else [])
    prefix_tok = [next(enc) if p else [] for p in prefixes]
    m = samples_per_budget
    rep = lambda xs: [x for x in xs for _ in range(m)]  # noqa: E731  (shared lists, not copies)
    n_p, n_k = len(problems), len(per_problem[0])
    row_budgets = [b if mode in BUDGETED else 0 for ks in per_problem for b in ks]
    return PromptLayout(
        prompt_tokens=rep(prompt_tok), prefix_tokens=rep(prefix_tok), prefix_texts=rep(prefixes),
        budgets=np.repeat(np.asarray(row_budgets, np.int32), m),
        prompt_index=np.repeat(np.arange(n_p, dtype=np.int32), n_k * m),
        group_shape=(n_p, n_k, m))


def prompt_lengths(tokenizer, problems: Sequence[str], system_prompt: str | None = None) -> np.ndarray:
    """Tokens of each problem's chat-templated prompt (no prefix): int [P]."""
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    rendered = [tokenizer.apply_chat_template(system + [{"role": "user", "content": p}],
                                              add_generation_prompt=True, tokenize=False) for p in problems]
    ids = tokenizer(rendered, add_special_tokens=False)["input_ids"] if rendered else []
    return np.fromiter(map(len, ids), np.int64, count=len(ids))


def split_long_prompts(tokenizer, records: Sequence[dict], max_prompt_len: int,
                       system_prompt: str | None = None) -> tuple[list, list]:
    """The one prompt filter (training data and every benchmark): (records whose chat-templated
    prompt fits max_prompt_len tokens, indices of those that do not). records: dicts with "problem"."""
    lengths = prompt_lengths(tokenizer, [r["problem"] for r in records], system_prompt)
    kept = [r for r, n in zip(records, lengths) if n <= max_prompt_len]
    dropped = [i for i, n in enumerate(lengths) if n > max_prompt_len]
    return kept, dropped


def default_eos_ids(tokenizer, model_cfg=None) -> tuple[int, ...]:
    """The tokenizer's eos id, "<|im_end|>" and "<|endoftext|>" when in its vocabulary, and the
    model config's eos ids."""
    ids = set(getattr(model_cfg, "eos_token_ids", ()) or ())
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    ids.update(int(vocab[t]) for t in _DEFAULT_EOS_TOKENS if t in vocab)
    return tuple(sorted(ids))


def _gather_shifted(src: np.ndarray, shift: np.ndarray, width: int, fill):
    """out[r, c] = src[r, c - shift[r]] where 0 ≤ c - shift[r] < src.shape[1], else fill."""
    col = np.arange(width)[None, :] - shift[:, None]
    ok = (col >= 0) & (col < src.shape[1])
    return np.where(ok, np.take_along_axis(src, np.clip(col, 0, src.shape[1] - 1), axis=1), fill)


def budget_rollouts(model_or_pair, tokenizer, problems: Sequence[str], *, budgets=None,
                    samples_per_budget: int = 1, mode: str = "budget", max_new_tokens: int,
                    prefix_in_response: bool = True, hard_budget_cap: bool = False,
                    temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, key: jax.Array,
                    mesh=None, rules=None, system_prompt: str | None = None,
                    prompt_bucket: str | int | None = "pow2", eos_ids: Sequence[int] | None = None,
                    pad_id: int | None = None, max_batch: int = 0,
                    prompt_budgets: Sequence[int] | None = None, engine: str = "static",
                    kv_tokens: int = 0) -> RolloutBatch:
    """Builds the prompts (`build_prompts`), samples the rows, and lays out the responses (see
    RolloutBatch for shapes).

    max_new_tokens: L_max, the cap on counted response tokens (the prefix included when
      prefix_in_response); also the sampler's static cap and N.
    hard_budget_cap: also cap each row's counted response at its budget (budget / fixed / l1).
    eos_ids: default `default_eos_ids`; pad_id: default the tokenizer's pad id, else the first EOS.
    prompt_budgets: l1 / l1_max: one budget per problem instead of `budgets` (build_prompts).
    max_batch: rows decoding at once (0: all). The KV cache grows with them (1,024 rows x 5,120
      slots is ~150 GB for the 1.5B model): the static engine's rows per call, the refill
      engine's slots.
    engine: "static" or "refill" (`sample_rows`). Row r samples with fold_in(key, r), r its index
      among all rows, so neither max_batch nor the engine changes a token.
    kv_tokens: the refill engine's KV page pool in tokens (0: max_batch x the longest row).
    """
    layout = build_prompts(tokenizer, problems, budgets=budgets, samples_per_budget=samples_per_budget,
                           mode=mode, system_prompt=system_prompt, prompt_budgets=prompt_budgets)
    graphdef_state = model_or_pair
    if eos_ids is None:
        from flax import nnx
        cfg = (model_or_pair.cfg if isinstance(model_or_pair, nnx.Module)
               else sampler.graphdef_cfg(*model_or_pair))
        eos_ids = default_eos_ids(tokenizer, cfg)
    if pad_id is None:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (list(eos_ids) or [0])[0]
    n = int(max_new_tokens)
    pfx = np.fromiter(map(len, layout.prefix_tokens), np.int32, count=len(layout.prefix_tokens))
    counted = pfx if prefix_in_response else np.zeros_like(pfx)
    if prefix_in_response and pfx.max(initial=0) > n:
        raise ValueError(f"max_new_tokens={n} is shorter than the pre-filled prefix ({pfx.max()} tokens).")
    limits = n - counted
    if hard_budget_cap and mode in BUDGETED:
        limits = np.minimum(limits, layout.budgets - counted)
    limits = np.clip(limits, 0, n).astype(np.int32)

    settings = sampler.SamplerSettings(n, tuple(eos_ids), pad_id, temperature, top_p, top_k, prompt_bucket)
    got = sample_rows(graphdef_state, layout, limits, settings, engine=engine, max_batch=max_batch, key=key,
                      mesh=mesh, rules=rules, kv_tokens=kv_tokens)
    tokens, logp, sampled_len, reason, prefix_logp = got[:5]

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
        prompt_ids, prompt_mask = sampler.pad_prompts(layout.prompt_tokens, pad_id, prompt_bucket)
    else:
        response_ids = tokens
        lengths = sampled_len
        sampled_mask = scored_mask = col[:, :n] < sampled_len[:, None]
        logprobs = logp.astype(np.float32)
        full_prompts = [p + x for p, x in zip(layout.prompt_tokens, layout.prefix_tokens)]
        prompt_ids, prompt_mask = sampler.pad_prompts(full_prompts, pad_id, prompt_bucket)
    response_mask = col[:, :n] < lengths[:, None]

    text_len = joined_len - (reason == sampler.STOP_EOS)  # drop the final EOS from the text
    texts = tokenizer.batch_decode([row[:k].tolist() for row, k in zip(joined, text_len)],
                                   skip_special_tokens=False)
    return RolloutBatch(
        prompt_ids=prompt_ids, prompt_mask=prompt_mask,
        response_ids=np.where(response_mask, response_ids, pad_id).astype(np.int32),
        response_mask=response_mask, sampled_mask=sampled_mask, logprobs=logprobs,
        lengths=lengths.astype(np.int32), prefix_lengths=pfx, budgets=layout.budgets,
        prompt_index=layout.prompt_index, stop_reason=reason, texts=texts,
        group_shape=layout.group_shape, scored_mask=scored_mask)


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
                engine: str = "static", max_batch: int = 0, key, mesh=None, rules=None,
                kv_tokens: int = 0) -> SampledRows:
    """Samples a layout's rows (prompt + pre-filled prefix, `limits` int [R] new tokens each) with
    `engine` (ENGINES). Row r draws with fold_in(key, r), so both engines give the same tokens.

    static: chunks of max_batch rows (0: one call), prompt and prefix prefilled per row, each chunk
      until its longest row ends; every chunk has the same shape (the last is padded with rows that
      stop at once), so one compilation serves them all.
    refill: max_batch decode slots (0: one per row); each distinct prompt prefilled once, rows
      admitted longest expected first (`expected_lengths`), prefix log-probs scored; kv_tokens:
      its KV page pool in tokens (0: max_batch x the longest row; less: pages on demand, preemption).
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
                                    rules=rules, kv_tokens=kv_tokens)
        order = np.lexsort((np.arange(rows), -expected_lengths(layout.budgets, settings.max_new_tokens)))
        out, stats = eng.run(state, [list(p) for p in prompt_ids], row_prompt, layout.prefix_tokens, limits,
                             key=key, order=order)
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


__all__ = ["BUDGET_PREFIX", "BUDGETED", "ENGINES", "SampledRows", "expected_lengths", "sample_rows", "EFFICIENCY_PREFIX", "L1_MAX_SUFFIX", "L1_SUFFIX", "MODES", "ModeSpec",
           "PROMPT_FORMATS", "R1_ZERO_SYSTEM", "system_prompt_for", "PromptLayout", "RolloutBatch", "assistant_prefix", "budget_rollouts", "build_prompts",
           "default_eos_ids", "parse_modes", "prompt_lengths", "split_long_prompts"]
