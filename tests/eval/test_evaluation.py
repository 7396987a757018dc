"""Benchmark readers and the model-free scorer on small fixture files with fixed responses:
accuracy, 95% interval, token statistics and per-level numbers checked against hand arithmetic;
the report files, tables and scalars; mode and spec parsing; the eval section of the spec; and the
one evaluation function on a tiny random model, which follows every EvalSpec setting."""
import dataclasses
import json
import math
import pathlib

import jax
import numpy as np
import pytest
from flax import nnx

from hbpo_jax import config as config_lib
from hbpo_jax import spec
from hbpo_jax.data import readers as data
from hbpo_jax.data import reasoning_gym as rg_tasks
from hbpo_jax.errors import ConfigError
from hbpo_jax.eval import report, sets
from hbpo_jax.eval import run as eval_run
from hbpo_jax.eval import scoring as evaluation
from hbpo_jax.rollout import batch as rollout
from hbpo_jax.rollout import prompting

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures"
Z = 1.96


def ok(answer):  # a well-formed response
    return f"<think>\nwork\n</think>\n\\boxed{{{answer}}}"


def _score(spec, responses, tokens, samples=1):
    bench = sets.load(spec)
    return bench, evaluation.score(bench.name, "natural", bench.records, responses, tokens,
                                   samples=samples, workers=0).summary()


def test_math500_two_samples_with_levels():
    bench, s = _score(f"math500:{FIXTURES / 'math500.jsonl'}", [
        ok("4"), ok("4.0"),          # problem 0 (level 1): 2/2
        ok("0.5"), ok("2"),          # problem 1 (level 1): 1/2  (0.5 == \frac{1}{2})
        "10 without a think block", ok("10"),  # problem 2 (level 2): 1/2, one format error
        ok("(2, 1)"), ok("(1, 3)"),  # problem 3 (level 3): 0/2
    ], [10, 20, 30, 40, 50, 60, 70, 200], samples=2)
    # The 5th row has no answer: skipped and counted.
    assert bench.report.counts == {"answer_missing": 1} and bench.report.rows_read == 5
    assert [r["level"] for r in bench.records] == ["1", "1", "2", "3"]
    # Per-problem means 100, 50, 50, 0 -> 50. sd (ddof 1) = sqrt((50² + 0 + 0 + 50²) / 3)
    # = 40.82; half width 1.96 * 40.82 / sqrt(4) = 40.008.
    half = Z * math.sqrt(5000 / 3) / 2
    assert s["accuracy"] == pytest.approx(50.0)
    assert s["ci95"] == pytest.approx([50 - half, 50 + half])
    assert s["ci95"][0] == pytest.approx(9.9917, abs=1e-4)
    # Tokens 10..70 and 200: mean 480 / 8 = 60; median (40 + 50) / 2 = 45.
    assert (s["mean_tokens"], s["median_tokens"]) == (pytest.approx(60.0), pytest.approx(45.0))
    assert s["format_error_rate"] == pytest.approx(1 / 8)
    assert (s["problems"], s["samples"]) == (4, 2)
    lv = s["by_level"]
    assert list(lv) == ["1", "2", "3"]
    # Level 1: means 100, 50 -> 75; sd = sqrt(2 * 25² / 1) = 35.36, half = 1.96 * 35.36 / sqrt(2)
    # = 49 -> [26, 124] clipped to [26, 100]. Tokens 10, 20, 30, 40: mean = median = 25.
    assert lv["1"]["accuracy"] == pytest.approx(75.0)
    assert lv["1"]["ci95"] == pytest.approx([26.0, 100.0])
    assert (lv["1"]["mean_tokens"], lv["1"]["median_tokens"]) == (25.0, 25.0)
    # Levels 2 and 3 have one problem each: no interval.
    assert (lv["2"]["accuracy"], lv["2"]["ci95"], lv["2"]["mean_tokens"]) == (50.0, None, 55.0)
    assert (lv["3"]["accuracy"], lv["3"]["ci95"], lv["3"]["median_tokens"]) == (0.0, None, 135.0)


def test_gsm8k_one_sample_and_thousands_answer():
    bench, s = _score(f"gsm8k:{FIXTURES / 'gsm8k.jsonl'}",
                      [ok("7"), ok("1,234"), ok("5")], [12, 7, 30])
    # Row 2's answer has no "#### n": skipped as answer_unparsed.
    assert bench.report.counts == {"answer_unparsed": 1}
    assert [r["answer"] for r in bench.records] == ["7", "1234", "6"]
    # Per-problem 100, 100, 0 -> 66.67; sd = sqrt((33.3² * 2 + 66.7²) / 2) = 57.735;
    # half = 1.96 * 57.735 / sqrt(3) = 65.33 -> [1.33, 100 (132 clipped)].
    assert s["accuracy"] == pytest.approx(200 / 3)
    assert s["ci95"] == pytest.approx([200 / 3 - Z * 100 / 3, 100.0])
    assert s["ci95"][0] == pytest.approx(1.3333, abs=1e-4)
    # Tokens 12, 7, 30: mean 49 / 3, median 12.
    assert (s["mean_tokens"], s["median_tokens"]) == (pytest.approx(49 / 3), 12.0)
    assert s["by_level"] == {} and s["format_error_rate"] == 0.0


@pytest.mark.parametrize("name", ["olympiadbench.json", "olympiadbench.parquet"])
def test_olympiadbench_json_and_parquet(name):
    bench, s = _score(f"olympiadbench:{FIXTURES / name}",
                      [ok("3"), ok("1,2"), ok("8")], [100, 200, 600])
    # final_answer lists: ["1", "2"] -> "1, 2"; the empty list is skipped.
    assert [r["answer"] for r in bench.records] == ["3", "1, 2", "7"]
    assert bench.report.counts == {"answer_missing": 1}
    assert s["accuracy"] == pytest.approx(200 / 3)
    # Tokens 100, 200, 600: mean 300, median 200.
    assert (s["mean_tokens"], s["median_tokens"]) == (300.0, 200.0)


def test_aime25_three_samples():
    responses = [ok("70")] * 3 + [ok("588"), ok("587"), ok("1")] + [ok("0")] * 3
    bench, s = _score(f"aime25:{FIXTURES / 'aime25.jsonl'}", responses,
                      [5, 5, 5, 10, 10, 10, 1000, 1000, 1000], samples=3)
    # Per-problem 100, 33.33, 0 -> 44.44; sd = sqrt((55.56² + 11.11² + 44.44²) / 2) = 50.92;
    # half = 1.96 * 50.92 / sqrt(3) = 57.62 -> [-13.2, 102.1] clipped to [0, 100].
    assert s["accuracy"] == pytest.approx(400 / 9)
    sd = np.std([100, 100 / 3, 0], ddof=1)
    assert sd == pytest.approx(50.918, abs=1e-3)
    assert s["ci95"] == [0.0, 100.0]
    # Tokens: (15 + 30 + 3000) / 9 = 338.33; median 10.
    assert (s["mean_tokens"], s["median_tokens"]) == (pytest.approx(3045 / 9), 10.0)


def test_interval_is_zero_wide_when_every_problem_scores_the_same():
    s = evaluation.stats(np.ones((3, 2), bool), np.full((3, 2), 4))
    assert s["accuracy"] == 100.0 and s["ci95"] == [100.0, 100.0]


def test_score_checks_the_layout():
    records = [{"answer": "1"}, {"answer": "2"}]
    with pytest.raises(ValueError, match="2 problems x 2 samples"):
        evaluation.score("b", "natural", records, [ok("1")] * 3, [1, 1, 1], samples=2, workers=0)


def test_missing_file_and_bad_specs_give_clear_errors(tmp_path):
    with pytest.raises(data.DataError, match="does-not-exist.jsonl' does not exist"):
        sets.load(f"math500:{tmp_path / 'does-not-exist.jsonl'}")
    with pytest.raises(ConfigError, match="unknown kind 'mmlu'"):
        sets.load("mmlu:/x.jsonl")
    with pytest.raises(ConfigError, match="gsm8k needs a file path"):
        spec.parse_benchmark("gsm8k")
    with pytest.raises(data.DataError, match="needs the arithmetic task"):
        sets.load("tiny")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "a", "answer": "1"}\n{not json\n')
    with pytest.raises(data.DataError, match="malformed JSON line 2"):
        sets.load(f"aime25:{bad}")


@pytest.mark.slow
def test_tiny_champ_and_reasoning_gym_sets():
    from hbpo_jax.tasks import arithmetic
    tiny = sets.load("tiny", tiny_records=arithmetic.make_dataset(6, 3), max_problems=4)
    assert len(tiny.records) == 4 and tiny.report.counts == {"over_max_problems": 2}
    assert all(r["level"] in {"1", "2", "3", "4"} for r in tiny.records)
    champ = sets.load("champ")
    assert len(champ.records) == 270 and champ.records[0]["id"] == "P_Combinatorics_1"
    assert champ.records[0]["answer"] == "239" and champ.records[0]["level"] == "Combinatorics"
    assert len(sets.load("champ:5").records) == 5
    rg = sets.load("rg:basic_arithmetic", size=4, seed=1)
    assert rg.name == "rg_basic_arithmetic" and len(rg.records) == 4
    # Our grader on reasoning-gym answers: its own answer, boxed, is right.
    r = evaluation.score(rg.name, "natural", rg.records, [ok(x["answer"]) for x in rg.records],
                         [1] * 4, workers=0)
    assert r.correct.all()
    with pytest.raises(data.DataError, match="no_such_task"):
        sets.load("rg:no_such_task", size=2)


def test_parse_modes():
    got = prompting.parse_modes(["natural", "efficiency", "fixed", "fixed:512", "budget_64", "l1:100"],
                                 budgets=(64, 128))
    assert [(m.name, m.mode, m.budget) for m in got] == [
        ("natural", "natural", 0), ("efficiency", "efficiency", 0), ("budget_64", "fixed", 64),
        ("budget_128", "fixed", 128), ("budget_512", "fixed", 512), ("l1_100", "l1", 100)]
    for bad in ("fixed:0", "l1:x", "greedy", "natural:3"):
        with pytest.raises(ValueError, match="eval mode"):
            prompting.parse_modes([bad], budgets=(64,))


def _fixed_results():
    bench = sets.load(f"math500:{FIXTURES / 'math500.jsonl'}")
    a = evaluation.score("math500", prompting.ModeSpec("natural", "natural"), bench.records,
                         [ok("4"), ok("0.5"), ok("9"), ok("(1, 2)")], [100, 200, 300, 400], workers=0)
    b = evaluation.score("math500", prompting.ModeSpec("budget_64", "fixed", 64), bench.records,
                         [ok("4"), ok("1"), ok("9"), ok("9")], [10, 20, 30, 40], workers=0)
    aime = sets.load(f"aime25:{FIXTURES / 'aime25.jsonl'}")
    c = evaluation.score("aime25", prompting.ModeSpec("natural", "natural"), aime.records,
                         [ok("70"), ok("1"), ok("1")], [50, 50, 200], workers=0)
    return [a, b, c]


def test_report_files(tmp_path):
    results = _fixed_results()
    paths = report.write(results, str(tmp_path), meta={"checkpoint": "x"}, skipped={"math500": "..."})
    got = json.loads(pathlib.Path(paths["json"]).read_text())
    assert [(r["benchmark"], r["mode"]) for r in got["results"]] == [
        ("math500", "natural"), ("math500", "budget_64"), ("aime25", "natural")]
    assert got["results"][0]["accuracy"] == 75.0 and got["results"][2]["ci95"] is not None
    md = pathlib.Path(paths["markdown"]).read_text()
    # Rows = modes, columns = benchmarks (+ mean): natural: math500 3/4 at 250 tokens, aime25 1/3
    # at 100 tokens; mean (75 + 33.3) / 2 = 54.2 at (250 + 100) / 2 = 175.
    assert "| mode | math500 | aime25 | mean |" in md
    assert "| natural | 75.0 / 250 | 33.3 / 100 | 54.2 / 175 |" in md
    assert "| budget_64 | 25.0 / 25 | – | 25.0 / 25 |" in md
    # Per-level table of math500: natural level 1 = 2/2 at (100 + 200) / 2 tokens.
    assert "| mode | level 1 | level 2 | level 3 |" in md
    assert "| natural | 100.0 / 150 | 0.0 / 300 | 100.0 / 400 |" in md
    png = pathlib.Path(paths["plot"]).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    rows = [json.loads(x) for x in pathlib.Path(paths["responses"]).read_text().splitlines()]
    assert len(rows) == 4 + 4 + 3
    assert rows[1] == {"benchmark": "math500", "mode": "natural", "id": "1", "level": "1", "sample": 0,
                       "response": ok("0.5"), "tokens": 200, "extracted": "0.5", "correct": True}


def test_scalars_always_name_the_benchmark():
    summaries = [r.summary() for r in _fixed_results()]
    one = eval_run.scalars(summaries[:2])
    assert one["eval/math500/natural/accuracy"] == 75.0 and one["eval/math500/budget_64/mean_tokens"] == 25.0
    assert one["eval/math500/natural/level_1/accuracy"] == 100.0
    assert not any(k.startswith("eval/natural") for k in one)
    several = eval_run.scalars(summaries, prefix="eval_after")
    assert several["eval_after/aime25/natural/accuracy"] == pytest.approx(100 / 3)


def test_before_after_markdown():
    after = [r.summary() for r in _fixed_results()[:2]]
    before = [dict(s, accuracy=s["accuracy"] / 2, mean_tokens=2 * s["mean_tokens"],
                   by_level={k: dict(v, accuracy=0.0) for k, v in s["by_level"].items()}) for s in after]
    md = report.before_after_markdown(before, after)
    assert md.startswith("Accuracy % / mean response tokens (pass@1), before → after training.")
    # Every cell reads "before → after": natural 37.5% at 500 tokens -> 75% at 250 tokens.
    assert "| mode | math500 |" in md and "| natural | 37.5 / 500 → 75.0 / 250 |" in md
    assert "| budget_64 | 12.5 / 50 → 25.0 / 25 |" in md
    # The natural mode by level, before and after (level 1: 0/2, then 2/2 at (100 + 200) / 2 tokens).
    assert "| natural | 0.0 / 150 → 100.0 / 150 | 0.0 / 300 → 0.0 / 300 | 0.0 / 400 → 100.0 / 400 |" in md
    # The detail table lists both policies.
    assert "| before | math500 | natural | 4 × 1 | 37.5 |" in md and "| after | math500 | natural | 4 × 1 | 75.0 |" in md
    assert md == report.markdown(after, before=before) and "→" not in report.markdown(after)


def test_load_benchmarks_applies_the_one_prompt_filter():
    from hbpo_jax.tasks import arithmetic
    c = config_lib.base_config()
    c.task.name, c.rollout.budgets, c.eval.max_problems = "arithmetic", (16,), 5
    tok = _tokenizer()
    records = arithmetic.make_dataset(6, 3)
    records[1] = dict(records[1], problem="Compute " + "1+" * 300 + "1.")
    lengths = prompting.prompt_lengths(tok, [r["problem"] for r in records])
    c.rollout.max_prompt_len = int(sorted(lengths)[-2])  # only the long one is over
    e = spec.resolve_eval(c)
    [tiny] = eval_run.load_benchmarks(e, tok, tiny_records=records)  # default: the task's set
    assert tiny.name == "tiny" and len(tiny.records) == 4
    assert tiny.report.counts == {"over_max_problems": 1, "prompt_too_long": 1}
    # A system prompt counts: with a long one every prompt is over.
    c.rollout.system_prompt = "Think step by step. " * 50
    with pytest.raises(data.DataError, match="every prompt is longer"):
        eval_run.load_benchmarks(spec.resolve_eval(c), tok, tiny_records=records)
    c.rollout.system_prompt, c.eval.benchmarks = "", (f"aime25:{FIXTURES / 'aime25.jsonl'}",)
    [aime] = eval_run.load_benchmarks(spec.resolve_eval(c), tiny_records=records)  # eval.benchmarks first
    assert aime.name == "aime25"
    c.task.name, c.eval.benchmarks = "", ()
    with pytest.raises(ConfigError, match="eval.benchmarks is empty"):
        eval_run.load_benchmarks(spec.resolve_eval(c))


def _tokenizer():
    from hbpo_jax.tasks import arithmetic
    from hbpo_jax.tasks import tokenizer as tokenizer_lib
    return tokenizer_lib.build_tokenizer(arithmetic.corpus_texts(200, 0), vocab_size=128)


def _eval_setup():
    """An EvalSpec whose every sampling setting differs from the rollout's / the defaults, and the
    tiny benchmark of 3 problems."""
    from hbpo_jax.tasks import arithmetic
    tok = _tokenizer()
    c = config_lib.base_config()
    c.task.name, c.rollout.budgets = "arithmetic", (16,)
    c.rollout.max_response_len, c.eval.max_response_len = 64, 20
    # max_batch 2: every sampler call (2 problems x 2 samples in two chunks, or 1 x 2) has one shape.
    c.eval.batch_size, c.rollout.max_batch, c.eval.samples = 2, 2, 2
    c.eval.temperature, c.eval.top_p, c.eval.modes = 0.0, 0.5, ("natural", "fixed")
    c.rollout.system_prompt, c.rollout.prefix_in_response = "Be brief.", True
    c.grading.workers = 0
    e = spec.resolve_eval(c)
    return e, tok, eval_run.load_benchmarks(e, tok, tiny_records=arithmetic.make_dataset(3, 3))


SAMPLER_KEYS = ("max_response_len", "max_batch", "system_prompt", "samples_per_budget", "mode", "budgets",
                "prefix_in_response", "temperature", "top_p")


def _check_sampler_calls(calls):
    """What `_eval_setup`'s spec must reach the sampler as: the training loop's old before / after
    evaluation passed rollout.max_response_len (64), all problems in one call, max_batch 0 and no
    system prompt."""
    # 3 problems, eval.batch_size 2 per call: two calls per mode.
    assert [(x["mode"], x["problems"]) for x in calls] == [("natural", 2), ("natural", 1), ("fixed", 2), ("fixed", 1)]
    for x in calls:
        assert (x["max_response_len"], x["max_batch"], x["system_prompt"], x["samples_per_budget"]) == (
            20, 2, "Be brief.", 2)
        assert x["prefix_in_response"] and (x["temperature"], x["top_p"]) == (0.0, 0.5)
    assert [x["budgets"] for x in calls] == [(), (), (16,), (16,)]


def test_evaluate_passes_the_eval_spec_to_the_sampler(monkeypatch):
    e, tok, benchmarks = _eval_setup()
    calls = []

    def fake(policy, tokenizer, problems, settings, **kw):  # every response right, 7 tokens
        kw = dataclasses.asdict(settings)
        calls.append(dict(problems=len(problems), **{k: kw[k] for k in SAMPLER_KEYS}))
        rows = len(problems) * kw["samples_per_budget"]
        answers = [r["answer"] for r in benchmarks[0].records if r["problem"] in problems]
        return rollout.RolloutBatch(*[None] * 6, lengths=np.full(rows, 7, np.int32), prefix_lengths=None,
                                    budgets=None, prompt_index=None, stop_reason=None,
                                    texts=[ok(a) for a in answers for _ in range(kw["samples_per_budget"])],
                                    group_shape=None)

    monkeypatch.setattr(rollout, "budget_rollouts", fake)
    results = eval_run.evaluate(e, None, None, tok, benchmarks, jax.random.key(0), max_positions=4096)
    _check_sampler_calls(calls)
    assert [(r.benchmark, r.mode, r.budget) for r in results] == [("tiny", "natural", 0), ("tiny", "budget_16", 16)]
    assert all(r.correct.all() and r.correct.shape == (3, 2) and (r.tokens == 7).all() for r in results)
    # The response cap also leaves room in the model's positions for the longest prompt + prefix
    # (with the system prompt) of any mode.
    longest = max(len(p) + len(x) for m in e.modes for p, x in zip(*_layout(tok, benchmarks[0], m, e)))
    calls.clear()
    eval_run.evaluate(e, None, None, tok, benchmarks, jax.random.key(0), max_positions=longest + 15)
    assert {x["max_response_len"] for x in calls} == {15}


def _layout(tok, bench, mode, e):
    layout = prompting.build_prompts(tok, [r["problem"] for r in bench.records], budgets=mode.budget or None,
                                   mode=mode.mode, system_prompt=e.rollout.system_prompt)
    return layout.prompt_tokens, layout.prefix_tokens


@pytest.mark.slow
def test_evaluate_samples_a_model_as_the_eval_spec_says(monkeypatch):
    """The same settings through the real sampler on a tiny random Qwen2."""
    from hbpo_jax.models import ModelConfig, create_model
    e, tok, benchmarks = _eval_setup()
    cfg = ModelConfig(vocab_size=-(-len(tok) // 8) * 8, hidden_size=32, intermediate_size=64, num_layers=1,
                      num_heads=4, num_kv_heads=2, eos_token_ids=(tok.eos_token_id,))
    graphdef, params = nnx.split(create_model(cfg, seed=0))
    calls, real = [], rollout.budget_rollouts

    def spy(policy, tokenizer, problems, settings, **kw):
        calls.append(dict(problems=len(problems), **{k: getattr(settings, k) for k in SAMPLER_KEYS}))
        return real(policy, tokenizer, problems, settings, **kw)

    monkeypatch.setattr(rollout, "budget_rollouts", spy)
    results = eval_run.evaluate(e, graphdef, params, tok, benchmarks, jax.random.key(0))
    _check_sampler_calls(calls)
    assert [(r.benchmark, r.mode) for r in results] == [("tiny", "natural"), ("tiny", "budget_16")]
    prefix = len(tok(prompting.BUDGET_PREFIX.format(budget=16), add_special_tokens=False)["input_ids"])
    for r in results:
        assert r.correct.shape == r.tokens.shape == (3, 2) and (r.tokens <= 20).all()
    assert (results[1].tokens >= prefix).all()  # the pre-filled prefix is counted


def test_resolve_eval_names_the_eval_key():
    import sys
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
    from configs import tiny
    c = tiny.get_config()
    c.eval.modes = ("natural", "fixed:32", "l1")
    c.eval.benchmarks = ("tiny", "champ", "rg:basic_arithmetic", "math500:/data/m.jsonl")
    e = spec.resolve(c, num_devices=1).eval
    assert [m.name for m in e.modes] == ["natural", "budget_32"] + [f"l1_{b}" for b in c.rollout.budgets]
    assert e.benchmarks[2] == ("rg", "basic_arithmetic") and e.rollout.max_response_len == c.eval.max_response_len
    for key, value, match in (("modes", ("natural", "greedy"), "eval.modes"),
                              ("benchmarks", ("mmlu:/x",), "eval.benchmarks"),
                              ("max_problems", -1, "eval.max_problems"),
                              ("samples", 0, "eval.samples"),
                              ("every", -2, "eval.every")):
        bad = tiny.get_config()
        bad.eval[key] = value
        with pytest.raises(ConfigError, match=match):
            spec.resolve(bad, num_devices=1)
    bad = tiny.get_config()
    bad.task.name, bad.eval.every = "", 5
    with pytest.raises(ConfigError, match="eval.every > 0 needs eval.benchmarks"):
        spec.resolve_eval(bad)


def test_a_reasoning_gym_scorer_that_raises_scores_zero_and_is_logged(caplog):
    rg = sets.load("rg:basic_arithmetic", size=2, seed=1)
    source = rg_tasks.ReasoningGym(("basic_arithmetic",), size=2, seed=1)
    record = source.records()[0][0]
    dataset = source._datasets["basic_arithmetic"]
    dataset.score_answer = lambda *a, **k: 1 / 0  # a scorer bug on hostile text
    with caplog.at_level("ERROR"):
        assert source.score(record, "anything") == 0.0
    assert "score_answer failed" in caplog.text and rg.records
