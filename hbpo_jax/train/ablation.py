"""Ablations on one shared starting policy: variants of a base config (budget sets, objectives,
rollout modes) trained one after another with `loop.run`, then one table of their evaluations
(the paper's ablations of budget sets and reward types, arXiv 2507.15844).

    results = ablation.run_variants(tiny.get_config(), [Variant("hbpo-4", budgets=(32, 64, 128, 160)),
                                                        Variant("classic", "classic")],
                                    "runs/ablation", overrides={"train.steps": 10})
    print(ablation.markdown_table(results))

Layout of `workdir`: `warmstart/` (the tiny task's tokenizer and SFT model, trained once), one
folder per variant (a normal run workdir: checkpoints, metrics.jsonl, results.json), and
`ablation.json` / `ablation.md` with every run's evaluation. Re-running skips finished variants.

Sharing: every variant builds its tokenizer and warm start for the base config's budgets
(task.sft_budgets), so the SFT model cached in `warmstart/` is valid for all of them and is copied
into each run's workdir, where the training loop finds it (tasks.warmstart). The first variant
evaluates the starting policy ("before"); a later variant whose evaluation modes it covers
reuses that (eval.reuse_before) instead of evaluating the same model again.
"""
from __future__ import annotations

import copy
import dataclasses
import glob
import importlib.util
import os
import shutil
import time
from typing import Callable, Sequence

from hbpo_jax import cli, files, objectives
from hbpo_jax import spec as spec_lib
from hbpo_jax.eval import report
from hbpo_jax.eval.scoring import sort_levels

NO_BUDGET_MODES = ("natural", "efficiency")


@dataclasses.dataclass(frozen=True)
class Variant:
    """One run of an ablation.

    name: its folder under the ablation workdir and its row in the table.
    objective: an objectives.OBJECTIVES name (objective.name).
    budgets: rollout.budgets; () keeps the base config's. In a rollout mode without budget prompts
      (natural, efficiency) only the number of rollouts matters: one budget, the largest, is kept
      so that every rollout of a prompt is one group.
    rollout_mode: rollout.mode; None: the objective's own (objectives.OBJECTIVES: "budget" for HBPO,
      "natural" for budget-blind rewards such as classic and cosine).
    eval_modes: eval.modes after training ("fixed": each of the variant's budgets).
    """

    name: str
    objective: str = "hbpo"
    budgets: tuple[int, ...] = ()
    rollout_mode: str | None = None

    @property
    def mode(self) -> str:
        """The rollout mode the variant trains with."""
        return self.rollout_mode or objectives.get_objective(self.objective).prompting
    eval_modes: tuple[str, ...] = ("natural",)


def load_config(path: str, arg: str | None = None):
    """`get_config(arg)` of a config file; a relative path that is not found from the working
    directory is looked up in the repository root (cli.find_config)."""
    path = cli.find_config(path)
    spec = importlib.util.spec_from_file_location(f"_config_{os.path.basename(path)[:-3]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def variant_config(base, variant: Variant, overrides: dict | None = None):
    """A copy of `base` with `overrides` ({"train.steps": 10, ...}) and the variant's settings.

    Evaluation is before/after (results.json), without the Hugging Face export.
    """
    c = copy.deepcopy(base)
    if overrides:
        c.update_from_flattened_dict(dict(overrides))
    base_budgets = tuple(c.rollout.budgets)
    if not tuple(c.task.sft_budgets):
        c.task.sft_budgets = base_budgets
    budgets = tuple(variant.budgets) or base_budgets
    if variant.mode in NO_BUDGET_MODES:
        budgets = budgets[-1:]
    c.rollout.budgets = budgets
    c.rollout.mode = variant.mode
    c.objective.name = variant.objective
    c.eval.before_after = True
    c.eval.modes = tuple(variant.eval_modes)
    c.train.export_hf = False
    c.name = f"{c.name}-{variant.name}"
    return c


def mode_names(config) -> list[str]:
    """The evaluation mode names that `config`'s evaluation produces, in order."""
    return [m.name for m in spec_lib.resolve_eval(config).modes]


def warm_start(config, workdir: str) -> float:
    """Builds the tokenizer and the SFT warm start of `config` in `workdir` (once; cached there).
    Returns the seconds it took (0 when it was cached or the config starts from model_path)."""
    from hbpo_jax.tasks import warmstart
    if config.task.name != "arithmetic" or os.path.isdir(os.path.join(workdir, "warmstart", "params")):
        return 0.0
    os.makedirs(workdir, exist_ok=True)
    t0 = time.perf_counter()
    # The builder the loop uses for the arithmetic task: the cache it leaves is the one the runs copy.
    spec = spec_lib.resolve(config)
    warmstart.arithmetic_policy(spec, workdir, spec.mesh.make(), spec.mesh.rules)
    return time.perf_counter() - t0


def _copy_warm_start(src: str, dst: str) -> None:
    os.makedirs(dst, exist_ok=True)
    for path in [os.path.join(src, "warmstart")] + glob.glob(os.path.join(src, "tokenizer-*")):
        target = os.path.join(dst, os.path.basename(path))
        if os.path.isdir(path) and not os.path.exists(target):
            shutil.copytree(path, target)


def _read(path: str) -> dict:
    return files.read_json(path) if os.path.exists(path) else {}


def run_variants(base, variants: Sequence[Variant], workdir: str, *, overrides: dict | None = None,
                 log: Callable[[str], None] = print) -> dict:
    """Trains every variant of `base` from one shared starting policy and evaluates it.

    Every config is validated before anything runs. Returns (and writes to
    <workdir>/ablation.json, with a markdown table in ablation.md):
      {"warm_start": {"seconds": SFT seconds, "before": [BenchmarkResult.summary() of the first run]},
       "runs": [{"name", "objective", "budgets", "rollout_mode", "seconds", "before_reused",
                 "after": [BenchmarkResult.summary(), ...]}, ...]}
    """
    from hbpo_jax.train import loop
    if not variants:
        raise ValueError("run_variants needs at least one variant.")
    names = [v.name for v in variants]
    if len(set(names)) != len(names) or any(not n or os.sep in n or n == "warmstart" for n in names):
        raise ValueError(f"variant names must be distinct folder names other than 'warmstart', got {names}.")
    configs = [variant_config(base, v, overrides) for v in variants]
    for c in configs:
        spec_lib.resolve(c)
    os.makedirs(workdir, exist_ok=True)
    shared = os.path.join(workdir, "warmstart")
    previous = _read(os.path.join(workdir, "ablation.json"))
    sft_seconds = warm_start(configs[0], shared) or previous.get("warm_start", {}).get("seconds", 0.0)
    if sft_seconds:
        log(f"warm start: {sft_seconds:.0f}s")

    runs, reference = [], None
    done_before = {r["name"]: r for r in previous.get("runs", [])}
    for variant, c in zip(variants, configs):
        run_dir = os.path.join(workdir, variant.name)
        results_path = os.path.join(run_dir, "results.json")
        results = _read(results_path)
        entry = dict(name=variant.name, objective=variant.objective, budgets=list(c.rollout.budgets),
                     rollout_mode=variant.mode)
        if "after" in results:
            log(f"{variant.name}: already done")
            entry.update(seconds=done_before.get(variant.name, {}).get("seconds", float("nan")),
                         before_reused=done_before.get(variant.name, {}).get("before_reused", False))
        else:
            _copy_warm_start(shared, run_dir)
            wanted = mode_names(c)
            entry["before_reused"] = done_before.get(variant.name, {}).get("before_reused", False)
            if "before" in results:  # an interrupted run: its own (or already reused) "before"
                c.eval.reuse_before = True
            elif reference is not None:
                have = report.by_key(reference)  # the first run's "before", by (benchmark, mode)
                benches = list(dict.fromkeys(b for b, _ in have))
                if all((b, m) in have for b in benches for m in wanted):
                    files.write_json(results_path, {"before": [have[(b, m)] for b in benches for m in wanted]})
                    c.eval.reuse_before = True
                    entry["before_reused"] = True
            log(f"{variant.name}: {c.objective.name}, budgets {tuple(c.rollout.budgets)}, "
                f"{c.rollout.mode} rollouts, {c.train.steps} steps ...")
            t0 = time.perf_counter()
            loop.run(c, run_dir)
            entry["seconds"] = time.perf_counter() - t0
            log(f"{variant.name}: done in {entry['seconds']:.0f}s")
            results = _read(results_path)
        entry["after"] = results["after"]
        if reference is None:
            reference = results["before"]
        runs.append(entry)

    out = {"warm_start": {"seconds": sft_seconds, "before": reference}, "runs": runs}
    files.write_json(os.path.join(workdir, "ablation.json"), out)
    with open(os.path.join(workdir, "ablation.md"), "w") as f:
        f.write(markdown_table(out) + "\n")
    return out


def natural_rows(results: dict) -> list[dict]:
    """One row per policy, the warm start first: {name, objective, budgets, accuracy, mean_tokens,
    by_level} of natural-mode evaluation (accuracy in %)."""
    def row(name, objective, budgets, summaries):
        s = next(x for x in summaries if x["mode"] == "natural")
        return dict(name=name, objective=objective, budgets=budgets, accuracy=s["accuracy"],
                    mean_tokens=s["mean_tokens"], by_level=s["by_level"])
    rows = [row("warm start", "sft", [], results["warm_start"]["before"])]
    rows += [row(r["name"], r["objective"], r["budgets"] if r["rollout_mode"] == "budget" else [], r["after"])
             for r in results["runs"]]
    return rows


def markdown_table(results: dict) -> str:
    """Natural mode per policy (accuracy, mean tokens, change against the warm start, per level),
    then every budget prompt that a run evaluated (report.table builds both)."""
    rows = natural_rows(results)
    levels = sort_levels({lv for r in rows for lv in r["by_level"]})
    head = ["run", "objective", "budgets", "accuracy", "mean tokens", "Δ accuracy", "Δ tokens"]
    head += [f"level {lv} acc / tokens" for lv in levels]
    warm = rows[0]
    lines = report.table(head, ([
        r["name"], r["objective"], "/".join(map(str, r["budgets"])) or report.NONE,
        f"{r['accuracy']:.1f}%", f"{r['mean_tokens']:.1f}", f"{r['accuracy'] - warm['accuracy']:+.1f}",
        f"{100 * (r['mean_tokens'] / warm['mean_tokens'] - 1):+.0f}%" if warm["mean_tokens"] else report.NONE,
        *(_level_cell(r["by_level"].get(lv)) for lv in levels)] for r in rows))
    prompted = [(r["name"], s) for r in results["runs"] for s in r["after"] if s["mode"] != "natural"]
    if prompted:
        before = report.by_key(results["warm_start"]["before"])
        lines += [""] + report.table(["run", "prompt", "accuracy (warm start)", "mean tokens (warm start)"], (
            [name, s["mode"], f"{s['accuracy']:.1f}%{_paren(b, 'accuracy', '.1f', '%')}",
             f"{s['mean_tokens']:.1f}{_paren(b, 'mean_tokens', '.1f')}"]
            for name, s in prompted for b in [before.get((s.get("benchmark", ""), s["mode"]))]))
    return "\n".join(lines)


def _level_cell(v: dict | None) -> str:
    return f"{v['accuracy']:.0f}% / {v['mean_tokens']:.0f}" if v else report.NONE


def _paren(s: dict | None, key: str, fmt: str, unit: str = "") -> str:
    """" (value)" of the warm start's number, or nothing when it was not evaluated."""
    return f" ({s[key]:{fmt}}{unit})" if s else ""
