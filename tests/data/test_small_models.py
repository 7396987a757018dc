"""Issue 18's settings: the answer-format policy and prompt preset as config keys, reasoning-gym
as training data (seeded, held out from the eval, resumable), reasoning-gym's own scorer beside
ours, and configs/qwen0_5b_instruct.py."""
import json
import pathlib
import sys

import pytest

from hbpo_jax import config as config_lib
from hbpo_jax import spec
from hbpo_jax.data import loader as prompts
from hbpo_jax.data import readers as data
from hbpo_jax.data import reasoning_gym as rg_tasks
from hbpo_jax.data import sources
from hbpo_jax.errors import ConfigError
from hbpo_jax.eval import scoring as evaluation
from hbpo_jax.eval import sets
from hbpo_jax.rollout import prompting

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from configs import qwen0_5b_instruct, qwen1_5b  # noqa: E402


def _config(**data_keys):
    c = config_lib.base_config()
    c.model_path = "/nowhere"  # never read: resolve checks values only
    for k, v in data_keys.items():
        c.data[k] = v
    return c


def test_defaults_are_the_papers_and_the_small_model_config_is_lenient():
    paper = spec.resolve(qwen1_5b.get_config(), num_devices=8)
    assert paper.answer_format == paper.eval.answer_format == "paper"
    assert paper.sampling.prompt_format == "template" and paper.sampling.rollout.system_prompt is None
    small = spec.resolve(qwen0_5b_instruct.get_config(), num_devices=1)
    assert small.answer_format == small.eval.answer_format == "lenient"
    assert small.sampling.rollout.system_prompt == small.eval.rollout.system_prompt == prompting.R1_ZERO_SYSTEM
    assert small.sampling.rollout.budgets == (128, 256, 512, 768) and small.objective.l_max == 1024
    assert small.data.rg_tasks == ("basic_arithmetic", "chain_sum") and small.data.seed != small.eval.seed
    # spec.json records which policy graded and which preset prompted
    saved = json.loads(small.to_json())
    assert saved["answer_format"] == "lenient" and saved["eval"]["prompt_format"] == "r1_zero"


@pytest.mark.parametrize("key,value,where", [
    ("grading.format", "loose", "grading.format"),
    ("rollout.prompt_format", "chatml", "rollout.prompt_format"),
    ("data.path", "rg:", "data.path"),
    ("data.path", "rg:basic_arithmetic,basic_arithmetic", "data.path"),
    ("data.seed", -1, "data.seed"),
])
def test_bad_values_are_one_sentence_naming_the_key(key, value, where):
    c = _config()
    section, name = key.split(".")
    c[section][name] = value
    with pytest.raises(ConfigError, match=where.replace(".", r"\.")):
        spec.resolve(c, num_devices=1)


def test_a_preset_and_a_hand_written_system_prompt_conflict():
    c = _config()
    c.rollout.prompt_format, c.rollout.system_prompt = "r1_zero", "Be brief."
    with pytest.raises(ConfigError, match="rollout.prompt_format 'r1_zero' brings its own system prompt"):
        spec.resolve(c, num_devices=1)


def test_rg_training_problems_must_not_be_the_evals():
    c = _config(path="rg:basic_arithmetic", seed=0)
    c.eval.benchmarks = ("rg:basic_arithmetic",)
    with pytest.raises(ConfigError, match="data.seed"):
        spec.resolve(c, num_devices=1)
    c.data.seed = 1
    got = spec.resolve(c, num_devices=1).data
    assert got.rg_tasks == ("basic_arithmetic",) and got.size == sources.RG_DEFAULT_SIZE


def test_rg_records_are_seeded_interleaved_and_graded_by_our_grader():
    d = spec.resolve(_config(path="rg:basic_arithmetic,chain_sum", max_rows=7, seed=3), num_devices=1).data
    records, report = sources.training_records(d)
    again, _ = sources.training_records(d)
    assert records == again and len(records) == 7 and report.total == 0
    assert [r["rg_task"] for r in records[:4]] == ["basic_arithmetic", "chain_sum"] * 2
    assert all(set(r) >= {"problem", "answer"} and r["answer"] for r in records)
    other, _ = sources.training_records(spec.resolve(_config(path="rg:basic_arithmetic,chain_sum", max_rows=7,
                                                          seed=4), num_devices=1).data)
    assert [r["problem"] for r in other] != [r["problem"] for r in records]
    with pytest.raises(data.DataError, match="no_such_task"):
        rg_tasks.ReasoningGym(("no_such_task",), size=2, seed=0)


def test_rg_prompt_stream_resumes_from_its_state():
    records, _ = rg_tasks.ReasoningGym(("basic_arithmetic",), size=20, seed=1).records()
    run = prompts.prompt_batches(records, batch_size=4, seed=0, process_index=0, process_count=1, prefetch=0)
    first = [next(run) for _ in range(3)]
    state = run.get_state()
    want = [next(run) for _ in range(7)]  # past the end of the first epoch (5 batches)
    fresh, _ = rg_tasks.ReasoningGym(("basic_arithmetic",), size=20, seed=1).records()  # a restarted process
    resumed = prompts.prompt_batches(fresh, batch_size=4, seed=0, process_index=0, process_count=1, prefetch=0)
    resumed.set_state(state)
    assert [next(resumed) for _ in range(7)] == want and first[0] != want[0]


def test_rg_benchmark_reports_its_own_score_beside_ours():
    bench = sets.load("rg:basic_arithmetic", max_problems=4, seed=0, size=4)
    assert bench.scorer is not None
    truth = [r["answer"] for r in bench.records]
    texts = [f"The final answer is \\(\\boxed{{{truth[0]}}}\\).",          # lenient: right
             f"<think> {truth[1]} </think> \\boxed{{{truth[1]}}}",          # both: right
             f"<think> never closed \\boxed{{{truth[2]}}}",                  # format error
             "\\boxed{not a number}"]                                        # wrong
    got = {}
    for policy in ("paper", "lenient"):
        res = evaluation.score(bench.name, "natural", bench.records, texts, [5] * 4, workers=0,
                               answer_format=policy, scorer=bench.scorer)
        got[policy] = res.summary()
    assert got["lenient"]["accuracy"] == 50.0 and got["lenient"]["format_error_rate"] == 0.25
    assert got["paper"]["accuracy"] == 25.0 and got["paper"]["format_error_rate"] == 0.75
    # reasoning-gym's score_answer on our extracted answers agrees with our grader here
    assert got["lenient"]["dataset_score"] == 50.0 and got["paper"]["dataset_score"] == 25.0
    assert got["lenient"]["answer_format"] == "lenient"
    from hbpo_jax.eval import run as eval_run
    assert "eval/rg_basic_arithmetic/natural/dataset_score" in eval_run.scalars([got["lenient"]])
