"""Test setup: 8 fake CPU devices (so sharded code paths run everywhere), no network, one JAX
compilation cache for the session, XLA's quick compile (`FAST_COMPILE`), and the tiny training run
shared by the end-to-end tests. pytest.ini runs two pytest-xdist workers; they share the cache
and the warm start.

Markers: `slow` marks a test that takes more than ~10 s on the 2-core CI machine (a training
or evaluation subprocess, a notebook, a multi-process run). `python -m pytest tests -q -m "not
slow"` is the few-minute check; the full suite is what .ci/run runs.

Fixtures:
  tiny_run    a `TinyRun`: launch/train.py on a few-second version of configs/tiny.py, in a
              subprocess, every workdir starting from the session's one SFT warm start.
  warm_start  (session) the folder that warm start was built in, built on first use by
              whichever worker needs it first (a file lock keeps the other waiting).
"""
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import filelock
import pytest

from hbpo_jax import host

# The tests compile hundreds of small programs and run each only a few times, so LLVM's
# optimisation passes cost more than they save: at level 0 test_trainer + test_qwen2 take a quarter
# less CPU time, with the same results. Every test subprocess gets the same flags (`xla_flags`).
FAST_COMPILE = "--xla_backend_optimization_level=0"


def xla_flags(devices: int = 1) -> str:
    """XLA_FLAGS for a test process (or subprocess) with `devices` CPU devices."""
    return f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"


os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + xla_flags(8)).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# libtpu (the test extra) only compiles for TPU topologies here; its lock file would otherwise let
# one process at a time (one xdist worker) load it.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Huge pages for malloc in every test process started from here (the xdist workers, which start
# after this file loads, and each training or evaluation subprocess): hbpo_jax/host.py.
os.environ.setdefault("GLIBC_TUNABLES", host.HUGE_PAGES)
# One persistent compilation cache for the session (or the one the caller names), inherited by
# every training / evaluation subprocess: each compiles the same tiny programs, so all but the
# first load them from disk. Every program is kept, however quick to compile: a training subprocess
# loads its few dozen small programs in less time than it compiles them (16.9 -> 14.8 s per run).
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="hbpo-jax-tests-cache-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402  (after XLA_FLAGS and the cache settings)

jax.config.update("jax_default_matmul_precision", "highest")

ROOT = pathlib.Path(__file__).resolve().parents[1]

# A few-second version of configs/tiny.py: short SFT, short responses, 4 prompts x 4 rollouts.
TINY_ARGS = (
    "--config.task.name=arithmetic", "--config.task.sft_steps=30", "--config.task.sft_examples=300",
    "--config.task.eval_problems=8", "--config.task.train_problems=64",
    "--config.model.num_layers=2", "--config.model.hidden_size=64", "--config.model.intermediate_size=128",
    "--config.model.head_dim=16",
    "--config.rollout.budgets=(16,32)", "--config.task.sft_budget_scales=(0.5,1.0)",
    "--config.rollout.rollouts_per_prompt=4",
    "--config.rollout.max_response_len=48", "--config.objective.l_max=48",
    "--config.train.prompts_per_step=4", "--config.train.mini_batches=2", "--config.train.micro_batch_size=4",
    "--config.train.checkpoint_every=1", "--config.train.keep_checkpoints=3",
    "--config.eval.before_after=False", "--config.train.export_hf=False",
)
VOLATILE = ("time_", "generated_tokens_per_s")  # metrics that differ between identical runs


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: more than ~10 s on the 2-core CI machine (training, "
                                       "evaluation or notebook subprocesses); deselect with -m 'not slow'")


# The files whose tests take minutes, collected first: the two xdist workers take whole files in
# collection order, and a long file taken last would run alone at the end.
HEAVY_FIRST = ("test_multiprocess.py", "test_notebooks.py", "test_smollm2.py", "test_spec.py",
               "test_workdir_contract.py", "test_bench.py", "test_tpu_probe.py", "test_ablation.py",
               "test_refill.py", "test_lora_run.py", "test_launchers.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


def pytest_unconfigure(config):
    if _OWN_CACHE:
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


def _copy_warm_start(source: pathlib.Path, workdir: pathlib.Path) -> None:
    """The SFT warm start (warmstart/) and task tokenizer (tokenizer-<hash>/) of `source`, copied
    into `workdir` unless it has its own: the loop then restores them instead of training."""
    workdir.mkdir(parents=True, exist_ok=True)
    for folder in [source / "warmstart", *source.glob("tokenizer-*")]:
        if not (workdir / folder.name).exists():
            shutil.copytree(folder, workdir / folder.name)


class TinyRun:
    """launch/train.py on the few-second tiny config (`TINY_ARGS`), as a subprocess on one CPU
    device. Every workdir it runs in first gets the session's warm start (`warm`), so no test
    pays for SFT; the loop refuses it loudly if a test's overrides change its settings."""

    root = ROOT
    args = TINY_ARGS

    def __init__(self, build_warm_start):
        self._build = build_warm_start  # () -> the folder holding the session's warm start

    @staticmethod
    def env(**extra) -> dict:
        """The environment of a run: one CPU device (conftest's 8 fake devices are for
        in-process tests), the session's compilation cache, and `extra`."""
        return dict(os.environ, XLA_FLAGS=xla_flags(1), JAX_PLATFORMS="cpu", **extra)

    def warm(self, workdir) -> pathlib.Path:
        """Puts the session's warm start into `workdir` (kept if it has one); returns it."""
        workdir = pathlib.Path(workdir)
        _copy_warm_start(self._build(), workdir)
        return workdir

    def command(self, workdir, steps: int, *extra: str, args=TINY_ARGS) -> list[str]:
        """The command line of a `steps`-step run in a warm-started `workdir`; `extra` overrides
        come last (absl takes the last value of a repeated flag)."""
        self.warm(workdir)
        return [sys.executable, str(ROOT / "launch" / "train.py"), f"--config={ROOT / 'configs' / 'tiny.py'}",
                f"--workdir={workdir}", f"--config.train.steps={steps}", *args, *extra]

    def run(self, workdir, steps: int, *extra: str, timeout: float = 600) -> subprocess.CompletedProcess:
        """Runs `command` to the end and asserts it succeeded (its stderr tail otherwise)."""
        done = subprocess.run(self.command(workdir, steps, *extra), cwd=ROOT, env=self.env(),
                              capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    @staticmethod
    def metrics(workdir) -> dict[int, dict]:
        """The last row logged for each step, without the timing metrics."""
        rows = {}
        for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines():
            row = json.loads(line)
            if "loss" in row:
                rows[row["step"]] = {k: v for k, v in row.items() if not k.startswith(VOLATILE)}
        return rows


def _session_dir(tmp_path_factory) -> pathlib.Path:
    """A folder of this test session that every pytest-xdist worker shares (the workers'
    base temp folders sit side by side in it)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def warm_start(tmp_path_factory):
    """() -> the folder of the session's tiny warm start, built on the first call by a 1-step run
    (the loop builds and caches warm starts; a run needs at least one step), once for all xdist
    workers. That step also fills the compilation cache with the training step every later run
    compiles."""
    workdir = _session_dir(tmp_path_factory) / "warm-start"

    def build() -> pathlib.Path:
        with filelock.FileLock(str(workdir) + ".lock"):
            if not (workdir / "warmstart").is_dir():
                cmd = [sys.executable, str(ROOT / "launch" / "train.py"), f"--config={ROOT / 'configs' / 'tiny.py'}",
                       f"--workdir={workdir}", "--config.train.steps=1", *TINY_ARGS]
                done = subprocess.run(cmd, cwd=ROOT, env=TinyRun.env(), capture_output=True, text=True, timeout=900)
                assert done.returncode == 0, done.stderr[-3000:]
                assert (workdir / "warmstart").is_dir(), "the tiny run no longer caches its warm start in warmstart/"
        return workdir

    return build


@pytest.fixture(scope="session")
def tiny_run(warm_start) -> TinyRun:
    return TinyRun(warm_start)


@pytest.fixture
def warm_workdir(tiny_run, tmp_path) -> pathlib.Path:
    """A fresh workdir holding the session's warm start (the loop restores it, no SFT)."""
    return tiny_run.warm(tmp_path)


@pytest.fixture(scope="module")
def model():
    """(graphdef, state) of tests.helpers.CFG with sharp logits (helpers.sharp_model)."""
    from tests.helpers import sharp_model
    return sharp_model()


@pytest.fixture(scope="module")
def rows():
    """24 rows over tests.helpers.PROMPTS (helpers.random_rows)."""
    from tests.helpers import random_rows
    return random_rows()
