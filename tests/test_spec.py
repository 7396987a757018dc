"""hbpo_jax.spec: every objective resolves its own recipe, config values override it only where
set, every registry name is checked at start-up, and each objective trains on the tiny task."""
import dataclasses
import json
import pathlib
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hbpo_jax import loss, objectives, spec
from hbpo_jax.errors import ConfigError
from hbpo_jax.models import ModelConfig, create_model
from hbpo_jax.policy import Policy
from hbpo_jax.rollout import prompting
from hbpo_jax.train import minibatches as batching
from hbpo_jax.train import step
from hbpo_jax.train import update as trainer

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from configs import qwen1_5b, tiny  # noqa: E402

# objective -> (prompting, clip_low, clip_high, dual_clip, aggregation, dynamic sampling, overlong)
RECIPES = {
    "hbpo": ("budget", 0.2, 0.28, 3.0, "token-mean", False, False),
    "grpo": ("natural", 0.2, 0.2, None, "sequence-mean-token-mean", False, False),
    "dr_grpo": ("natural", 0.2, 0.2, None, "token-sum-norm", False, False),
    "dapo": ("natural", 0.2, 0.28, None, "token-mean", True, True),
    "l1_exact": ("l1", 0.2, 0.28, 3.0, "token-mean", False, False),
    "l1_max": ("l1_max", 0.2, 0.28, 3.0, "token-mean", False, False),
    "cosine": ("natural", 0.2, 0.28, 3.0, "token-mean", False, False),
    "classic": ("natural", 0.2, 0.28, 3.0, "token-mean", False, False),
}


def _resolve(config):
    return spec.resolve(config, num_devices=8)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_each_objective_resolves_its_own_recipe(name):
    config = qwen1_5b.get_config()
    config.objective.name = name
    s = _resolve(config)
    mode, lo, hi, dual, agg, dynamic, overlong = RECIPES[name]
    assert s.sampling.rollout.mode == mode
    assert (s.loss.clip_low, s.loss.clip_high, s.loss.dual_clip, s.loss.aggregation) == (lo, hi, dual, agg)
    assert (s.objective.dynamic_sampling, s.objective.overlong_penalty) == (dynamic, overlong)
    assert s.objective.l_max == 4096
    kw = dict(s.loss.kwargs())
    assert kw["clip_high"] == hi and kw["dual_clip"] == dual and kw["aggregation"] == agg
    # Dr. GRPO divides every mini-batch by the same constant: rows x L_max.
    assert (kw.get("loss_scale_tokens") == 256 * 4096) == (name == "dr_grpo")
    assert set(RECIPES) == set(objectives.OBJECTIVES)


def test_paper_config_resolves_to_the_paper_values():
    s = _resolve(qwen1_5b.get_config())
    assert s.objective.settings == dict(beta=4.0, l_max=4096, variant="code", format_reward=-1.0,
                                        wrong_reward=0.0, intra_weight=1.0)
    assert s.sampling.rollout.budgets == (512, 1024, 2048, 2560) and s.sampling.rollout.samples_per_budget == 4
    assert s.train.rows_per_minibatch == 256 and s.train.total_updates == 629 * 4
    assert (s.optim.learning_rate, s.optim.weight_decay, s.optim.grad_clip) == (1e-6, 0.01, 1.0)


def test_config_values_override_the_recipe_only_where_set():
    config = qwen1_5b.get_config()
    config.objective.name = "grpo"
    config.loss.clip_high = 0.3
    config.rollout.mode = "budget"
    s = _resolve(config)
    assert (s.loss.clip_low, s.loss.clip_high, s.loss.dual_clip) == (0.2, 0.3, None)
    assert s.sampling.rollout.mode == "budget"
    config = qwen1_5b.get_config()
    config.loss.dual_clip = 0.0  # 0 turns HBPO's dual clip off
    config.objective.intra_weight = 2.0
    s = _resolve(config)
    assert s.loss.dual_clip is None and s.objective.settings["intra_weight"] == 2.0


def test_l_max_follows_the_response_cap():
    config = tiny.get_config()
    config.rollout.max_response_len = 200
    assert _resolve(config).objective.l_max == 200
    config.objective.l_max = 256
    with pytest.raises(ConfigError, match="objective.l_max"):
        _resolve(config)


@pytest.mark.parametrize("key,value,where", [
    ("objective.name", "hpbo", "objective.name"),
    ("loss.aggregation", "mean", "loss.aggregation"),
    ("rollout.mode", "budgets", "rollout.mode"),
    ("optim.schedule", "exp", "optim.schedule"),
    ("eval.benchmarks", ("mmlu:/x.jsonl",), "eval.benchmarks"),
    ("eval.modes", ("natural", "fixed:x"), "eval.modes"),
    ("objective.reward_variant", "other", "objective.reward_variant"),
    ("task.name", "chess", "task.name"),
    ("train.recompute_old_logprobs", "sometimes", "train.recompute_old_logprobs"),
])
def test_every_registry_name_is_checked_at_start_up(key, value, where):
    config = tiny.get_config()
    section, field = key.split(".")
    config[section][field] = value
    with pytest.raises(ConfigError, match=where.replace(".", r"\.")):
        _resolve(config)


def test_a_setting_the_objective_does_not_take_is_an_error():
    config = tiny.get_config()
    config.objective.name = "grpo"
    config.objective.beta = 3.0
    with pytest.raises(ConfigError, match="objective.beta does not apply"):
        _resolve(config)


def test_spec_round_trips_as_json():
    s = _resolve(tiny.get_config())
    d = json.loads(s.to_json())
    assert d["sampling"]["rollout"]["budgets"] == [32, 64, 128, 160] and d["loss"]["dual_clip"] == 3.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.loss.clip_low = 0.1


def test_launcher_prints_a_config_error_as_one_sentence(tmp_path):
    t0 = time.time()
    done = subprocess.run([sys.executable, str(ROOT / "launch" / "train.py"), "--config=configs/tiny.py",
                           f"--workdir={tmp_path}", "--config.objective.name=hpbo"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)  # configs/ found from anywhere
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert "objective.name must be one of" in done.stderr and "'hpbo'" in done.stderr
    assert not (tmp_path / "warmstart").exists()  # nothing was built before the check
    assert time.time() - t0 < 120


# ----------------------------------------------------------------------------- prompting

def _tiny_policy():
    from hbpo_jax.tasks import arithmetic
    from hbpo_jax.tasks.tokenizer import build_tokenizer
    tok = build_tokenizer(arithmetic.corpus_texts(200, 0), vocab_size=128)
    cfg = ModelConfig(vocab_size=-(-len(tok) // 8) * 8, hidden_size=32, intermediate_size=64, num_layers=1,
                      num_heads=2, num_kv_heads=1, head_dim=16, max_position_embeddings=256,
                      eos_token_ids=(tok.eos_token_id,), tie_word_embeddings=True)
    from flax import nnx
    graphdef, params = nnx.split(create_model(cfg, seed=0))
    return graphdef, params, tok


@pytest.mark.parametrize("name", ["hbpo", "grpo", "dapo", "cosine", "l1_exact", "l1_max"])
def test_objectives_sample_with_their_own_prompts(name):
    config = tiny.get_config()
    config.objective.name = name
    config.rollout.budgets, config.rollout.max_response_len = (8, 16, 24, 32), 40
    s = _resolve(config).sampling
    graphdef, params, tok = _tiny_policy()
    problems = ["What is 1 + 2?", "What is 3 + 4?"]
    batch = step.sample(s, graphdef, params, tok, problems, jax.random.key(0))
    assert batch.group_shape[0] == 2 and np.prod(batch.group_shape) == 2 * s.group
    prompts = [tok.decode(ids[m > 0]) for ids, m in zip(batch.prompt_ids, batch.prompt_mask)]
    if name == "hbpo":
        assert all(t.startswith("<think> I will answer the question with") for t in batch.texts)
        assert sorted(set(batch.budgets.tolist())) == [8, 16, 24, 32]
    else:
        assert not any("I will answer the question" in t for t in batch.texts)
        assert (batch.prefix_lengths == 0).all()
    if name.startswith("l1"):
        per_prompt = batch.budgets.reshape(2, -1)
        assert (per_prompt == per_prompt[:, :1]).all() and ((8 <= per_prompt) & (per_prompt <= 32)).all()
        for row, (prompt, b) in enumerate(zip(prompts, batch.budgets)):
            suffix = prompting.USER_SUFFIXES[s.rollout.mode].format(budget=int(b))
            wanted = tok.decode(tok(suffix, add_special_tokens=False)["input_ids"]).strip()  # as the toy vocabulary spells it
            assert wanted in prompt, (row, wanted, prompt)
        assert (name == "l1_max") == all("imum" in p for p in prompts)
    elif name != "hbpo":
        assert (batch.budgets == 0).all() and not any("hink for" in p for p in prompts)


def test_cosine_reward_has_its_wrong_answer_branch():
    n = jnp.array([0, 128, 256])
    wrong = loss.cosine_reward(jnp.zeros(3, bool), jnp.ones(3, bool), n, l_max=256)
    right = loss.cosine_reward(jnp.ones(3, bool), jnp.ones(3, bool), n, l_max=256)
    np.testing.assert_allclose(wrong, [-10.0, -5.0, 0.0], atol=1e-5)  # longer wrong answers lose less
    np.testing.assert_allclose(right, [2.0, 1.5, 1.0], atol=1e-5)
    cut = loss.cosine_reward(jnp.ones(1, bool), jnp.zeros(1, bool), jnp.array([256]), l_max=256)
    assert float(cut[0]) == -10.0


# ----------------------------------------------------------------------------- empty mini-batches

def test_a_mini_batch_with_no_loss_token_takes_no_optimizer_step():
    config = tiny.get_config()
    config.objective.name = "dapo"
    config.train.prompts_per_step, config.train.mini_batches, config.train.micro_batch_size = 4, 2, 8
    config.rollout.rollouts_per_prompt = 4
    s = _resolve(config)
    graphdef, params, tok = _tiny_policy()
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(1, 8, 1), ("data", "fsdp", "tensor"))
    from hbpo_jax import sharding
    rules = sharding.DEFAULT_RULES
    runner = step.Step(s, Policy(graphdef, params, tok, [], []), mesh, rules)
    state = trainer.init_state(params, runner.optimizer)
    rows, width = 16, 8
    rng = np.random.default_rng(0)
    arrays = dict(tokens=rng.integers(1, 50, (rows, 4 + width)).astype(np.int32),
                  attention_mask=np.ones((rows, 4 + width), np.int32),
                  response_mask=np.zeros((rows, width), bool), old_logp=np.full((rows, width), -3.0, np.float32),
                  sampled_mask=np.ones((rows, width), bool), advantages=np.ones(rows, np.float32), prompt_len=4)
    before = jax.device_get(state)
    state, updates, empty = runner._update(state, arrays)
    after = jax.device_get(state)
    assert empty == 2 and updates == []
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        np.testing.assert_array_equal(a, b)
    arrays["response_mask"][8:] = True  # the second mini-batch has tokens: one update
    state, updates, empty = runner._update(state, arrays)
    assert empty == 1 and len(updates) == 1 and int(state.step) == 1
    assert [mb is None for mb in batching.minibatches(arrays, 8, 8, "token-mean")] == [True, False]


# ----------------------------------------------------------------------------- short runs

@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(RECIPES))
def test_each_objective_trains_a_step_on_the_tiny_task(name, tiny_run, tmp_path):
    """One step of launch/train.py per objective, from the session's warm start (one CPU device)."""
    tiny_run.run(tmp_path, 1, f"--config.objective.name={name}")
    written = json.loads((tmp_path / "spec.json").read_text())
    assert written["objective"]["name"] == name and written["sampling"]["rollout"]["mode"] == RECIPES[name][0]
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"reward"' in x]
    assert [r["step"] for r in rows] == [1]
    row = rows[-1]
    assert np.isfinite(row["reward"]) and np.isfinite(row.get("loss", 0.0))
    assert ("response_len/budget_16" in row) == (name == "hbpo")


def test_lora_section_resolves_and_bad_values_are_one_sentence():
    one_chip = lambda config: spec.resolve(config, num_devices=1)  # noqa: E731  (the colab preset's v5e-1)
    s = one_chip(qwen1_5b.get_config("colab"))
    assert (s.lora.rank, s.lora.alpha, s.lora.base_dtype) == (16, 32.0, "bfloat16")
    cfg = s.lora.model_config(s.model.config())
    assert (cfg.lora_rank, cfg.lora_scale, cfg.param_dtype) == (16, 2.0, "bfloat16")
    assert _resolve(qwen1_5b.get_config()).lora.rank == 0  # off by default: full fine-tuning
    for key, value, words in (("rank", -1, "lora.rank must be an integer"), ("alpha", 0.0, "lora.alpha"),
                              ("targets", ("q", "qkv"), "lora.targets"), ("base_dtype", "int8", "lora.base_dtype")):
        config = qwen1_5b.get_config("colab")
        config.lora[key] = value
        with pytest.raises(ConfigError, match=words) as e:
            one_chip(config)
        assert str(e.value).count(". ") == 0 and str(e.value).endswith(".")


def test_page_size_reaches_the_rollout_and_is_checked():
    config = qwen1_5b.get_config()
    config.rollout.page_size = 64
    assert spec.resolve(config, num_devices=16).sampling.rollout.page_size == 64
    config.rollout.page_size = 0
    with pytest.raises(ConfigError, match="rollout.page_size must be ≥ 1"):
        spec.resolve(config, num_devices=16)


def test_decode_tensor_parallel_is_checked_against_the_mesh():
    config = qwen1_5b.get_config()
    config.rollout.decode_tensor_parallel = 2
    s = spec.resolve(config, num_devices=16)
    assert s.sampling.rollout.decode_tensor_parallel == 2 == s.eval.rollout.decode_tensor_parallel
    for k, shape, words in ((3, (1, -1, 1), "groups of 3 chips do not divide the 16"),
                            (2, (1, -1, 2), "already splits the weights over `tensor`"),
                            (0, (1, -1, 1), "decode_tensor_parallel must be ≥ 1")):
        config.rollout.decode_tensor_parallel, config.mesh.shape = k, shape
        with pytest.raises(ConfigError, match=words):
            spec.resolve(config, num_devices=16)
