"""The update's padding at HBPO's length mix (no model, numpy only: seconds on a CPU): the share of
the token slots the update computes that hold no token, for the rows layouts (every micro-batch at
the step's width; micro-batches grouped by length, widths in multiples of --width_step) and for
rows packed by tokens (train/packing.py), per mini-batch of the paper's config (configs/qwen1_5b.py).

    python launch/bench_packing.py            # the paper's shapes, 8 seeded steps

Rows as launch/bench_rollout.py draws them: prompts x budgets x samples, each response around 0.85
x its budget (sd 0.15 x budget), a share (--long_fraction) at the cap; prompts of
--prompt_min..--prompt_max tokens (DeepScaleR problems in the chat template), left-padded to the
prompt bucket; each budget's pre-filled prefix (--prefix_len tokens) counted in the response.
"response slots" is the rows layouts' metric (minibatches.padded_fraction, what the training log
prints as update_padded_fraction); "all slots" counts the prompts' padding too; the packed layout
has only the one. Micro-batches: the grouped layout's distinct shapes are its programs to compile.
"""
import numpy as np

from hbpo_jax import cli
from hbpo_jax.train import minibatches as batching
from hbpo_jax.train import packing

flags = cli.flags
flags.DEFINE_integer("steps", 8, "Seeded steps to average over.")
flags.DEFINE_integer("prompts", 64, "Prompts per step.")
flags.DEFINE_integer("samples", 4, "Rollouts per budget per prompt.")
flags.DEFINE_list("budgets", ["512", "1024", "2048", "2560"], "Budgets.")
flags.DEFINE_integer("cap", 4096, "L_max.")
flags.DEFINE_float("long_fraction", 1 / 16, "Share of rows that run to the cap.")
flags.DEFINE_integer("prompt_min", 60, "Shortest prompt (tokens).")
flags.DEFINE_integer("prompt_max", 400, "Longest prompt (tokens).")
flags.DEFINE_integer("prompt_bucket", 1024, "The prompt width rows are left-padded to (max_prompt_len's bucket).")
flags.DEFINE_integer("prefix_len", 11, "Tokens of a budget's pre-filled prefix.")
flags.DEFINE_integer("mini_batches", 4, "Mini-batches per step.")
flags.DEFINE_integer("micro", 16, "Rows per micro-batch (packed: lanes per micro-batch).")
flags.DEFINE_integer("width_step", 1024, "The grouped rows layout's width multiple.")


def _arrays(f, rng) -> dict:
    """update_arrays' fields for one step (tokens are zeros: only the masks matter here)."""
    budgets = np.array([int(b) for b in f.budgets])
    row_budgets = np.tile(np.repeat(budgets, f.samples), f.prompts)
    lengths = np.rint(rng.normal(0.85 * row_budgets, 0.15 * row_budgets)).astype(int)
    long = rng.random(len(lengths)) < f.long_fraction
    lengths = np.clip(np.where(long, f.cap, lengths), f.prefix_len + 1, f.cap)
    prompt = np.repeat(rng.integers(f.prompt_min, f.prompt_max + 1, f.prompts), len(budgets) * f.samples)
    p = f.prompt_bucket
    n = batching.response_width(int(lengths.max()), f.cap)
    attn = np.zeros((len(lengths), p + n), np.int32)
    for r in range(len(lengths)):
        attn[r, p - prompt[r]:p] = 1
        attn[r, p:p + lengths[r]] = 1
    resp = attn[:, p:].astype(bool)
    return dict(tokens=np.zeros_like(attn), attention_mask=attn, response_mask=resp,
                old_logp=np.zeros(resp.shape, np.float32), advantages=np.zeros(len(lengths), np.float32),
                prompt_len=p)


def _rows_all_slots(arrays, rows, micro, width_step) -> float:
    """The rows layouts' padded share of all slots: prompt bucket + each micro-batch's width."""
    lengths, p = batching.response_lengths(arrays), arrays["prompt_len"]
    prompt_tokens = arrays["attention_mask"][:, :p].sum()
    slots = 0
    for start in range(0, len(lengths), rows):
        _, widths = batching.micro_layout(lengths[start:start + rows], rows, micro,
                                          arrays["response_mask"].shape[1], width_step)
        slots += int((widths + p).sum()) * micro
    return 1.0 - (lengths.sum() + prompt_tokens) / slots


def main(argv) -> None:
    del argv
    f = flags.FLAGS
    rows = f.prompts // f.mini_batches * len(f.budgets) * f.samples
    lane = f.prompt_bucket + f.cap
    table = {"rows, one width": [], f"rows grouped by {f.width_step}": [], "packed, full micro-batches only": [],
             "packed (a last micro-batch of half lanes at half width)": []}
    programs = set()
    for seed in range(f.steps):
        arrays = _arrays(f, np.random.default_rng(seed))
        lengths, n = batching.response_lengths(arrays), arrays["response_mask"].shape[1]
        for name, step in (("rows, one width", 0), (f"rows grouped by {f.width_step}", f.width_step)):
            table[name].append((batching.padded_fraction(lengths, rows, f.micro, n, step),
                                _rows_all_slots(arrays, rows, f.micro, step)))
        for start in range(0, len(lengths), rows):
            _, widths = batching.micro_layout(lengths[start:start + rows], rows, f.micro, n, f.width_step)
            programs |= {("grouped", int(w) + f.prompt_bucket) for w in widths}
        for name, half in (("packed, full micro-batches only", False),
                           ("packed (a last micro-batch of half lanes at half width)", True)):
            frac = packing.padded_fraction(arrays, rows, lanes=f.micro, lane_len=lane, half_lanes=half)
            table[name].append((float("nan"), frac))
    print(f"HBPO's mix: {f.prompts} prompts x {len(f.budgets)} budgets x {f.samples} samples, cap {f.cap}, "
          f"{f.long_fraction:.3f} of rows at the cap, prompts {f.prompt_min}..{f.prompt_max} tokens in a bucket "
          f"of {f.prompt_bucket}; mini-batches of {rows} rows; micro-batches of {f.micro} rows / packed: "
          f"{f.micro} lanes x {lane} tokens; {f.steps} steps")
    print("| layout | padded share of response slots | padded share of all slots | update programs |")
    print("|---|---|---|---|")
    counts = {"rows, one width": "1 per response width (<= 2)",
              f"rows grouped by {f.width_step}": f"{len(programs)} widths seen (+ the accumulate / apply pair)",
              "packed, full micro-batches only": "1", "packed (a last micro-batch of half lanes at half width)": "1"}
    for name, values in table.items():
        resp, total = np.nanmean([v[0] for v in values]) if not name.startswith("packed") else float("nan"), \
            np.mean([v[1] for v in values])
        resp_s = "-" if np.isnan(resp) else f"{resp:.1%}"
        print(f"| {name} | {resp_s} | {total:.1%} (worst step {max(v[1] for v in values):.1%}) | {counts[name]} |")


if __name__ == "__main__":
    cli.run(main)
