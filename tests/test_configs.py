"""Config files load, validate, and reject bad values with one sentence naming the key."""
import importlib.util
import pathlib
import re

import jax
import numpy as np
import pytest
from flax import nnx

from hbpo_jax import spec as spec_lib
from hbpo_jax.errors import ConfigError
from hbpo_jax.models import Qwen2

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load(name, arg=None):
    spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


@pytest.mark.parametrize("name,arg", [("tiny", None), ("qwen1_5b", None), ("qwen1_5b", "pod")])
def test_config_files_validate(name, arg):
    config = load(name, arg)
    spec_lib.resolve(config, num_devices=8)


def test_qwen1_5b_abstract_parameter_count():
    """No weights allocated: eval_shape only. transformers counts 1,777,088,000."""
    cfg = spec_lib.resolve_model(load("qwen1_5b")).config()
    abstract = nnx.eval_shape(lambda: Qwen2(cfg, rngs=nnx.Rngs(0)))
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert count == 1_777_088_000 == cfg.num_params()


@pytest.mark.parametrize("name", ["tiny", "qwen1_5b"])
def test_benchmark_shapes_are_the_config_files_models(name):
    from hbpo_jax.bench import common as benchmarks
    model = load(name).model
    assert {k: model[k] for k in benchmarks.SHAPES[name]} == benchmarks.SHAPES[name]


def test_qwen1_5b_matches_paper_setup():
    c = load("qwen1_5b")
    assert tuple(c.rollout.budgets) == (512, 1024, 2048, 2560)
    s = spec_lib.resolve(c, num_devices=8)
    assert c.rollout.rollouts_per_prompt == 16 and s.sampling.rollout.samples_per_budget == 4
    assert c.rollout.max_response_len == s.objective.l_max == 4096
    assert (c.train.prompts_per_step, c.train.mini_batches, c.train.steps) == (64, 4, 629)
    assert (c.optim.learning_rate, c.optim.weight_decay, c.optim.grad_clip) == (1e-6, 0.01, 1.0)
    assert (s.loss.clip_low, s.loss.clip_high, s.loss.dual_clip, s.loss.kl_coef) == (0.2, 0.28, 3.0, 0.0)


BAD = [
    ("rollout.budgets", (), "must not be empty"),
    ("rollout.budgets", (1024, 512), "strictly increasing"),
    ("rollout.budgets", (512, 4096), "L_max"),
    ("rollout.budgets", (512, 1024, 2048), "multiple of the 3 budgets"),
    ("rollout.rollouts_per_prompt", 10, "rollout.rollouts_per_prompt"),
    ("rollout.temperature", 0.0, "rollout.temperature"),
    ("train.mini_batches", 3, "train.mini_batches"),
    ("train.micro_batch_size", 7, "train.micro_batch_size"),
    ("mesh.shape", (3, -1, 1), "mesh.shape"),
    ("mesh.shape", (2, 2, 1), "needs 4 devices"),
    ("loss.aggregation", "mean", "loss.aggregation"),
    ("objective.reward_variant", "other", "objective.reward_variant"),
    ("model.num_kv_heads", 5, "model.num_heads"),
    ("model.hidden_size", -1, "model.hidden_size"),
    ("model.dtype", "float64", "model.dtype"),
    ("task.sft_budget_prior", 1.5, "task.sft_budget_prior"),
]


@pytest.mark.parametrize("key,value,message", BAD, ids=[f"{k}={v}" for k, v, _ in BAD])
def test_bad_values_name_the_key(key, value, message):
    config = load("qwen1_5b")
    section, field = key.split(".")
    with config.unlocked():
        config[section][field] = value
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        spec_lib.resolve(config, num_devices=8)


def test_batch_must_divide_data_parallel_ways():
    config = load("qwen1_5b")
    config.mesh.shape = (1, -1, 1)
    config.train.micro_batch_size = 4  # divides the mini-batch, not the 8 FSDP ways
    with pytest.raises(ConfigError, match="data-parallel ways"):
        spec_lib.resolve(config, num_devices=8)


@pytest.mark.slow
def test_qwen1_5b_train_step_and_sampler_lower_on_8_devices():
    """The full training step and the sampler of the 1.5B config, from abstract arrays (nothing
    allocated), lower on a 2x4 fsdp x tensor mesh of the 8 CPU devices."""
    from hbpo_jax import sharding
    from hbpo_jax.plan import programs as planning
    config = load("qwen1_5b")
    config.mesh.shape = (1, 2, 4)
    spec_lib.resolve(config, num_devices=8)
    mesh = sharding.mesh_from_config(config.mesh)
    step = planning.lower_train_step(config, mesh)
    text = step.as_text()
    assert "while" in text or "scan" in text  # micro-batches accumulate in a loop
    # The parameters enter sharded: the stacked [28, 1536, 8960] MLP kernels are split 2 x 4 ways
    # (the layer axis is not split).
    kernel = re.search(r"tensor<28x1536x8960xf32> \{.{0,160}", text).group(0)
    assert '[{}, {"fsdp"}, {"tensor"}]' in kernel or "devices=[1,2,4" in kernel, kernel  # Shardy or GSPMD
    prefill, decode = planning.lower_sampler(config, mesh, batch=16)
    assert "while" in decode.as_text()


@pytest.mark.parametrize("scales", [(0.5, 1.0), (0.2, 0.5, 0.8, 1.2)])
def test_tiny_budget_scales_need_one_scale_in_0_1_per_budget(scales):
    config = load("tiny")
    config.task.sft_budget_scales = scales
    with pytest.raises(ConfigError, match="task.sft_budget_scales"):
        spec_lib.resolve(config, num_devices=1)
