"""How a batch of rollouts is prompted and sampled: one typed value that training and evaluation
both hand to `batch.budget_rollouts`, with every default declared here once."""
from __future__ import annotations

import dataclasses

# rollout.engine: "static" samples chunks of max_batch rows, each until its longest row ends
# (static.py); "refill" keeps max_batch decode slots busy from a queue (refill.py). Both draw the
# same tokens for the same key.
ENGINES = ("static", "refill")


@dataclasses.dataclass(frozen=True)
class RolloutSettings:
    """A rollout's settings (everything but the policy, tokenizer, problems and key).

    max_response_len: L_max, the cap on counted response tokens (the prefix included when
      prefix_in_response); also the sampler's static cap.
    mode: prompting.MODES name; budgets: the budget set of budget mode, the one budget of "fixed"
      (empty for natural / efficiency); samples_per_budget: rows per (prompt, budget).
    prefix_in_response: the pre-filled prefix counts as response (length, loss mask).
    hard_budget_cap: also cap each row's counted response at its budget.
    temperature (0: greedy), top_p, top_k (0: off): next-token selection.
    system_prompt: the chat's system turn (None: the template's own).
    max_batch: rows decoding at once (0: all); the static engine's rows per call, the refill
      engine's slots. kv_tokens: the refill engine's KV page pool in tokens (0: max_batch x the
      longest row); page_size: tokens per KV page of that pool. prompt_bucket: how prompt widths
      are rounded ("pow2", a multiple, or None).
    decode_tensor_parallel: k chips of a group split the decode weights (sharding.decode_mesh);
      1: each chip holds them whole.
    """

    max_response_len: int
    mode: str = "budget"
    budgets: tuple[int, ...] = ()
    samples_per_budget: int = 1
    prefix_in_response: bool = True
    hard_budget_cap: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    system_prompt: str | None = None
    max_batch: int = 0
    engine: str = "refill"
    kv_tokens: int = 0
    page_size: int = 16
    prompt_bucket: str | int | None = "pow2"
    decode_tensor_parallel: int = 1

    def __post_init__(self):
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {self.engine!r}.")
        if self.decode_tensor_parallel < 1:
            raise ValueError(f"decode_tensor_parallel must be ≥ 1, got {self.decode_tensor_parallel}.")

    def replace(self, **changes) -> "RolloutSettings":
        return dataclasses.replace(self, **changes)


__all__ = ["ENGINES", "RolloutSettings"]
