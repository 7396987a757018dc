"""The lengths of one HBPO step's rows, as the plan projects them, and the refill engine's
schedule over those rows (decode steps, admits, host round trips, KV filled at every step).

The default mix is the paper's steady state: budgets 512 / 1,024 / 2,048 / 2,560 ending near
600 / 1,000 / 1,700 / 2,300 tokens (mean ~1,400), a spread inside each budget's rows, about one
row per step at the 4,096 cap (budgets are soft), prompts of ~150 tokens. Lengths are laid out
deterministically (normal quantiles, no sampling), so a plan is reproducible to the token.

Shapes: R rows, prompt-major then budget then sample ([prompts, budgets, samples] flattened);
S slots, A rows per admit call.
"""
from __future__ import annotations

import dataclasses
import statistics

import numpy as np

PAPER_MEANS = (600, 1000, 1700, 2300)  # tokens, per budget 512 / 1024 / 2048 / 2560


@dataclasses.dataclass(frozen=True)
class LengthMix:
    """A step's length mix. means: mean response tokens per budget subgroup (in budget order);
    spread: standard deviation / mean inside a subgroup; cap_rows: rows per step that run to the
    cap; cap: L_max; mean_prompt: mean prompt tokens (chat template included); longest_prompt:
    the step's longest prompt (sets the update's and the store's bucketed prompt width);
    prefix: budget-prefix tokens pre-filled after the prompt."""

    means: tuple[float, ...] = PAPER_MEANS
    spread: float = 0.25
    cap_rows: int = 1
    cap: int = 4096
    mean_prompt: float = 150.0
    longest_prompt: int = 400
    prefix: int = 12

    @property
    def mean_response(self) -> float:
        """The mean of the subgroup means (tokens), before the cap rows."""
        return float(np.mean(self.means))

    def scaled(self, mean_response: float) -> LengthMix:
        """The same mix with every subgroup mean scaled so that their mean is `mean_response`."""
        k = float(mean_response) / self.mean_response
        return dataclasses.replace(self, means=tuple(m * k for m in self.means))

    def at_cap(self) -> LengthMix:
        """Every row at the cap (the old, pessimistic projection)."""
        return dataclasses.replace(self, means=(float(self.cap),) * len(self.means), spread=0.0)

    def responses(self, prompts: int, samples: int) -> np.ndarray:
        """Response tokens per row, int [prompts x budgets x samples] (prompt-major): each
        subgroup's prompts x samples rows at the normal quantiles mean x (1 + spread z), clipped
        to [2, cap], dealt over the prompts so that every mini-batch sees the whole spread; then
        the cap_rows longest rows of the step set to the cap."""
        b = len(self.means)
        out = np.empty((prompts, b, samples), np.int64)
        n = prompts * samples
        z = np.array([statistics.NormalDist().inv_cdf((i + 0.5) / n) for i in range(n)])
        deal = np.random.default_rng(0).permutation(n)  # a fixed dealing, not a draw
        for k, m in enumerate(self.means):
            lengths = np.clip(np.rint(m * (1.0 + self.spread * z)), 2, self.cap).astype(np.int64)
            out[:, k, :] = lengths[deal].reshape(prompts, samples)
        flat = out.reshape(-1)
        if self.cap_rows:
            flat[np.argsort(-flat, kind="stable")[:self.cap_rows]] = self.cap
        return flat

    def prompt_lengths(self, prompts: int) -> np.ndarray:
        """Prompt tokens per prompt, int [prompts]: quantiles of mean x (1 + 0.4 z), clipped to
        [16, longest_prompt], the longest one at longest_prompt."""
        z = np.array([statistics.NormalDist().inv_cdf((i + 0.5) / prompts) for i in range(prompts)])
        out = np.clip(np.rint(self.mean_prompt * (1.0 + 0.4 * z)), 16, self.longest_prompt).astype(np.int64)
        out[-1] = self.longest_prompt
        return np.random.default_rng(1).permutation(out)

    def describe(self, responses: np.ndarray) -> str:
        means = ", ".join(f"{m:,.0f}" for m in self.means)
        return (f"responses by budget subgroup {means} tokens (spread {self.spread:.0%}), {self.cap_rows} row(s) "
                f"at the {self.cap:,} cap: mean {responses.mean():,.0f}; prompts mean {self.mean_prompt:,.0f}, "
                f"longest {self.longest_prompt:,}")


@dataclasses.dataclass
class Schedule:
    """The refill engine's work for one step's rows. decode_steps: loop iterations; segments:
    decode calls (each ends in one device-to-host transfer, the host's round trip); admit_calls,
    of which full_fills admitted every slot in one call (S rows wide, the rest A wide);
    running: int [decode_steps], slots running at each step; filled: int [decode_steps], KV
    tokens filled over the running slots at each step (what paged attention reads); tokens:
    generated tokens; slot_steps: S x decode_steps + each admit call's width (EngineStats')."""

    decode_steps: int
    segments: int
    admit_calls: int
    running: np.ndarray
    filled: np.ndarray
    tokens: int
    slot_steps: int
    full_fills: int = 0


def refill_schedule(lengths: np.ndarray, fill: np.ndarray, slots: int, admit: int,
                    order: np.ndarray | None = None, home: np.ndarray | None = None, shards: int = 1) -> Schedule:
    """The schedule of hbpo_jax.rollout.refill.RefillEngine.run over rows that end at `lengths` (int [R],
    new tokens; the first comes from the admit), when the pool holds every slot's whole limit
    (no page grows, no preemption). fill: int [R], KV tokens a row holds when admitted (its
    prompt, its prefix); order: admission order (default: descending length, the engine's own
    default for limits); home: int [R], each row's shard of the `shards` the slots are split over
    (its prompt's home, slots.StoreLayout; default 0). The engine's rules: each shard admits its
    own rows into its own S / shards slots; the first fill admits every slot in one call, later
    ones a block of admit / shards rows per shard per call while some shard has a free slot and a
    queued row; a decode call returns once min(admit, queued rows) rows ended (every row, when
    none is queued). Rows of 1 token count as 2."""
    lengths, fill = np.asarray(lengths, np.int64), np.asarray(fill, np.int64)
    lengths = np.where(lengths > 0, np.maximum(lengths, 2), 0)  # a row of 1 token ends in its admit: not modelled
    if order is None:
        order = np.lexsort((np.arange(len(lengths)), -lengths))
    home = np.zeros(len(lengths), np.int64) if home is None else np.asarray(home)
    queues = [[int(r) for r in order if lengths[r] > 0 and home[r] == d] for d in range(shards)]
    per = slots // shards
    remaining = np.zeros(slots, np.int64)  # decode steps a slot's row still runs (0: free)
    filled = np.zeros(slots, np.int64)
    running_t, filled_t = [], []
    segments = admits = full = 0
    free = list(range(slots))
    while True:
        while True:
            width = slots if len(free) == slots else admit
            took = 0
            for d, queue in enumerate(queues):
                mine = [f for f in free if f // per == d]
                take = queue[:min(width // shards, len(mine))]
                del queue[:len(take)]
                for slot, r in zip(mine, take):
                    remaining[slot], filled[slot] = lengths[r] - 1, fill[r] + 1
                free = [f for f in free if f not in mine[:len(take)]]
                took += len(take)
            if not took:
                break
            admits += 1
            full += width == slots
        if len(free) == slots:
            break
        live = remaining > 0
        queued = sum(map(len, queues))
        need = min(admit, queued) if queued else slots + 1
        ends = np.sort(remaining[live])
        steps = int(ends[min(need, len(ends)) - 1])
        t = np.arange(steps)[:, None]
        alive = t < remaining[None, :]
        running_t.append(alive.sum(1))
        filled_t.append(np.where(alive, filled[None, :] + t, 0).sum(1))
        filled = filled + np.minimum(remaining, steps)
        remaining = np.maximum(remaining - steps, 0)
        segments += 1
        free = sorted(set(free) | {s for s in range(slots) if live[s] and remaining[s] == 0})
    running = np.concatenate(running_t) if running_t else np.zeros(0, np.int64)
    return Schedule(len(running), segments, admits, running,
                    np.concatenate(filled_t) if filled_t else np.zeros(0, np.int64),
                    int(lengths[lengths > 0].sum()), slots * (len(running) + full) + admit * (admits - full), full)
