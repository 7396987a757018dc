"""hbpo_jax.train.ablation: variant configs, the shared warm start and "before" evaluation, the table."""
import json
import pathlib

import pytest

from hbpo_jax import spec
from hbpo_jax.errors import ConfigError
from hbpo_jax.eval import scoring as evaluation
from hbpo_jax.tasks import sft
from hbpo_jax.train import ablation
from hbpo_jax.train.ablation import Variant

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _tiny():
    return ablation.load_config(str(ROOT / "configs" / "tiny.py"))


def test_variant_config_sets_budgets_objective_and_shares_the_warm_start_budgets():
    base = _tiny()
    two = ablation.variant_config(base, Variant("two", budgets=(32, 160)), {"train.steps": 3})
    assert two.rollout.budgets == (32, 160) and two.rollout.mode == "budget" and two.objective.name == "hbpo"
    assert two.task.sft_budgets == tuple(base.rollout.budgets)
    assert two.train.steps == 3 and two.eval.before_after and not two.train.export_hf
    assert two.eval.modes == ("natural",)
    cos = ablation.variant_config(base, Variant("cos", "cosine", rollout_mode="natural",
                                                eval_modes=("natural", "fixed")))
    assert cos.rollout.budgets == (160,)  # one group of all rollouts
    assert cos.objective.name == "cosine" and cos.rollout.mode == "natural"
    assert ablation.mode_names(cos) == ["natural", "budget_160"]
    for c in (two, cos):
        spec.resolve(c, num_devices=1)
    assert base.train.steps != 3 and base.rollout.mode is None  # the base is not modified
    # Without a rollout mode, the variant trains with its objective's own prompting.
    assert ablation.variant_config(base, Variant("classic", "classic")).rollout.mode == "natural"
    assert ablation.variant_config(base, Variant("l1", "l1_exact")).rollout.mode == "l1"


def test_run_variants_rejects_bad_variants_before_running(tmp_path):
    with pytest.raises(ValueError, match="distinct"):
        ablation.run_variants(_tiny(), [Variant("a"), Variant("a")], str(tmp_path))
    with pytest.raises(ValueError, match="distinct"):
        ablation.run_variants(_tiny(), [Variant("warmstart")], str(tmp_path))
    with pytest.raises(ConfigError, match="rollouts_per_prompt"):
        ablation.run_variants(_tiny(), [Variant("three", budgets=(32, 64, 128))], str(tmp_path))
    assert not list(tmp_path.iterdir())


def _summary(mode, accuracy, tokens):
    return {"mode": mode, "accuracy": accuracy, "mean_tokens": tokens, "format_error_rate": 0.0,
            "by_level": {"1": {"accuracy": accuracy, "mean_tokens": tokens}}}


def test_markdown_table_compares_every_run_with_the_warm_start():
    results = {
        "warm_start": {"seconds": 1.0, "before": [_summary("natural", 95.0, 100.0),
                                                   _summary("budget_32", 90.0, 98.0)]},
        "runs": [dict(name="hbpo-4", objective="hbpo", budgets=[32, 64], rollout_mode="budget",
                      after=[_summary("natural", 90.0, 75.0), _summary("budget_32", 85.0, 50.0)]),
                 dict(name="classic", objective="classic", budgets=[160], rollout_mode="natural",
                      after=[_summary("natural", 97.5, 110.0)])]}
    rows = ablation.natural_rows(results)
    assert [(r["name"], r["accuracy"], r["mean_tokens"]) for r in rows] == [
        ("warm start", 95.0, 100.0), ("hbpo-4", 90.0, 75.0), ("classic", 97.5, 110.0)]
    table = ablation.markdown_table(results)
    assert "| hbpo-4 | hbpo | 32/64 | 90.0% | 75.0 | -5.0 | -25% | 90% / 75 |" in table
    assert "| classic | classic | – | 97.5% | 110.0 | +2.5 | +10% | 98% / 110 |" in table
    assert "| hbpo-4 | budget_32 | 85.0% (90.0%) | 50.0 (98.0) |" in table


@pytest.mark.slow
def test_run_variants_trains_the_warm_start_once_and_reuses_its_evaluation(tmp_path, monkeypatch):
    calls = {"sft": 0, "eval": []}
    sft_train, score = sft.sft_train, evaluation.score

    def counting_sft(*args, **kwargs):
        calls["sft"] += 1
        return sft_train(*args, **kwargs)

    def counting_eval(*args, **kwargs):
        result = score(*args, **kwargs)
        calls["eval"].append(result.mode)
        return result

    monkeypatch.setattr(sft, "sft_train", counting_sft)
    monkeypatch.setattr(evaluation, "score", counting_eval)
    overrides = {
        "task.sft_steps": 5, "task.sft_examples": 100, "task.eval_problems": 8, "task.train_problems": 32,
        "model.num_layers": 1, "model.hidden_size": 64, "model.intermediate_size": 128, "model.head_dim": 16,
        "rollout.budgets": (16, 32), "task.sft_budget_scales": (0.5, 1.0), "rollout.rollouts_per_prompt": 4, "rollout.max_response_len": 48,
        "objective.l_max": 48, "train.steps": 1, "train.prompts_per_step": 4,
        "train.micro_batch_size": 8, "train.checkpoint_every": 1}
    # (A one-budget variant runs in the budget-ablation notebook's test.)
    variants = [Variant("both", budgets=(16, 32), eval_modes=("natural", "fixed")),
                Variant("classic", "classic", rollout_mode="natural")]
    out = ablation.run_variants(_tiny(), variants, str(tmp_path), overrides=overrides, log=lambda s: None)

    assert calls["sft"] == 1
    # "both": before and after in natural + 2 budget modes; "classic": after, natural only.
    assert calls["eval"] == ["natural", "budget_16", "budget_32"] * 2 + ["natural"]
    assert [r["before_reused"] for r in out["runs"]] == [False, True]
    first = json.loads((tmp_path / "both" / "results.json").read_text())["before"]
    assert json.loads((tmp_path / "classic" / "results.json").read_text())["before"] == first[:1]
    assert len(list((tmp_path / "classic").glob("tokenizer-*"))) == 1  # the shared tokenizer, not rebuilt
    assert out["warm_start"]["before"] == first
    assert json.loads((tmp_path / "ablation.json").read_text()) == out
    assert "| classic | classic | – |" in (tmp_path / "ablation.md").read_text()

    again = ablation.run_variants(_tiny(), variants, str(tmp_path), overrides=overrides, log=lambda s: None)
    assert calls["sft"] == 1 and len(calls["eval"]) == 7  # finished runs are not repeated
    assert again == out
