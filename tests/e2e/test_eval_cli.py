"""launch/eval.py end to end on a tiny model trained here (with a periodic evaluation every step),
on the tiny task and a fixture file: the four output files exist and agree with each other."""
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures"
EVAL = ["--config.rollout.max_prompt_len=256", "--config.eval.max_response_len=24",
        "--config.eval.temperature=0.0", "--config.eval.max_problems=6"]


@pytest.fixture(scope="module")
def run_dir(tiny_run, tmp_path_factory):
    """A 1-step tiny run with its HF export and eval.every=1 (natural + one budget)."""
    workdir = tmp_path_factory.mktemp("run")
    tiny_run.run(workdir, 1, "--config.train.export_hf=True", "--config.eval.every=1",
             "--config.eval.modes=('natural','fixed:16')", *EVAL)
    return workdir


def _eval(tiny_run, checkpoint, out, *extra, workdir=None):
    shape = [a for a in tiny_run.args if a.startswith(("--config.model.", "--config.task.", "--config.rollout."))]
    cmd = [sys.executable, str(ROOT / "launch" / "eval.py"), f"--config={ROOT / 'configs' / 'tiny.py'}",
           f"--checkpoint={checkpoint}", f"--out={out}", *shape, *EVAL, *extra]
    if workdir:
        cmd.append(f"--workdir={workdir}")
    return subprocess.run(cmd, cwd=ROOT, env=tiny_run.env(), capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_periodic_eval_logs_scalars(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # One naming scheme: eval/<benchmark>/<mode>/..., the benchmark named even when it is the only one.
    evals = {r["step"]: r for r in rows if "eval/tiny/natural/accuracy" in r}
    assert sorted(evals) == [1]
    assert 0 <= evals[1]["eval/tiny/natural/accuracy"] <= 100 and evals[1]["eval/tiny/budget_16/mean_tokens"] > 0
    assert "eval/tiny/natural/level_1/accuracy" in evals[1] or "eval/tiny/natural/level_2/accuracy" in evals[1]
    assert not any(k.startswith("eval/natural/") for r in rows for k in r)
    step1 = json.loads((run_dir / "eval" / "step_1.json").read_text())
    assert [(s["benchmark"], s["mode"]) for s in step1["results"]] == [("tiny", "natural"), ("tiny", "budget_16")]
    assert step1["results"][0]["accuracy"] == evals[1]["eval/tiny/natural/accuracy"]
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_eval_cli_on_the_export(tiny_run, run_dir, tmp_path):
    done = _eval(tiny_run, run_dir / "export", tmp_path, "--config.eval.modes=('natural','efficiency','fixed:32')",
                 f"--config.eval.benchmarks=('tiny','math500:{FIXTURES / 'math500.jsonl'}')")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| mode | tiny | math500 | mean |" in done.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["meta"]["checkpoint_kind"] == "hf"
    assert "answer_missing=1" in results["skipped"]["math500"]
    rows = [json.loads(x) for x in (tmp_path / "responses.jsonl").read_text().splitlines()]
    assert len(rows) == 3 * (6 + 4)  # 3 modes x (6 tiny problems + 4 usable math500 rows)
    for s in results["results"]:
        mine = [r for r in rows if r["benchmark"] == s["benchmark"] and r["mode"] == s["mode"]]
        assert s["accuracy"] == pytest.approx(100 * np.mean([r["correct"] for r in mine]))
        assert s["mean_tokens"] == pytest.approx(np.mean([r["tokens"] for r in mine]))
        assert s["median_tokens"] == pytest.approx(np.median([r["tokens"] for r in mine]))
        assert all(0 < r["tokens"] <= 24 for r in mine)
    tiny = next(s for s in results["results"] if s["benchmark"] == "tiny")
    assert set(tiny["by_level"]) <= {"1", "2", "3", "4"} and tiny["by_level"]
    assert sum(v["problems"] for v in tiny["by_level"].values()) == 6
    assert (tmp_path / "results.md").read_text().startswith("Accuracy % / mean response tokens")
    assert (tmp_path / "accuracy_vs_tokens.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_eval_cli_on_the_workdir_matches_the_periodic_eval(tiny_run, run_dir, tmp_path):
    """The workdir's newest training checkpoint (step 1) holds the final parameters, which the
    periodic eval at step 1 scored with the same greedy settings: the same numbers."""
    done = _eval(tiny_run, run_dir, tmp_path, "--config.eval.modes=('natural',)")
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads((tmp_path / "results.json").read_text())
    assert got["meta"]["checkpoint_kind"] == "train_step" and got["meta"]["checkpoint"].endswith("checkpoints/1")
    want = json.loads((run_dir / "eval" / "step_1.json").read_text())["results"][0]
    for key in ("accuracy", "mean_tokens", "median_tokens", "problems"):
        assert got["results"][0][key] == pytest.approx(want[key]), key


def test_eval_cli_missing_benchmark_file(tiny_run, tmp_path):
    done = _eval(tiny_run, tmp_path / "no-checkpoint", tmp_path, f"--config.eval.benchmarks=('gsm8k:{tmp_path / 'gsm8k.jsonl'}',)")
    assert done.returncode != 0
    assert f"Data file '{tmp_path / 'gsm8k.jsonl'}' does not exist" in done.stderr


def test_eval_cli_reports_a_config_error_in_one_line(tiny_run, tmp_path):
    """cli.run: a bad eval setting is one sentence naming the key, exit status 2, before any load."""
    done = _eval(tiny_run, tmp_path / "no-checkpoint", tmp_path, "--config.eval.modes=('natural','greedy')")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("eval.py: ConfigError: eval.modes:")
