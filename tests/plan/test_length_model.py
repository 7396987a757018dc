"""The plan's length model (hbpo_jax.plan.lengths): the paper's mix, its scaling, and the refill
engine's schedule over it, checked by hand and against the engine itself (a tiny model on the CPU,
every row ending at its sampled length)."""
import numpy as np
import pytest

from hbpo_jax.plan import lengths


def test_the_paper_mix():
    mix = lengths.LengthMix()
    rows = mix.responses(64, 4)  # [64 prompts, 4 budgets, 4 samples], prompt-major
    assert rows.shape == (1024,) and rows.max() == 4096 and np.sum(rows == 4096) == 1  # one row at the cap
    by_budget = rows.reshape(64, 4, 4).transpose(1, 0, 2).reshape(4, -1)
    # Each subgroup's mean is where the paper's ends (the cap row lifts the last one a little).
    assert np.allclose(by_budget.mean(1)[:3], (600, 1000, 1700), atol=2)
    assert abs(by_budget.mean(1)[3] - 2300) < 8
    assert 1395 < rows.mean() < 1405 and by_budget.std(1)[0] == pytest.approx(0.25 * 600, rel=0.05)
    # Dealt over prompts: every mini-batch of 16 prompts sees short and long rows of each budget.
    mb = rows.reshape(4, 256)
    assert (mb.max(1) > 3000).all() and (mb.min(1) < 400).all()
    assert mix.responses(64, 4).tolist() == rows.tolist()  # deterministic
    scaled = mix.scaled(1900)
    assert scaled.mean_response == pytest.approx(1900) and scaled.means[0] == pytest.approx(600 * 1900 / 1400)
    assert set(mix.at_cap().responses(2, 4).tolist()) == {4096}
    prompts = mix.prompt_lengths(64)
    assert prompts.max() == 400 and 140 < prompts.mean() < 160 and prompts.min() >= 16


def test_schedule_by_hand():
    # 4 slots, admits of 2: rows of 5, 4, 3, 3, 2, 2 new tokens (admitted longest first); each row
    # draws its first token in its admit, then length - 1 decode steps.
    lengths_ = np.array([5, 4, 3, 3, 2, 2])
    s = lengths.refill_schedule(lengths_, np.full(6, 10), slots=4, admit=2)
    # First fill: rows 5, 4, 3, 3 (remaining 4, 3, 2, 2); the call returns after 2 rows end (step 2).
    # Refill rows 2, 2 (remaining 1, 1); slots left 2, 1, 1, 1: the queue is empty, so the next call
    # runs until all end: 2 more steps.
    assert (s.admit_calls, s.segments, s.decode_steps) == (2, 2, 4)
    assert s.running.tolist() == [4, 4, 4, 1]
    # Filled KV: a slot holds 10 + 1 after its admit and one more each step.
    assert s.filled.tolist() == [4 * 11, 4 * 12, 13 + 13 + 11 + 11, 14]
    assert s.tokens == 19 and s.slot_steps == 4 * 4 + 4 + 2


def test_schedule_of_the_paper_step():
    mix = lengths.LengthMix()
    rows = mix.responses(64, 4)
    budgets = np.tile(np.repeat([512, 1024, 2048, 2560], 4), 64)
    order = np.lexsort((np.arange(1024), -budgets))
    s = lengths.refill_schedule(rows, np.full(1024, 160), slots=256, admit=16, order=order)
    # 1 fill + (1,024 - 256) / 16 refills (one more where more than 16 rows end at one step and a
    # partial admit follows); a decode call per refill round and one to drain.
    assert 49 <= s.admit_calls <= 52 and 48 <= s.segments <= s.admit_calls and s.full_fills == 1
    assert rows.sum() / 256 < s.decode_steps < 4096 + rows.sum() / 256
    assert s.tokens == rows.sum() and 0.7 < s.tokens / s.slot_steps <= 1.0
    cap = lengths.refill_schedule(np.full(1024, 4096), np.full(1024, 160), slots=256, admit=16)
    # Every slot ends at once: 4 rounds of 4,095 steps, each begun by a fill of every slot.
    assert (cap.decode_steps, cap.segments, cap.admit_calls, cap.full_fills) == (4 * 4095, 4, 4, 4)


@pytest.mark.slow
@pytest.mark.parametrize("shards", [1, 4])
def test_schedule_matches_the_engine(shards):
    """The tiny model's engine, every row ending at its limit (no EOS can be drawn): its decode
    steps, calls and admits are the schedule's, on one device and with the slots over 4 devices
    (each prompt's rows on its home device, a block of admits per device)."""
    import jax
    from flax import nnx

    from hbpo_jax.models import ModelConfig, Qwen2
    from hbpo_jax.rollout.refill import RefillEngine
    from hbpo_jax.rollout.slots import StoreLayout
    from hbpo_jax.rollout.static import SamplerSettings
    from hbpo_jax.sharding import make_mesh

    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                      num_kv_heads=1, head_dim=16, dtype="float32", param_dtype="float32")
    graphdef, params = nnx.split(Qwen2(cfg, rngs=nnx.Rngs(0)))
    limits = np.array([9, 3, 7, 2, 12, 5, 4, 6, 8, 3, 2, 10] * 2)
    slots = 4 * shards
    mesh = make_mesh((1, shards, 8 // shards)) if shards > 1 else None
    eng = RefillEngine(graphdef, cfg, SamplerSettings(max_new_tokens=16, eos_ids=()), slots=slots, admit=2, mesh=mesh)
    prompts = [[1, 2, 3], [4, 5], [6], [7, 8, 9, 10], [11, 12], [13, 14, 15]]
    row_prompt = np.arange(24) % 6
    order = np.argsort(-limits, kind="stable")
    _, stats = eng.run(params, prompts, row_prompt, [[]] * 24, limits, key=jax.random.key(0), order=order)
    fill = np.array([len(prompts[p]) for p in row_prompt])
    home = StoreLayout.assign(row_prompt, fill, limits, len(prompts), eng.shards).home
    s = lengths.refill_schedule(limits, fill, slots, eng.admit_width, order, home, eng.shards)
    assert (stats.decode_steps, stats.segments, stats.admit_calls) == (s.decode_steps, s.segments, s.admit_calls)
    assert stats.slot_steps == s.slot_steps and stats.tokens == s.tokens
