"""A run's workdir is its contract (docs/workdir.md): a resume that would change what the
checkpoints mean is refused before anything is written, Ctrl-C checkpoints, a second run on the
same workdir is refused, a full or read-only workdir is one sentence, and nothing a refused
action touches changes (checkpoints, metrics and spec byte-identical).

One 3-step run (`three_steps`) is copied by every refusal check."""
import hashlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _checkpoints(workdir):
    return sorted(int(p.name) for p in (pathlib.Path(workdir) / "checkpoints").iterdir() if p.name.isdigit())


def _snapshot(workdir) -> dict[str, str]:
    """sha256 of every file in the workdir (the compilation cache and the lock aside)."""
    workdir = pathlib.Path(workdir)
    return {str(p.relative_to(workdir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(workdir.rglob("*")) if p.is_file()
            and not str(p.relative_to(workdir)).startswith(("jax_cache", "lock.json"))}


def _steps_logged(workdir) -> list[int]:
    """The step of every training row of metrics.jsonl, repeats included."""
    rows = [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if "loss" in r]


def _one_sentence(done, status=2) -> str:
    """The last stderr line of a refused run, after checking its status and that no traceback shows."""
    assert done.returncode == status, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    return done.stderr.strip().splitlines()[-1]


def _run(tiny_run, workdir, steps, *extra, timeout=600):
    return subprocess.run(tiny_run.command(workdir, steps, *extra), cwd=ROOT, env=tiny_run.env(),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def three_steps(tiny_run, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("three_steps")
    tiny_run.run(workdir, 3)
    return workdir


@pytest.fixture
def copy(three_steps, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(three_steps, workdir)
    return workdir


@pytest.mark.slow
@pytest.mark.parametrize("change, keys", [
    (("--config.objective.name=grpo",), ("objective.name",)),                      # row 2
    (("--config.train.prompts_per_step=8", "--config.train.micro_batch_size=8"),
     ("train.prompts_per_step",)),                                                 # row 2
    (("--config.model.num_layers=1",), ("model.fields.num_layers",)),          # row 10
])
def test_a_changed_contract_is_refused_before_anything_is_written(tiny_run, copy, change, keys):
    before = _snapshot(copy)
    line = _one_sentence(_run(tiny_run, copy, 5, *change))
    assert "holds checkpoints (up to step 3)" in line and "--allow_spec_change=" in line, line
    for key in keys:
        assert key in line, line
    assert _snapshot(copy) == before
    assert not (copy / "lock.json").exists()


@pytest.mark.slow
def test_a_free_change_is_accepted_logged_recorded_and_metrics_are_not_repeated(tiny_run, copy):
    # Rows 1 and 2: a resume from an older checkpoint logs each step once; a learning-rate change
    # and an explicitly allowed objective change are accepted and kept in spec.json's history.
    shutil.rmtree(copy / "checkpoints" / "3")  # metrics.jsonl holds step 3, the newest checkpoint is 2
    original = json.loads((copy / "spec.json").read_text())
    done = tiny_run.run(copy, 4, "--config.optim.learning_rate=2e-6", "--config.objective.beta=2.0",
                        "--allow_spec_change=objective.settings.beta")
    assert "resumed from step 2" in done.stderr
    assert "with changed settings" in done.stderr and "optim.learning_rate" in done.stderr
    assert _steps_logged(copy) == [1, 2, 3, 4]
    spec = json.loads((copy / "spec.json").read_text())
    assert spec["optim"]["learning_rate"] == 2e-6 and spec["objective"]["settings"]["beta"] == 2.0
    last = spec["history"][-1]
    assert last["event"] == "resume" and last["from_step"] == 2
    assert last["changes"]["optim.learning_rate"] == [original["optim"]["learning_rate"], 2e-6]
    assert last["changes"]["objective.settings.beta"][1] == 2.0
    assert spec["history"][0]["event"] == "start"
    # The run's closing line and figure.
    assert "final step 4" in done.stdout and "checkpoint:" in done.stdout, done.stdout
    assert (copy / "training.png").stat().st_size > 0


def _wait_for_rows(proc, workdir, n, timeout=500):
    metrics = pathlib.Path(workdir) / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and sum('"loss"' in line for line in metrics.read_text().splitlines()) >= n:
            return
        time.sleep(0.2)
    raise AssertionError(f"no {n} metrics rows before the run ended: {proc.poll()}")


@pytest.mark.slow
def test_ctrl_c_checkpoints_a_second_run_is_refused_and_a_stale_lock_is_taken_over(tiny_run, copy):
    # Row 4: a second run on a busy workdir; row 3: Ctrl-C checkpoints and exits 0, twice aborts.
    proc = subprocess.Popen(tiny_run.command(copy, 50, "--config.train.checkpoint_every=100"), cwd=ROOT,
                            env=tiny_run.env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_rows(proc, copy, 4)
        lock = json.loads((copy / "lock.json").read_text())
        assert lock["pid"] == proc.pid
        t0 = time.time()
        second = _run(tiny_run, copy, 50, timeout=120)
        line = _one_sentence(second)
        assert f"is in use by pid {proc.pid} on host" in line, line
        assert time.time() - t0 < 60
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err and "Ctrl-C" in err, err[-3000:]
    stopped = _checkpoints(copy)[-1]
    assert 3 < stopped < 50 and _steps_logged(copy) == list(range(1, stopped + 1))
    assert not (copy / "lock.json").exists()

    # A lock left by a process that is gone (SIGKILL) is taken over; a second Ctrl-C aborts at once.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (copy / "lock.json").write_text(json.dumps({"host": os.uname().nodename, "pid": dead.pid, "started": "then"}))
    log = copy.parent / "second.log"
    with open(log, "w") as stderr:
        proc = subprocess.Popen(tiny_run.command(copy, 50, "--config.train.checkpoint_every=100"), cwd=ROOT,
                                env=tiny_run.env(), stdout=subprocess.DEVNULL, stderr=stderr, text=True)
    try:
        _wait_for_rows(proc, copy, stopped + 1)
        before = _checkpoints(copy)
        assert json.loads((copy / "lock.json").read_text())["pid"] == proc.pid
        proc.send_signal(signal.SIGINT)
        # The second Ctrl-C once the first is seen: two in one step would reach Python as one.
        deadline = time.time() + 60
        while "Ctrl-C: checkpointing" not in log.read_text() and time.time() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = log.read_text()
    assert "is stale" in err and "taking it over" in err, err[-3000:]
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("train.py: interrupted"), err[-3000:]
    # The committed checkpoints are untouched (a save the second Ctrl-C cut short stays uncommitted).
    committed = [s for s in _checkpoints(copy) if (copy / "checkpoints" / str(s) / "commit_success.txt").exists()]
    assert set(before) <= set(committed) and len(committed) <= len(before) + 1


def _mount_tmpfs(path, size) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.fixture
def tmpfs(tmp_path):
    """() -> a mounted tmpfs of the given size (root only: skipped elsewhere), unmounted after."""
    mounted = []

    def mount(size):
        path = tmp_path / f"tmpfs{len(mounted)}"
        if os.geteuid() != 0 or not _mount_tmpfs(path, size):
            pytest.skip("mounting a tmpfs needs root")
        mounted.append(path)
        return path
    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.mark.slow
def test_a_read_only_workdir_is_one_sentence(tiny_run, three_steps, tmpfs):
    # Row 7.
    disk = tmpfs("64m")
    workdir = disk / "run"
    shutil.copytree(three_steps, workdir)
    before = _snapshot(workdir)
    assert subprocess.run(["mount", "-o", "remount,ro", str(disk)]).returncode == 0
    line = _one_sentence(_run(tiny_run, workdir, 5, timeout=120))
    assert str(workdir) in line and "read-only" in line, line
    assert _snapshot(workdir) == before


@pytest.mark.slow
def test_a_full_disk_is_one_sentence(tiny_run, three_steps, tmpfs, tmp_path):
    # Row 6: room for the warm start and the logs, not for the first checkpoint.
    size = lambda folder: sum(p.stat().st_size for p in pathlib.Path(folder).rglob("*") if p.is_file())  # noqa: E731
    warm = size(tiny_run.warm(tmp_path / "measure"))
    disk = tmpfs(str(warm + size(three_steps / "checkpoints" / "1") // 2 + (256 << 10)))
    workdir = disk / "run"
    tiny_run.warm(workdir)
    done = _run(tiny_run, workdir, 3)
    line = _one_sentence(done)
    assert "no space left" in line.lower() and str(workdir) in line and "bytes free" in line, line
    assert len(done.stderr.splitlines()) < 60, done.stderr[-5000:]


def test_convert_refuses_a_non_empty_destination(tmp_path):
    # Row 5.
    dst = tmp_path / "model"
    dst.mkdir()
    (dst / "config.json").write_text('{"model_type": "qwen2"}')
    before = _snapshot(dst)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, str(ROOT / "launch" / "convert.py"), "--to=hf", f"--src={tmp_path / 'src'}",
                           f"--dst={dst}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    line = _one_sentence(done)
    assert f"--dst={dst} is not empty" in line and "--overwrite" in line, line
    assert _snapshot(dst) == before


@pytest.mark.slow
def test_resuming_with_another_model_is_refused_and_nothing_is_touched(tmp_path):
    # Row 1: model_path a 2-layer Qwen2 on a 3-layer run's checkpoint used to set the good checkpoint
    # aside as damaged, train from step 0 and overwrite export/.
    import dataclasses

    from hbpo_jax import config as config_lib
    from hbpo_jax.data import readers as data
    from hbpo_jax.errors import WorkdirError
    from hbpo_jax.models import ModelConfig, create_model, save_pretrained
    from hbpo_jax.tasks import arithmetic
    from hbpo_jax.tasks import tokenizer as tokenizer_lib
    from hbpo_jax.train import loop

    tok = tokenizer_lib.build_tokenizer(arithmetic.corpus_texts(200, 0), vocab_size=128)
    cfg = ModelConfig(vocab_size=-(-len(tok) // 8) * 8, hidden_size=32, intermediate_size=64, num_layers=3,
                      num_heads=4, num_kv_heads=2, eos_token_ids=(tok.eos_token_id,))
    save_pretrained(create_model(cfg, seed=0), str(tmp_path / "three"), tokenizer=tok)
    save_pretrained(create_model(dataclasses.replace(cfg, num_layers=2), seed=0), str(tmp_path / "two"), tokenizer=tok)
    rows = [{"problem": r["problem"], "answer": r["answer"], "solution": ""} for r in arithmetic.make_dataset(24, 1)]
    data.write_jsonl(tmp_path / "train.jsonl", rows)

    config = config_lib.base_config()
    config.model_path = str(tmp_path / "three")
    config.model = {}
    config.data.path = str(tmp_path / "train.jsonl")
    r = config.rollout
    r.budgets, r.rollouts_per_prompt, r.max_prompt_len, r.max_response_len = (16, 32), 4, 64, 48
    config.objective.l_max = 48
    t = config.train
    t.steps, t.prompts_per_step, t.mini_batches, t.micro_batch_size, t.checkpoint_every = 1, 4, 2, 8, 1
    config.grading.workers = 0
    work = tmp_path / "work"
    loop.run(config, str(work))
    before = _snapshot(work)
    assert "export/config.json" in before and _checkpoints(work) == [1]

    config.model_path, config.train.steps = str(tmp_path / "two"), 2
    with pytest.raises(WorkdirError, match=r"holds checkpoints \(up to step 1\).*model.path"):
        loop.run(config, str(work))
    assert _snapshot(work) == before
    with pytest.raises(WorkdirError, match="holds a state of other shapes than this run's model"):
        loop.run(config, str(work), allow_spec_change=("model",))
    assert _snapshot(work) == before and not list((work / "checkpoints").glob("damaged-*"))
