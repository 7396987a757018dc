"""Writes the notebooks of this folder from the cell sources below (the reviewable form).

    python notebooks/make_notebooks.py            # rewrites every notebook, without outputs
    python notebooks/make_notebooks.py --check    # exit 1 if a notebook's cells differ from here

Edit the cells here, not in Jupyter, then re-run this script. tests/test_notebooks.py executes
the notebooks in smoke mode (HBPO_SMOKE=1).
"""
from __future__ import annotations

import pathlib
import sys

import nbformat
from nbformat import v4

HERE = pathlib.Path(__file__).resolve().parent

# The same first cell in every notebook: on Colab, install hbpo-jax from its repository; elsewhere
# (a checkout installed with `pip install -e .`) do nothing. JAX then uses a TPU when one is attached.
INSTALL = '''\
# Colab: clone and install hbpo-jax (elsewhere: nothing; install the checkout with `pip install -e .`).
REPO_URL = "https://github.com/OWNER/hbpo-jax"  # the project's repository, or your fork
import importlib.util, os, subprocess, sys
if importlib.util.find_spec("google.colab") is not None:
    repo = "/content/hbpo-jax"
    if not os.path.isdir(repo):
        subprocess.run(["git", "clone", "--depth=1", REPO_URL, repo], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", repo], check=True)
    sys.path.insert(0, repo)  # importable now, without restarting the runtime
    if "COLAB_TPU_ADDR" in os.environ:  # a legacy "TPU node" runtime needs an explicit setup
        import jax.tools.colab_tpu
        jax.tools.colab_tpu.setup_tpu()
import jax
# A Colab TPU VM runtime shows up here as TpuDevice entries and becomes the default backend.
print(jax.default_backend(), jax.devices())'''


def _parameters(source: str):
    """A parameter cell: papermill injects its overrides after the cell tagged `parameters`."""
    return v4.new_code_cell(source, metadata={"tags": ["parameters"]})


def loss_playground():
    md, code = v4.new_markdown_cell, v4.new_code_cell
    return [
        md("""# HBPO loss playground

The pure loss functions of `hbpo_jax.loss`, called directly: the budget-aware reward per budget
against the related rewards, the hierarchical advantages of example groups and how they differ
from GRPO's, and the clipped policy loss. Runs on a CPU or a Colab TPU in seconds."""),
        code(INSTALL),
        _parameters("""\
import os
SMOKE = os.environ.get("HBPO_SMOKE", "0") == "1"  # coarser curves (the test suite sets HBPO_SMOKE=1)
budgets = (512, 1024, 2048, 2560)  # the paper's budget set (arXiv 2507.15844)
l_max = 4096"""),
        code("""\
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from hbpo_jax import loss

n = jnp.arange(0, l_max + 1, 32 if SMOKE else 1)
ones = jnp.ones_like(n, bool)
fig, axes = plt.subplots(1, 2, figsize=(13, 4))
for b in budgets:
    r = loss.budget_reward(ones, ones, n, jnp.full_like(n, b), l_max=l_max)
    axes[0].plot(n, r, label=f"budget {b}  (ceiling f2 = {float(loss.budget_ceiling(b, l_max=l_max)):.3f})")
axes[0].set(xlabel="response tokens n", ylabel="reward of a correct answer",
            title="HBPO budget reward (code variant)")
b = budgets[1]
axes[1].plot(n, loss.budget_reward(ones, ones, n, jnp.full_like(n, b), l_max=l_max), label=f"HBPO, budget {b}")
axes[1].plot(n, loss.cosine_reward(ones, ones, n, l_max=l_max), label="cosine (Yeo et al.)")
axes[1].plot(n, loss.l1_max_reward(ones, ones, n, jnp.full_like(n, b)), label=f"L1-Max, N = {b}")
axes[1].plot(n, loss.classic_reward(ones, ones), label="classic 0/1")
axes[1].set(xlabel="response tokens n", title="related rewards of a correct answer")
for ax in axes:
    ax.axhline(0, color="gray", lw=0.5)
    ax.legend(fontsize=8)
plt.show()"""),
        md("""The worked example of the paper's method: one prompt, 16 correct responses, each exactly at
its budget (so R = f2(b)). The intra term is 0 and the inter term favours the short budgets."""),
        code("""\
group = jnp.repeat(jnp.asarray(budgets), 4)[None]           # [1 prompt, 16]
rewards = loss.budget_ceiling(group, l_max=l_max)
adv = loss.hierarchical_advantages(rewards, group, l_max=l_max)
for b in budgets:
    print(f"budget {b:5d}: advantage {float(adv[0][group[0] == b][0]):+.3f}")"""),
        md("""Example groups of 16 responses (4 per budget, random lengths): all wrong, about half right,
all right. HBPO's advantage is one scalar per response, split below into its inter-group part
(the GRPO-like normalised reward) and the intra-budget part (subgroup mean minus the budget's
ceiling, ≤ 0). An all-wrong group still gets a gradient under HBPO (A = −f2(b)); under GRPO it
gets none."""),
        code("""\
rng = np.random.default_rng(0)
lengths = jnp.asarray(rng.integers(200, l_max, size=(3, 16)))
correct = jnp.asarray([[False] * 16, rng.random(16) < 0.5, [True] * 16])
budgets_g = jnp.tile(group, (3, 1))
r = loss.budget_reward(correct, jnp.ones_like(correct), lengths, budgets_g, l_max=l_max)
hbpo = loss.hierarchical_advantages(r, budgets_g, l_max=l_max)
inter = loss.grpo_advantages(r)                 # the inter-group term
intra = hbpo - inter                            # w_intra * (subgroup mean - f2(b))
grpo = loss.grpo_advantages(correct.astype(jnp.float32))
fig, axes = plt.subplots(2, 3, figsize=(13, 6), sharex=True)
x = np.arange(16)
for i, name in enumerate(["all wrong", "half right", "all right"]):
    ax = axes[0, i]
    ax.bar(x - 0.2, hbpo[i], 0.4, label="HBPO")
    ax.bar(x + 0.2, grpo[i], 0.4, label="GRPO (0/1 reward)")
    ax.set(title=f"{name}: advantages")
    ax = axes[1, i]
    ax.bar(x, inter[i], 0.8, label="inter (whole group)")
    ax.bar(x, intra[i], 0.8, bottom=np.minimum(inter[i], 0), label="intra (own budget)")
    ax.set(title=f"{name}: HBPO's two terms", xlabel="response (budgets 512 | 1024 | 2048 | 2560)")
    ax.plot(x, 2 * correct[i] - 1, "k.", label="right (+1) / wrong (-1)")
axes[0, 0].set_ylabel("advantage")
axes[1, 0].set_ylabel("advantage")
axes[0, 0].legend(fontsize=8)
axes[1, 0].legend(fontsize=8)
plt.tight_layout()
plt.show()
print("all-wrong HBPO advantages per budget:", np.unique(np.round(np.asarray(hbpo[0]), 3)))"""),
        code("""\
# The clipped policy loss on random log-probs, with its clip fractions.
key = jax.random.key(0)
logp = jax.random.normal(key, (16, 64)) * 0.1 - 2.0
old = logp + jax.random.normal(jax.random.fold_in(key, 1), (16, 64)) * 0.2
value, metrics = loss.policy_loss(logp, old, hbpo[1], jnp.ones((16, 64), bool))
print(f"loss {float(value):.4f}", {k: round(float(v), 4) for k, v in metrics.items()})"""),
    ]


def budget_ablation():
    md, code = v4.new_markdown_cell, v4.new_code_cell
    return [
        md("""# HBPO ablations at tiny scale: how many budgets, which reward

The paper's two ablations (arXiv 2507.15844, "Ablations") on the embedded tiny task (`configs/tiny.py`:
synthetic arithmetic, a 3-layer Qwen2, L_max = 256 response tokens, budgets scaled 1/16 from
the paper's 512 / 1024 / 2048 / 2560):

* **budget sets** — HBPO with one budget, two budgets and four budgets;
* **reward type** — classic 0/1 and cosine rewards (GRPO advantages) against HBPO's.

Every run starts from **one** supervised warm start, trained once and copied into each run's
workdir, runs `configs/tiny.py`'s RL phase (16 rollouts per prompt in every run, so each budget
set divides them) and is then evaluated greedily in natural mode (nothing pre-filled). The
four-budget run also evaluates each budget prompt. The warm start is evaluated once (by the
first run) and every other run reuses that evaluation.

Time: smoke mode (`HBPO_SMOKE=1`) about a minute on a CPU. The full run, measured on a free
2-core CPU: 19.3 minutes (SFT 3.2 min, the first run 3.8 min with its before/after evaluation
in five modes, each later run 2.6-3.6 min; see `seconds` below); minutes on a Colab TPU. Runs 2-5 load the
first run's compiled programs from the persistent compilation cache in WORKDIR."""),
        code(INSTALL),
        _parameters("""\
import os
SMOKE = os.environ.get("HBPO_SMOKE", "0") == "1"  # tiny numbers, same code path (the test suite sets it)
WORKDIR = os.environ.get("HBPO_ABLATION_DIR", "runs/budget_ablation")  # re-running skips finished runs
CONFIG = "configs/tiny.py\""""),
        md("""### The runs

Budget sets: four budgets are the tiny run's (32, 64, 128, 160); two are (32, 160), the paper's
{512, 2560}; one is (96,), the paper's {1536}. With 16 rollouts per prompt that is 16, 8 and 4
rollouts per budget.

**Classic and cosine sample in natural mode** (no budget sentence pre-filled), with the same
prompts, rollouts per prompt, optimiser and loss settings as HBPO. Their rewards do not look at
the budget, so budget-prefixed rollouts would give the model no reason to tell the prefixes
apart: the prefix would only shift which lengths get compared within a group. Natural mode is
how these baselines are defined (GRPO with a 0/1 reward; Yeo et al.'s cosine length reward) and
it is the mode this notebook evaluates, so they are trained on the very distribution they are
judged on, while HBPO must carry what it learns under budget prompts over to natural mode — the
paper's claim. `Variant(..., rollout_mode="budget")` gives the other protocol."""),
        code("""\
from hbpo_jax.eval import ablation
from hbpo_jax.eval.ablation import Variant

VARIANTS = [
    # The first run evaluates the warm start ("before") in every mode a later run needs.
    Variant("hbpo-4-budgets", "hbpo", budgets=(32, 64, 128, 160), eval_modes=("natural", "fixed")),
    Variant("hbpo-2-budgets", "hbpo", budgets=(32, 160)),
    Variant("hbpo-1-budget", "hbpo", budgets=(96,)),
    Variant("classic", "classic", rollout_mode="natural"),
    Variant("cosine", "cosine", rollout_mode="natural"),
]
# Full run: configs/tiny.py's SFT and RL (36 RL steps per run), evaluation on 192 problems (not
# 384), so that five runs fit in 30 minutes on a 2-core CPU.
OVERRIDES = {"task.eval_problems": 192}
if SMOKE:
    OVERRIDES.update({"model.num_layers": 1, "task.sft_steps": 10, "task.sft_examples": 200,
                      "train.steps": 2, "train.prompts_per_step": 4, "train.micro_batch_size": 16,
                      "rollout.rollouts_per_prompt": 8,
                      "task.eval_problems": 8})
print(OVERRIDES)"""),
        code("""\
ablation.use_compilation_cache(os.path.join(WORKDIR, "jax_cache"))  # runs 2-5 reuse run 1's programs
results = ablation.run_variants(ablation.load_config(CONFIG), VARIANTS, WORKDIR, overrides=OVERRIDES)
print("seconds:", {"warm start": round(results["warm_start"]["seconds"])}
      | {r["name"]: round(r["seconds"]) for r in results["runs"]})"""),
        md("""### Results

Natural mode (nothing pre-filled), greedy decoding, the same problems for every policy.
Δ against the warm start. Also in `WORKDIR/ablation.md` and `WORKDIR/ablation.json`."""),
        code("""\
from IPython.display import Markdown, display

display(Markdown(ablation.markdown_table(results)))"""),
        code("""\
import matplotlib.pyplot as plt

rows = ablation.natural_rows(results)
style = {"sft": ("black", "s"), "hbpo": ("tab:blue", "o"), "classic": ("tab:orange", "^"),
         "cosine": ("tab:green", "v")}
fig, ax = plt.subplots(figsize=(7, 4.5))
for r in rows:
    color, marker = style.get(r["objective"], ("gray", "x"))
    ax.scatter(r["mean_tokens"], r["accuracy"], color=color, marker=marker, s=60)
    ax.annotate(r["name"], (r["mean_tokens"], r["accuracy"]), textcoords="offset points", xytext=(5, 4),
                fontsize=8)
ax.set(xlabel="mean response tokens (natural mode)", ylabel="accuracy % (natural mode)",
       title="tiny-scale ablations: accuracy against tokens (up-left is better)")
ax.grid(alpha=0.3)
plt.tight_layout()
fig.savefig(os.path.join(WORKDIR, "ablation.png"), dpi=120)
plt.show()"""),
        md("""The paper (DeepScaleR-1.5B base, mean over four benchmarks, accuracy % / tokens): one budget
59.8 / 1842, two 61.7 / 2427, four 63.7 / 2364; on AIME25, classic 24.4%, cosine 23.3%, HBPO
31.1%. At tiny scale, 36 RL steps on a 97%-accurate warm start, read the table as a check that
each objective runs and moves length and accuracy in its own direction, not as a replication."""),
    ]


NOTEBOOKS = {"loss_playground.ipynb": loss_playground, "budget_ablation.ipynb": budget_ablation}


def build(cells) -> nbformat.NotebookNode:
    nb = v4.new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    nb.metadata["accelerator"] = "TPU"  # Colab: suggest a TPU runtime
    return nb


def _sources(nb) -> list[tuple[str, str]]:
    return [(c.cell_type, c.source) for c in nb.cells]


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    for name, cells in NOTEBOOKS.items():
        nb, path = build(cells()), HERE / name
        if check:
            if not path.exists() or _sources(nbformat.read(path, as_version=4)) != _sources(nb):
                stale.append(name)
        elif not path.exists() or _sources(nbformat.read(path, as_version=4)) != _sources(nb):
            nbformat.validate(nb)  # unchanged notebooks keep their stored outputs
            nbformat.write(nb, path)
    if stale:
        print(f"out of date (run python notebooks/make_notebooks.py): {', '.join(stale)}")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
