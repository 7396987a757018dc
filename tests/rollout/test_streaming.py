"""Rows handed over as they end (RefillEngine.run's on_retire, budget_rollouts' on_texts): the
rows of the final output, each once, while the others still decode."""
import jax
import numpy as np

from hbpo_jax.rollout import refill as engine
from hbpo_jax.rollout import static as sampler
from tests.helpers import CFG, PROMPTS, N, char_tokenizer, rollouts


def test_retired_rows_are_the_outputs_rows(model, rows):
    st = sampler.SamplerSettings(max_new_tokens=N, eos_ids=(2,))
    eng = engine.RefillEngine(model[0], CFG, st, slots=len(rows[0]))  # every row in flight
    key = jax.random.key(5)
    ref, ref_stats = eng.run(model[1], PROMPTS, *rows, key=key)
    calls = []
    out, stats = eng.run(model[1], PROMPTS, *rows, key=key, retire_every=3,
                         on_retire=lambda *got: calls.append(got))
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    # All rows in flight: one segment (one round trip) and the outputs' read, unless someone waits.
    assert ref_stats.admit_calls == 1 and ref_stats.host_round_trips == ref_stats.segments + 1 == 2
    assert len(calls) > 1 and stats.segments > ref_stats.segments
    seen = np.concatenate([c[0] for c in calls])
    admitted = np.flatnonzero(rows[2] > 0)
    assert sorted(seen.tolist()) == admitted.tolist()  # each admitted row once
    for got_rows, toks, lens, why in calls:
        np.testing.assert_array_equal(lens, out.lengths[got_rows])
        np.testing.assert_array_equal(why, out.stop_reason[got_rows])
        for r, t, n in zip(got_rows, toks, lens):
            np.testing.assert_array_equal(t[:n], out.tokens[r, :n])


def test_on_texts_hands_over_every_rows_text(model):
    from hbpo_jax.models import ModelConfig, create_model
    cfg = ModelConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, eos_token_ids=(2,))
    policy = create_model(cfg, seed=0)
    policy.lm_head[...] = policy.lm_head[...].at[:, 2].add(0.6)  # some rows end early
    tok = char_tokenizer()
    got = {}

    def on_texts(rows, prompts, texts):
        for r, p, t in zip(rows, prompts, texts):
            assert int(r) not in got
            got[int(r)] = (int(p), t)
    kw = dict(budgets=[24, 40], samples_per_budget=2, max_response_len=48, key=jax.random.key(3),
              engine="refill")
    batch = rollouts(policy, tok, ["1+1?", "7*8?"], **kw)
    from hbpo_jax.rollout import batch as rollout
    from hbpo_jax.rollout.settings import RolloutSettings
    settings = RolloutSettings(budgets=(24, 40), samples_per_budget=2, max_response_len=48, engine="refill")
    streamed = rollout.budget_rollouts(policy, tok, ["1+1?", "7*8?"], settings, key=jax.random.key(3),
                                       on_texts=on_texts)
    assert streamed.texts == batch.texts
    assert sorted(got) == list(range(len(batch.texts)))
    assert [got[r] for r in range(len(batch.texts))] == list(zip(batch.prompt_index.tolist(), batch.texts))
