"""How a rollout's prompt is written: prompting modes, the pre-filled budget prefix, chat formats,
and the rows' prompt layout (`build_prompts`). hbpo_jax.rollout.batch samples the rows.

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
prompt every prompt builder takes.

Templates per family (`render_prompt`): Qwen2.5 and Llama/SmolLM2 open the assistant turn plainly
("<|im_start|>assistant\\n"), so the prefix follows whole. A template that takes
`enable_thinking` (Qwen3's) is rendered with it true, so the model thinks: Qwen3's hybrid template
then adds nothing, its thinking-only (2507) templates open "<think>\\n" themselves. If the rendered
template already ends in "<think>" (those, and DeepSeek-R1-Distill's "<｜Assistant｜><think>\\n"),
the prefix's own "<think>" is dropped (and the space after it when the template ends in a newline),
so the turn holds one "<think>".
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

MODES = ("budget", "natural", "efficiency", "fixed", "l1", "l1_max")
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


def assistant_prefix(rendered: str, prefix: str) -> str:
    """`prefix` without its leading "<think>" when the rendered prompt already ends with one."""
    if not prefix.startswith(THINK):
        return prefix
    tail = rendered.rstrip(" \n")
    if not tail.endswith(THINK):
        return prefix
    rest = prefix[len(THINK):]
    return rest.lstrip(" ") if rendered.endswith("\n") else rest


def render_prompt(tokenizer, messages: Sequence[dict]) -> str:
    """The chat template of `tokenizer` over `messages`, with the assistant turn opened
    (add_generation_prompt), as text. A template that reads `enable_thinking` (Qwen3's) gets it
    true: HBPO's prompts ask for reasoning inside <think>, which enable_thinking=false would close
    empty before the prefix."""
    template = getattr(tokenizer, "chat_template", None)
    kwargs = {"enable_thinking": True} if "enable_thinking" in str(template or "") else {}
    return tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False, **kwargs)


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
            text = render_prompt(tokenizer, messages)
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
    rendered = [render_prompt(tokenizer, system + [{"role": "user", "content": p}]) for p in problems]
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


__all__ = ["BUDGET_PREFIX", "BUDGETED", "EFFICIENCY_PREFIX", "L1_MAX_SUFFIX", "L1_SUFFIX", "MODES", "ModeSpec",
           "PREFIXES", "PROMPT_FORMATS", "PromptLayout", "R1_ZERO_SYSTEM", "USER_SUFFIXES", "assistant_prefix",
           "build_prompts", "default_eos_ids", "parse_modes", "prompt_lengths", "render_prompt",
           "split_long_prompts", "system_prompt_for"]
