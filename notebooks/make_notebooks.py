"""Writes the notebooks of this folder from the cell sources below (the reviewable form).

    python notebooks/make_notebooks.py            # rewrites every notebook, without outputs
    python notebooks/make_notebooks.py --check    # exit 1 if a notebook's cells differ from here

Edit the cells here, not in Jupyter, then re-run this script. tests/e2e/test_notebooks.py executes
the notebooks in smoke mode (HBPO_SMOKE=1).
"""
from __future__ import annotations

import pathlib
import sys

import nbformat
from nbformat import v4

HERE = pathlib.Path(__file__).resolve().parent

# The same first cell in every notebook. On Colab: jax[tpu] at the tested version where a TPU
# runtime is attached (a mismatched libtpu silently falls back to the CPU), hbpo-jax from the
# source the user sets, and a check that JAX sees the TPU unless in smoke mode. Elsewhere (a
# checkout installed with `pip install -e .`) it installs nothing.
JAX_VERSION = "0.10.2"  # setup.py's JAX_VERSION: the tpu extra's pin
INSTALL = f'''\
# Colab: Runtime > Change runtime type > v5e-1 TPU (or v6e-1). hbpo-jax is installed from the first of:
#   REPO_URL below (a pip source: "git+https://github.com/<you>/hbpo-jax", or a wheel's URL);
#   a wheel you built with `python -m build` and uploaded to /content (Files pane): /content/hbpo_jax-*.whl;
#   the repository in your Google Drive, /content/drive/MyDrive/hbpo-jax (Drive is mounted to look).
# What fits a v5e-1 (16 GiB HBM), by the TPU plan (`python launch/memory.py --config=... --topology=v5e:1x1`,
# XLA's compiled plan per chip; docs/real_models.md, "What fits a Colab TPU (v5e-1)"): this notebook's tiny
# models easily; configs/qwen0_5b_instruct.py full fine-tuning, train step 12.85 GiB (margin 3.15 GiB);
# configs/qwen1_5b.py:colab (LoRA rank 16, base frozen in bfloat16, the real-model notebook's batch and
# lengths), largest program 6.75 GiB (margin 9.25 GiB). Full fine-tuning of the 1.5B does not fit: its
# float32 weights and AdamW state alone are 19.9 GiB.
REPO_URL = ""
import glob, importlib.util, os, subprocess, sys
SMOKE = os.environ.get("HBPO_SMOKE", "0") == "1"  # the test suite's CPU smoke mode
ON_COLAB = importlib.util.find_spec("google.colab") is not None
# A Colab TPU VM runtime: its env var, or the chips' device files (/dev/accel* on v2-v4, vfio on v5e/v6e).
ON_TPU = bool(os.environ.get("TPU_ACCELERATOR_TYPE") or os.environ.get("COLAB_TPU_1VM")
              or glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))
DRIVE_REPO = "/content/drive/MyDrive/hbpo-jax"


def hbpo_source():
    """Where to pip install hbpo-jax from on Colab, or None: REPO_URL, an uploaded wheel, the Drive folder."""
    source = REPO_URL or os.environ.get("HBPO_REPO_URL", "")
    wheels = sorted(glob.glob("/content/hbpo_jax-*.whl") + glob.glob("/content/drive/MyDrive/hbpo_jax-*.whl"))
    if source or wheels:
        return source or wheels[-1]
    if not os.path.isdir(DRIVE_REPO) and os.path.isdir("/content"):
        from google.colab import drive  # asks for access to your Drive once
        drive.mount("/content/drive")
    return DRIVE_REPO if os.path.isfile(os.path.join(DRIVE_REPO, "setup.py")) else None


if ON_COLAB and importlib.util.find_spec("hbpo_jax") is None:
    source = hbpo_source()
    if source is None:
        raise RuntimeError("hbpo-jax was not found: upload a wheel built with `python -m build` to /content, put the "
                           f"repository in Google Drive at {{DRIVE_REPO}}, or set REPO_URL in this cell to a git URL, "
                           "then run this cell again.")
    # On a TPU, the libtpu that matches the tested JAX, resolved together with the package and
    # installed before jax is first imported.
    tpu = ["jax[tpu]=={JAX_VERSION}"] if ON_TPU else []
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", *tpu, source], check=True)
import jax
print("jax", jax.__version__, jax.default_backend(), jax.devices())
if ON_COLAB and not SMOKE:
    assert jax.default_backend() == "tpu", (
        "JAX does not see a TPU: pick a TPU runtime (v5e-1 or v6e-1), or set HBPO_SMOKE=1 for the CPU.")'''


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
from hbpo_jax import cli
from hbpo_jax.train import ablation
from hbpo_jax.train.ablation import Variant

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
    OVERRIDES.update({"model.num_layers": 1, "model.hidden_size": 64, "model.intermediate_size": 128,
                      "model.head_dim": 16, "task.sft_steps": 10, "task.sft_examples": 200,
                      "train.steps": 2, "train.prompts_per_step": 4, "train.micro_batch_size": 16,
                      "rollout.rollouts_per_prompt": 8, "rollout.max_response_len": 192,
                      "eval.max_response_len": 192, "task.eval_problems": 8})
print(OVERRIDES)"""),
        code("""\
cli.use_compilation_cache(os.path.join(WORKDIR, "jax_cache"), keep_all=True)  # runs 2-5 reuse run 1's programs
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


def real_model_ablation():
    md, code = v4.new_markdown_cell, v4.new_code_cell
    return [
        md("""# HBPO on a small real model: an instruct model, GSM8K, HBPO against GRPO

`configs/qwen0_5b_instruct.py` on a Qwen2.5-0.5B-Instruct-class model: the `r1_zero` prompt
preset (reasoning in `<think> </think>`, a `\\boxed{}` answer), `lenient` grading (a boxed answer
without a think block counts; a think block opened and never closed does not), budgets 128 / 256 /
512 / 768 in L_max = 1,024. Two runs from the same model, a few dozen steps each:

* **HBPO** — budget-prefixed rollouts, the budget-aware reward;
* **GRPO** — the baseline: natural rollouts, a 0/1 reward.

Both are evaluated on held-out problems, greedily, in natural mode and (HBPO) under each budget
prompt, and plotted as accuracy against mean tokens.

On Colab (a TPU runtime, as the first cell requires) the cells below download the model and
GSM8K from the Hugging Face Hub — the only place hbpo-jax touches the network — and stops with a clear message when it
cannot. Offline, point `MODEL` at a local Hugging Face folder and `DATA` at `rg:<task>`
(reasoning-gym's problems are generated locally). The test suite runs it in smoke mode
(`HBPO_SMOKE=1`) on a tiny random model folder and `rg:basic_arithmetic`.

Memory, by the TPU plan for one v5e chip (`python launch/memory.py --config=configs/qwen0_5b_instruct.py
--topology=v5e:1x1`): the 0.5B's full fine-tuning train step peaks at 12.85 GiB of 16 (margin
3.15 GiB). A 1.5B fits with LoRA: `configs/qwen1_5b.py:colab` (rank 16, the base frozen in
bfloat16, this notebook's batch and lengths) peaks at 6.75 GiB (margin 9.25). If a run does not fit, lower
`train.micro_batch_size` or `train.prompts_per_step` in `OVERRIDES` below."""),
        code(INSTALL),
        _parameters("""\
import os
SMOKE = os.environ.get("HBPO_SMOKE", "0") == "1"  # tiny numbers, same code path (the test suite sets it)
WORKDIR = os.environ.get("HBPO_ABLATION_DIR", "runs/real_model_ablation")  # re-running skips finished runs
MODEL = os.environ.get("HBPO_MODEL", "Qwen/Qwen2.5-0.5B-Instruct")  # a Hub id or a local HF folder
DATA = os.environ.get("HBPO_DATA", "gsm8k")  # "gsm8k" (from the Hub) or "rg:<task>[,<task>...]"
STEPS = 30  # RL steps per run
EVAL_PROBLEMS = 64  # held-out problems per evaluation
CONFIG = "configs/qwen0_5b_instruct.py\""""),
        md("""### Model and data

The network is used here only, and only for a Hub id (`MODEL`) or `DATA = "gsm8k"`. GSM8K's
`train` split is the training data and its `test` split the held-out evaluation."""),
        code("""\
from hbpo_jax.data import readers as data


def fetch(what, download):
    \"\"\"download(), or a RuntimeError that says what was needed and how to run offline.\"\"\"
    try:
        return download()
    except Exception as e:  # no network, no huggingface_hub / datasets, a rate limit ...
        raise RuntimeError(
            f"Could not download {what} from the Hugging Face Hub ({type(e).__name__}: {e}). This "
            "notebook needs the network for it; offline, set MODEL to a local Hugging Face folder "
            "and DATA to 'rg:basic_arithmetic'.") from None


if os.path.isdir(MODEL):
    model_dir = MODEL
else:
    from huggingface_hub import snapshot_download
    model_dir = fetch(MODEL, lambda: snapshot_download(
        MODEL, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"]))

os.makedirs(WORKDIR, exist_ok=True)
if DATA == "gsm8k":
    def gsm8k_files():
        import datasets
        paths = {}
        for split in ("train", "test"):
            path = os.path.join(WORKDIR, f"gsm8k_{split}.jsonl")
            if not os.path.exists(path):
                rows = datasets.load_dataset("openai/gsm8k", "main", split=split)
                data.write_jsonl(path, ({"question": r["question"], "answer": r["answer"]} for r in rows))
            paths[split] = path
        return paths
    files = fetch("GSM8K", gsm8k_files)
    TRAIN = {"data.path": files["train"], "data.field_map": "gsm8k"}
    BENCHMARKS = (f"gsm8k:{files['test']}",)
else:  # reasoning-gym: training problems from data.seed, held-out ones from seed
    TRAIN = {"data.path": DATA}
    BENCHMARKS = tuple(f"rg:{task}" for task in DATA[len("rg:"):].split(","))
print(model_dir, TRAIN, BENCHMARKS)"""),
        md("""### The runs

The config's settings (budgets, rollouts, learning rate) for `STEPS` steps each; smoke mode
shrinks everything so the test suite runs it in a minute on a CPU."""),
        code("""\
from hbpo_jax import cli
from hbpo_jax.train import ablation
from hbpo_jax.train.ablation import Variant

VARIANTS = [
    Variant("hbpo", "hbpo", eval_modes=("natural", "fixed")),  # fixed: each budget prompt
    Variant("grpo", "grpo"),  # natural rollouts, 0/1 reward
]
OVERRIDES = {"model_path": model_dir, **TRAIN, "eval.benchmarks": BENCHMARKS,
             "eval.max_problems": EVAL_PROBLEMS, "train.steps": STEPS, "train.checkpoint_every": STEPS}
if SMOKE:
    OVERRIDES.update({"train.steps": 2, "train.prompts_per_step": 2, "train.mini_batches": 1,
                      "train.micro_batch_size": 8, "rollout.rollouts_per_prompt": 4,
                      "rollout.budgets": (16, 24, 32, 40), "rollout.max_response_len": 48,
                      "rollout.max_prompt_len": 512, "eval.max_response_len": 48, "eval.max_problems": 4,
                      "data.max_rows": 64, "grading.workers": 1, "model.dtype": "float32",
                      "model.remat": "none"})
print(OVERRIDES)"""),
        code("""\
cli.use_compilation_cache(os.path.join(WORKDIR, "jax_cache"), keep_all=True)  # run 2 reuses run 1's programs
results = ablation.run_variants(ablation.load_config(CONFIG), VARIANTS, WORKDIR, overrides=OVERRIDES)
print("seconds:", {r["name"]: round(r["seconds"]) for r in results["runs"]})"""),
        md("""### Results

Greedy decoding on the same held-out problems; "warm start" is the model before RL. The
format-error rate is under the lenient policy. Also in `WORKDIR/ablation.md`."""),
        code("""\
from IPython.display import Markdown, display

display(Markdown(ablation.markdown_table(results)))
for r in results["runs"]:
    for s in r["after"]:
        print(f"{r['name']:5s} {s['mode']:11s} accuracy {s['accuracy']:5.1f}%  tokens {s['mean_tokens']:6.1f}  "
              f"format errors {100 * s.get('format_error_rate', 0):5.1f}%  graded {s.get('answer_format')}")"""),
        code("""\
import matplotlib.pyplot as plt

fig, ax = plt.subplots(figsize=(7, 4.5))
points = [("warm start", s) for s in results["warm_start"]["before"]]
points += [(r["name"], s) for r in results["runs"] for s in r["after"]]
colors = {"warm start": "black", "hbpo": "tab:blue", "grpo": "tab:orange"}
for name, s in points:
    ax.scatter(s["mean_tokens"], s["accuracy"], color=colors.get(name, "gray"),
               marker="o" if s["mode"] == "natural" else "s", s=60)
    ax.annotate(f"{name} {s['mode']}", (s["mean_tokens"], s["accuracy"]), textcoords="offset points",
                xytext=(5, 4), fontsize=8)
ax.set(xlabel="mean response tokens", ylabel="accuracy %",
       title="accuracy against tokens per budget prompt (circles: natural mode)")
ax.grid(alpha=0.3)
plt.tight_layout()
fig.savefig(os.path.join(WORKDIR, "accuracy_vs_tokens.png"), dpi=120)
plt.show()"""),
    ]


# Colab's notebook settings for a v5e-1 TPU runtime (Runtime > Change runtime type).
COLAB_METADATA = {"accelerator": "TPU", "colab": {"gpuType": "V5E1", "provenance": []}}

NOTEBOOKS = {"loss_playground.ipynb": loss_playground, "budget_ablation.ipynb": budget_ablation,
             "real_model_ablation.ipynb": real_model_ablation}


def build(cells) -> nbformat.NotebookNode:
    nb = v4.new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    nb.metadata.update(COLAB_METADATA)  # Colab: open on a TPU runtime
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
